"""Bytes on the wire per idle tunnel per day, for the metered profile behind a carrier NAT.

A real controller-plus-relay and a real agent (``outpost-agent run``, profile
"metered") whose uplink goes through the link emulator with a NAT timeout.
The emulator counts TCP payload both ways; nothing but keepalives crosses an
idle tunnel (the relay never pings; TLS sends nothing on its own).

Two ways to measure:

* scaled (default): the agent pings every ``--scaled-interval`` seconds (NAT
  timeout scaled alike) for ``--seconds``. A keepalive exchange is the same
  bytes whatever the interval (one PING frame up, one PONG down, each in one
  WebSocket message and one TLS record), so bytes/day = measured bytes per
  exchange x the real plan's exchanges per day. That scaling is exact.
* real (``--minutes M``): the real plan's interval for M minutes, scaled to a
  day by 1440 / M.

The agent's report of itself (REPORT) goes once per tunnel and then only on
meaningful change, at most once per ``REPORT_MIN_INTERVAL``; the budget is
checked with the worst case, every allowed report sent, each of the size the
real agent's report had in this run (frame, WebSocket and TLS record overhead
and its segment's TCP/IP header included).

A relay that renews its certificate presents the new one on the tunnel
(RELAY_CERT, docs/protocol.md): one frame per renewal, every two thirds of
the default relay certificate life (4 h: six a day). Its size is the frame
the relay's own code makes for a certificate the controller's CA issues to
a relay with a long name and address (the run's controller is a single box,
whose year-long listener certificate renews too seldom to count), with the
same overheads as a report; it is added to the worst case.

The baseline side by side is the ethernet profile (25 s keepalive), measured
the same way in the same run. The last line is one JSON object.

    .venv/bin/python tests/bench/idle_bytes.py [--seconds 40] [--minutes 30]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from agent.tunnel.link_profiles import plan_for  # noqa: E402
from agent.tunnel.report import REPORT_MIN_INTERVAL  # noqa: E402
from controller.ca import CertificateAuthority  # noqa: E402
from controller.relay_node import RENEW_FRACTION  # noqa: E402
from controller.settings import DEFAULT_RELAY_CERT_LIFETIME  # noqa: E402
from shared.protocol import NONCE_SIZE, Connection, Role  # noqa: E402
from tests.bench.bench_setup import machine  # noqa: E402
from tests.bench.link_bench_setup import LinkTunnelPath  # noqa: E402

# Settle time after connecting: the handshake's last bytes (BIND, TLS session
# tickets) must be through before counting idle bytes.
SETTLE = 3.0
# IPv4 + TCP with timestamps: what every segment adds on the wire.
TCP_IP_HEADER = 52
# Segments per keepalive exchange on the wire: PING, PONG, and the ACK of the
# PONG (the PING's ACK rides on the PONG when the relay answers at once).
SEGMENTS_PER_EXCHANGE = 3
DAY = 86400.0
# Bytes one small message adds around its payload: the frame header (10), the
# WebSocket header of a masked client message (6, on a WebSocket tunnel only) and a TLS 1.3 record (22).
WEBSOCKET_HEADER = 6
MESSAGE_OVERHEAD = 10 + 22
#: The agent's [link] transport (``--agent-transport``, which bench_setup writes into the config);
#: empty: the default, auto (TLS directly).
TRANSPORT = ""


def run_case(workdir: Path, name: str, link: dict, nat_timeout: float, seconds: float) -> dict:
    """Idle bytes of one configuration over ``seconds``, per exchange and per second."""
    path = LinkTunnelPath(workdir / name, "lte-nat", link, {}, dial=False,
                          emulator_args=("--nat-timeout", str(nat_timeout)))
    (workdir / name).mkdir()
    path.start()
    try:
        time.sleep(SETTLE)
        start_counters = _emulator_counters(path)
        time.sleep(seconds)
        end_counters = _emulator_counters(path)
        status = path.binder_status()
    finally:
        path.stop()
    up = end_counters["up_bytes"] - start_counters["up_bytes"]
    down = end_counters["down_bytes"] - start_counters["down_bytes"]
    exchanges = end_counters["up_writes"] - start_counters["up_writes"]
    return {"seconds": seconds, "exchanges": exchanges, "payload_up": up, "payload_down": down,
            "reconnects": status.get("reconnects", 0), "blackholed": end_counters["blackholed"],
            "reports_sent": status.get("reports_sent", 0), "report_payload_bytes": status.get("last_report_bytes")}


def reports_per_day(case: dict) -> dict:
    """The worst case of the agent's reports in a day: one per REPORT_MIN_INTERVAL, each as large as measured."""
    size = case["report_payload_bytes"]
    assert size, "the agent sent no report: the relay or the agent does not speak REPORT"
    per_report = size + MESSAGE_OVERHEAD + TCP_IP_HEADER * 2  # the report's segment and its ACK
    reports = DAY / REPORT_MIN_INTERVAL
    return {"report_payload_bytes": size, "max_reports_per_day": reports,
            "worst_case_kb_per_day": round(per_report * reports / 1000, 1)}


