"""Small request/response round trips through the tunnel, next to ssh -R and direct TCP.

One client connection per path and round sends a ``--size``-byte request to
an echo service and waits for the whole answer before the next, ``--requests``
times (TCP_NODELAY on the client and the service). The paths take turns for
``--rounds`` rounds; per path the result is the median over rounds of each
round's p50 and p99, in microseconds. Last line: JSON.

    .venv/bin/python tests/bench/latency.py
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.bench.bench_setup import (  # noqa: E402
    BENCH_ECHO,
    DIRECT_PATH,
    SSH_CIPHER,
    SSH_PATH,
    TUNNEL_PATH,
    EchoServer,
    alternate,
    connect,
    emit,
    int_arg,
    machine,
    median,
    paths,
    percentile,
    ratio,
    recv_exactly,
    wait_for_path,
)

# A Modbus/TCP request or a small RPC: tens of bytes.
DEFAULT_SIZE = 64
# 1,000 round trips per round: enough samples for a p99, about a second a path.
DEFAULT_REQUESTS = 1000
# Round trips before timing starts, so connection set-up is not measured.
WARMUP_REQUESTS = 20
DEFAULT_ROUNDS = 5


def round_trips(port: int, size: int, requests: int) -> list[float]:
    """Seconds per round trip of ``size`` bytes through ``port`` to the echo service."""
    payload = os.urandom(size)
    samples: list[float] = []
    with connect(port) as sock:
        for i in range(WARMUP_REQUESTS + requests):
            started = time.perf_counter()
            sock.sendall(payload)
            if recv_exactly(sock, size) != payload:
                raise RuntimeError("the echo came back different")
            if i >= WARMUP_REQUESTS:
                samples.append(time.perf_counter() - started)
    return samples


def main() -> None:
    size = int_arg("size", DEFAULT_SIZE)
    requests = int_arg("requests", DEFAULT_REQUESTS)
    rounds = int_arg("rounds", DEFAULT_ROUNDS)
    echo = EchoServer()
    samples: dict[str, list[list[float]]] = {}
    try:
        with paths({BENCH_ECHO: echo.port}) as (tunnel, ssh):
            ports = {"tunnel": tunnel.ports[BENCH_ECHO]}
            if ssh is not None:
                ports["ssh"] = ssh.ports[BENCH_ECHO]
            ports["direct"] = echo.port
            for port in ports.values():
                wait_for_path(port)
            measures = {name: (lambda p=port: round_trips(p, size, requests)) for name, port in ports.items()}
            samples = alternate(rounds, measures)
    finally:
        echo.close()
    micro = {name: [[s * 1e6 for s in one] for one in runs] for name, runs in samples.items()}
    p50 = {name: round(median([percentile(one, 0.50) for one in runs]), 1) for name, runs in micro.items()}
    p99 = {name: round(median([percentile(one, 0.99) for one in runs]), 1) for name, runs in micro.items()}
    has_ssh = "ssh" in micro
    emit({
        "benchmark": "latency",
        "request_bytes": size,
        "requests_per_round": requests,
        "rounds": rounds,
        "tunnel_p50_us": p50["tunnel"],
        "tunnel_p99_us": p99["tunnel"],
        "ssh_p50_us": p50.get("ssh"),
        "ssh_p99_us": p99.get("ssh"),
        "direct_p50_us": p50["direct"],
        "direct_p99_us": p99["direct"],
        "p50_ratio_vs_ssh": ratio(p50["tunnel"], p50["ssh"]) if has_ssh else None,
        "p99_ratio_vs_ssh": ratio(p99["tunnel"], p99["ssh"]) if has_ssh else None,
        "goal": "tunnel p50 and p99 no worse than ssh (ratios <= 1.0)",
        "rounds_p50_us": {n: [round(percentile(one, 0.5), 1) for one in runs] for n, runs in micro.items()},
        "rounds_p99_us": {n: [round(percentile(one, 0.99), 1) for one in runs] for n, runs in micro.items()},
        "ssh_cipher": SSH_CIPHER if has_ssh else None,
        "ssh_skipped": None if has_ssh else "OpenSSH baseline unavailable (needs root and openssh-server)",
        "path": "dialer agent -> relay -> binder agent",
        "paths": {"tunnel": TUNNEL_PATH, "ssh": SSH_PATH, "direct": DIRECT_PATH},
        "machine": machine(),
    })


if __name__ == "__main__":
    main()
