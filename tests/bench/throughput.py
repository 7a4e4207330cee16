"""Bulk throughput through the tunnel, next to the stunnel chain, an OpenSSH reverse tunnel and direct TCP.

One client connection sends ``--megabytes`` MiB to a sink service, which
answers with the byte count once it has read them all; the time runs from
connect to that answer. The paths (see bench_setup and stunnel_path) take turns for
``--rounds`` rounds; the result is the median per path. Last line: JSON.

    .venv/bin/python tests/bench/throughput.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.bench.bench_setup import (  # noqa: E402
    BENCH_ECHO,
    BENCH_SINK,
    DIRECT_PATH,
    SSH_CIPHER,
    SSH_PATH,
    TUNNEL_PATH,
    EchoServer,
    SinkServer,
    alternate,
    emit,
    int_arg,
    machine,
    median,
    paths,
    ratio,
    send_bulk,
    wait_for_path,
)
from tests.bench.stunnel_path import STUNNEL_PATH, stunnel_chain, stunnel_fields  # noqa: E402

# 256 MiB per transfer: a second or more on every path here, so start-up and
# the final round trip are a small part of the time.
DEFAULT_MEGABYTES = 256
# Five alternating rounds: the median shrugs off one disturbed round.
DEFAULT_ROUNDS = 5
MIB = 1024 * 1024


def main() -> None:
    megabytes = int_arg("megabytes", DEFAULT_MEGABYTES)
    rounds = int_arg("rounds", DEFAULT_ROUNDS)
    total = megabytes * MIB
    sink, echo = SinkServer(), EchoServer()
    try:
        targets = {BENCH_SINK: sink.port, BENCH_ECHO: echo.port}
        with paths(targets) as (tunnel, ssh), stunnel_chain(targets) as (chain, why):
            wait_for_path(tunnel.ports[BENCH_ECHO])
            measures = {"tunnel": lambda: send_bulk(tunnel.ports[BENCH_SINK], total)}
            if chain is not None:
                wait_for_path(chain.ports[BENCH_ECHO])
                measures["stunnel"] = lambda: send_bulk(chain.ports[BENCH_SINK], total)
            if ssh is not None:
                wait_for_path(ssh.ports[BENCH_ECHO])
                measures["ssh"] = lambda: send_bulk(ssh.ports[BENCH_SINK], total)
            measures["direct"] = lambda: send_bulk(sink.port, total)
            seconds = alternate(rounds, measures)
            stunnel = stunnel_fields(chain, why)
    finally:
        sink.close()
        echo.close()
    mbps = {name: [total * 8 / s / 1e6 for s in values] for name, values in seconds.items()}
    medians = {name: round(median(values), 1) for name, values in mbps.items()}
    emit({
        "benchmark": "throughput",
        "bytes_per_transfer": total,
        "rounds": rounds,
        "tunnel_mbps": medians["tunnel"],
        "ssh_mbps": medians.get("ssh"),
        "direct_mbps": medians["direct"],
        "ratio_vs_ssh": ratio(medians["tunnel"], medians["ssh"]) if "ssh" in medians else None,
        "ratio_vs_direct": ratio(medians["tunnel"], medians["direct"]),
        "stunnel_mbps": medians.get("stunnel"),
        "ratio_vs_stunnel": ratio(medians["tunnel"], medians["stunnel"]) if "stunnel" in medians else None,
        "goal": "ratio_vs_ssh >= 1.0; issue 14: ratio_vs_stunnel >= 1.0",
        "rounds_mbps": {name: [round(v, 1) for v in values] for name, values in mbps.items()},
        "ssh_cipher": SSH_CIPHER if "ssh" in medians else None,
        "ssh_skipped": None if "ssh" in medians else "OpenSSH baseline unavailable (needs root and openssh-server)",
        **stunnel,
        "path": "dialer agent -> relay -> binder agent",
        "paths": {"tunnel": TUNNEL_PATH, "stunnel": STUNNEL_PATH, "ssh": SSH_PATH, "direct": DIRECT_PATH},
        "direction": "client uploads to the service",
        "machine": machine(),
    })


if __name__ == "__main__":
    main()