def relay_certificates_per_day() -> dict:
    """RELAY_CERT: one frame per relay renewal, each of the size the relay's code makes for a real relay certificate."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    ca = CertificateAuthority.create()
    key = ec.generate_private_key(ec.SECP256R1())
    cert = ca.issue_relay(key.public_key(), "relay-" + "x" * 57, "relay-eu-west-1.gateways.example.com",
                          DEFAULT_RELAY_CERT_LIFETIME)
    der = cert.public_bytes(serialization.Encoding.DER)
    relay, agent = Connection(Role.RELAY, 0.0), Connection(Role.AGENT, 0.0)
    relay.send_challenge(bytes(NONCE_SIZE))
    agent.receive_data(relay.data_to_send(), 0.0)
    agent.send_auth(["-"], b"s")
    relay.receive_data(agent.data_to_send(), 0.0)
    relay.accept_auth({})
    relay.data_to_send()
    size = relay.send_relay_certificate(der, key.sign(b"x" * 64, ec.ECDSA(hashes.SHA256())))
    per_push = size + MESSAGE_OVERHEAD + TCP_IP_HEADER * 2  # the push's segment and its ACK
    pushes = DAY / (DEFAULT_RELAY_CERT_LIFETIME * RENEW_FRACTION)
    return {"relay_cert_payload_bytes": size, "certificate_der_bytes": len(der), "pushes_per_day": pushes,
            "kb_per_day": round(per_push * pushes / 1000, 1)}


def _emulator_counters(path: LinkTunnelPath) -> dict:
    """The emulator's counters now (the emulator process prints them on SIGUSR1)."""
    assert path.emulator is not None
    return path.emulator.snapshot()


def per_day(case: dict, interval: float) -> dict:
    """Scale a measured case to a day of the given keepalive interval."""
    exchanges = max(case["exchanges"], 1)
    payload_per_exchange = (case["payload_up"] + case["payload_down"]) / exchanges
    exchanges_per_day = DAY / interval
    payload = payload_per_exchange * exchanges_per_day
    headers = SEGMENTS_PER_EXCHANGE * TCP_IP_HEADER * exchanges_per_day
    return {
        "keepalive_interval_s": interval,
        "exchanges_per_day": round(exchanges_per_day, 1),
        "payload_bytes_per_exchange": round(payload_per_exchange, 1),
        "payload_kb_per_day": round(payload / 1000, 1),
        "with_tcp_ip_headers_kb_per_day": round((payload + headers) / 1000, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=40.0, help="scaled measurement length (default 40)")
    parser.add_argument("--scaled-interval", type=float, default=2.0, help="keepalive in the scaled run (default 2 s)")
    parser.add_argument("--minutes", type=float, help="also measure the real 150 s-NAT plan for this many minutes")
    parser.add_argument("--agent-transport", choices=("auto", "tls", "websocket"), default="",
                        help="the agent's [link] transport (default: the agent's default, auto)")
    args = parser.parse_args(argv)
    global TRANSPORT, MESSAGE_OVERHEAD
    TRANSPORT = args.agent_transport
    if TRANSPORT == "websocket":
        MESSAGE_OVERHEAD += WEBSOCKET_HEADER
    real_600 = plan_for("metered", nat_timeout=600)
    real_150 = plan_for("metered", nat_timeout=150)
    ethernet = plan_for("ethernet")
    scaled = args.scaled_interval
    report: dict = {"benchmark": "idle_bytes", "method": "scaled", "transport": TRANSPORT or "auto"}
    with tempfile.TemporaryDirectory(prefix="outpost-idle-") as tmp:
        workdir = Path(tmp)
        metered = run_case(workdir, "metered", {"profile": "metered", "keepalive_interval": scaled,
                                                "nat_timeout": scaled * 1.5}, scaled * 1.5, args.seconds)
        baseline = run_case(workdir, "ethernet", {"profile": "ethernet", "keepalive_interval": scaled},
                            scaled * 1.5, args.seconds)
        report["scaled_runs"] = {"metered": metered, "ethernet_baseline": baseline}
        report["metered_nat_600s"] = per_day(metered, real_600.liveness.keepalive_interval)
        report["metered_nat_150s"] = per_day(metered, real_150.liveness.keepalive_interval)
        report["baseline_ethernet_25s"] = per_day(baseline, ethernet.liveness.keepalive_interval)
        if args.minutes:
            seconds = args.minutes * 60
            real = run_case(workdir, "real150", {"profile": "metered", "nat_timeout": 150}, 150.0, seconds)
            payload = real["payload_up"] + real["payload_down"]
            report["real_run_nat_150s"] = {**real, "payload_kb_per_day": round(payload * DAY / seconds / 1000, 1)}
    report["reports"] = reports_per_day(metered)
    report["relay_certificates"] = relay_certificates_per_day()
    for key in ("metered_nat_600s", "metered_nat_150s"):
        report[key]["with_reports_worst_case_kb_per_day"] = round(
            report[key]["with_tcp_ip_headers_kb_per_day"] + report["reports"]["worst_case_kb_per_day"]
            + report["relay_certificates"]["kb_per_day"], 1)
    report["goal_kb_per_day"] = 100
    report["goal_met_nat_600s"] = report["metered_nat_600s"]["with_reports_worst_case_kb_per_day"] <= 100
    report["machine"] = machine()
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
