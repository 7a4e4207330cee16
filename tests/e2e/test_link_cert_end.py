"""A link between relays is never used past a relay certificate's end, with real processes and relay certificates
of seconds (the controller's own ``relay_cert_lifetime`` setting, shortened past the command line's 300 s floor).

Relay A drains a link by the certificates it was opened with: new dials go over a new link (whose handshake sees
the renewed certificates), a dial held at the drain point keeps its link until it ends, and the drained link then
closes before the certificates' end. Relay B closes a link at the end of the certificate its dialer was admitted
with, whoever the dialer is.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
import socket
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509

from controller.relay.link_client import link_tls_context, open_link
from shared.trust import cert_not_after
from tests.e2e.cross_relay_harness import RoleController, audit_events, echoes, store_rows, two_relays
from tests.e2e.harness import EchoServer, Process, round_trip, wait_until
from tests.e2e.test_relay_renewal_faketime import LIBFAKETIME, SkewedRelay

#: A controller whose relay certificates live ``argv[1]`` seconds (the settings' relay_cert_lifetime).
SHORT_LIFE_RUNNER = r"""
import dataclasses, sys
from controller import cli
from shared.event_loop import run
args = cli.build_parser().parse_args(sys.argv[2:])
settings = dataclasses.replace(cli.settings_from_args(args), relay_cert_lifetime=int(sys.argv[1]))
run(cli.serve(settings), args.event_loop)
"""
#: Relay certificates' life in the drain test: long enough for two relays, two agents and the first dial to
#: come up under load before the first drain point (3/4: 36 s), and for the drain to leave room before the end
#: (between 2.4 and 12 s) in most draws; short enough for a test of about a minute.
DRAIN_LIFE = 48
#: A drained link whose dial ended this close to the certificate's end may be closed by the end rather than by
#: the drain (its poll is 1 s; a loaded machine adds more); earlier, the drain must close it.
DRAIN_ROOM = 4.0
#: Relay certificates' life in the accepting end's test: only the link itself has to come up before its end.
END_LIFE = 12
#: New dials are tried this often while waiting for the drain, and for at most this many lives of a certificate.
DIAL_INTERVAL = 0.5
DRAIN_WAIT_LIVES = 3
#: A drained link whose last dial ended is closed within the drain poll (1 s) and a loaded machine's slack.
CLOSED_WITHIN = 10.0
#: Relay B closes a link this long after its dialer's certificate ended at most (a timer, and load).
END_SLACK = 5.0
#: Seconds a held dial waits for its echo.
ECHO_TIMEOUT = 20.0
#: The date a link's close reason names, to the second.
ENDS_AT = re.compile(r"end(?:s|ed) at (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) UTC")


class ShortLivedController(RoleController):
    """``serve --role controller`` issuing relay certificates of ``life`` seconds."""

    def __init__(self, data: Path, life: int) -> None:
        self.data = data
        self.process = Process([sys.executable, "-c", SHORT_LIFE_RUNNER, str(life), "serve", "--data", str(data),
                                "--listen", "127.0.0.1:0", "--role", "controller"])
        line = self.process.wait_for_line("ready on https://")
        self.url = line.split("ready on ", 1)[1].split()[0]
        self.ctl_config = data / "outpostctl.toml"


def dial_links(controller: RoleController) -> list[tuple[float, str]]:
    """(time, link id) of every dial relay A served over a link, in order (B's rows name the link's relay)."""
    rows = store_rows(controller, "SELECT time, fields FROM audit WHERE event = 'dial_served' ORDER BY id")
    return [(when, fields["gateway_tunnel"]) for when, text in rows
            for fields in [json.loads(text)] if "link" not in fields]


def closed_rows(controller: RoleController, relay: str) -> list[tuple[float, dict]]:
    rows = store_rows(controller, "SELECT time, fields FROM audit WHERE event = 'link_closed' ORDER BY id")
    return [(when, fields) for when, text in rows for fields in [json.loads(text)] if fields.get("relay") == relay]


@pytest.mark.slow
def test_a_link_drains_at_its_certificates_drain_point_keeps_its_dial_and_new_dials_go_over_a_new_link(
        tmp_path: Path, echo_server: EchoServer) -> None:
    with two_relays(tmp_path, ShortLivedController(tmp_path / "controller", DRAIN_LIFE)) as pair:
        controller = pair.controller
        port = pair.plc_across(tmp_path, echo_server.port)
        held = socket.create_connection(("127.0.0.1", port), timeout=ECHO_TIMEOUT)
        pair.held.append(held)
        assert echoes(held, b"1")
        first = wait_until(lambda: dial_links(controller), what="the held dial's row")[0][1]

        # New dials, one every DIAL_INTERVAL, until one goes over another link: the first one drained.
        deadline = time.monotonic() + DRAIN_WAIT_LIVES * DRAIN_LIFE
        while not any(link != first for _, link in dial_links(controller)):
            assert time.monotonic() < deadline, "no dial went over a new link within three certificate lives"
            assert round_trip(port, b"new dial", timeout=ECHO_TIMEOUT) == b"new dial"
            time.sleep(DIAL_INTERVAL)
        # The dial held on the drained link still carries bytes, and the link is not closed while it does.
        assert echoes(held, b"2")
        assert not [f for _, f in closed_rows(controller, "ra") if f["correlation"] == first]
        held.close()
        drained_seen = time.time()

        closed_at, row = wait_until(lambda: next(((w, f) for w, f in closed_rows(controller, "ra")
                                                  if f["correlation"] == first), None),
                                    timeout=CLOSED_WITHIN, what="relay A closing the drained link")
        assert row["peer"] == "rb" and row["serial"]
        found = ENDS_AT.search(row["reason"])
        assert found, row["reason"]
        ends = dt.datetime.strptime(found.group(1), "%Y-%m-%d %H:%M:%S").replace(tzinfo=dt.UTC).timestamp() + 1
        if "past its drain point" in row["reason"]:
            # Closed once its last dial ended, before the certificate's end (to the second it names).
            assert "new dials go over a new link" in row["reason"]
            assert closed_at < ends
            reason = "past its drain point"
        else:
            # The drain point is drawn up to 95 % of the life: when it fell so late that the held dial ended
            # within DRAIN_ROOM of the end, the end may come first. Any earlier drain must close the link itself.
            assert "ended at" in row["reason"] and "never used past it" in row["reason"], row["reason"]
            assert ends - drained_seen < DRAIN_ROOM, (
                f"the link was drained {ends - drained_seen:.1f} s before its end, yet not closed when its dial ended")
            reason = "ended at"
        # No dial went over the drained link after its end, and new dials still work.
        assert all(when < ends for when, link in dial_links(controller) if link == first)
        assert round_trip(port, b"after the drain", timeout=ECHO_TIMEOUT) == b"after the drain"
        assert dial_links(controller)[-1][1] != first
        # Relay B recorded the close with A's reason.
        wait_until(lambda: any(reason in f["reason"] for _, f in closed_rows(controller, "rb")),
                   what="relay B's link_closed row")


def test_the_accepting_relay_closes_a_link_when_its_dialers_certificate_ends(tmp_path: Path) -> None:
    with two_relays(tmp_path, ShortLivedController(tmp_path / "controller", END_LIFE)) as pair:
        controller, relay_b, relay_a = pair.controller, pair.relay_b, pair.relay_a
        # Relay A's certificate and key as they are now; A stops, so nothing renews or drains this link:
        # a dialer that keeps a link (a stolen key, say) meets only B's own check.
        relay_a.process.stop()
        cert_pem = (relay_a.data / "tls" / "server.pem").read_text()
        key_pem = (relay_a.data / "tls" / "server.key").read_bytes()
        ca_pem = (relay_a.data / "ca" / "ca.pem").read_text()
        not_after = cert_not_after(x509.load_pem_x509_certificate(cert_pem.encode())).timestamp()
        assert time.time() < not_after, "relay A's certificate ended before the link could open"

        async def hold_link() -> tuple[float, str]:
            session, task = await open_link("rb", relay_b.address, link_tls_context(ca_pem), cert_pem, key_pem,
                                            "t-held")
            try:
                await asyncio.wait_for(session.closed.wait(), not_after - time.time() + END_SLACK)
                closed_at = time.time()
                assert session.close_reason is not None
                return closed_at, session.close_reason[1]
            finally:
                await session.close()
                await asyncio.gather(task, return_exceptions=True)

        closed_at, reason = asyncio.run(hold_link())
        assert not_after <= closed_at <= not_after + END_SLACK
        assert "the certificate of relay ra ended at" in reason and "never used past it" in reason
        wait_until(lambda: any("the certificate of relay ra ended" in f["reason"]
                               for _, f in closed_rows(controller, "rb")), what="relay B's link_closed row")
        assert len(audit_events(controller, "link_connected")) == 1


#: Seconds relay A's clock jumps ahead in the end test: past both relays' certificates (END_JUMP_LIFE) and any
#: renewal of them, so that to A every certificate of B has ended while nothing else moved.
END_JUMP = 120
#: Relay certificates' life in that test. Long enough that both relays, the agents and the held dial come up
#: before relay A's first drain point (3/4 of it at the earliest: 45 s) on a loaded machine: a drain before the
#: jump opens a second link, and dials served over it would read as a link used past its end. Short enough
#: for END_JUMP to stay past every certificate either relay holds meanwhile, renewals included.
END_JUMP_LIFE = 60


@pytest.mark.slow
@pytest.mark.skipif(LIBFAKETIME is None, reason="faketime is not installed (scripts/setup installs it)")
def test_past_a_certificates_end_the_dialing_relay_uses_no_link_and_closes_the_one_carrying_a_dial(
        tmp_path: Path, echo_server: EchoServer) -> None:
    with two_relays(tmp_path, ShortLivedController(tmp_path / "controller", END_JUMP_LIFE),
                    relay_a_kind=SkewedRelay) as pair:
        controller, relay_a = pair.controller, pair.relay_a
        assert isinstance(relay_a, SkewedRelay)
        port = pair.plc_across(tmp_path, echo_server.port)
        held = socket.create_connection(("127.0.0.1", port), timeout=ECHO_TIMEOUT)
        pair.held.append(held)
        assert echoes(held, b"1")
        first = wait_until(lambda: dial_links(controller), what="the held dial's row")[0][1]

        # To relay A, every certificate of relay B has now ended: no new dial goes over the open link (nor a
        # new one, whose handshake meets B's ended certificate), and the link carrying the held dial closes.
        relay_a.skew(END_JUMP)
        wait_until(lambda: round_trip_fails(port), timeout=ECHO_TIMEOUT, what="dials refused past the end")
        assert all(link == first for _, link in dial_links(controller))
        served_before = len(dial_links(controller))
        held.settimeout(END_JUMP_LIFE + ECHO_TIMEOUT)
        try:
            assert held.recv(1) == b"", "the held dial outlived its link's certificate"
        except ConnectionError:
            pass
        held.close()
        row = wait_until(lambda: next((f for _, f in closed_rows(controller, "ra") if f["correlation"] == first),
                                      None), what="relay A's link_closed row")
        assert "ended at" in row["reason"] and "never used past it" in row["reason"], row["reason"]
        assert len(dial_links(controller)) == served_before

        # Its clock right again, relay A dials over a new link.
        relay_a.skew(0)
        wait_until(lambda: not round_trip_fails(port), timeout=ECHO_TIMEOUT, what="a dial over a new link")
        assert dial_links(controller)[-1][1] != first
        # Its clock ahead of the controller's, relay A renewed once (each certificate it gets is due at once by
        # its clock), not once a second.
        assert sum("renewed the listener's certificate" in line for line in relay_a.process.lines) <= 2


def round_trip_fails(port: int) -> bool:
    try:
        return round_trip(port, b"ping", timeout=ECHO_TIMEOUT) != b"ping"
    except OSError:
        return True
