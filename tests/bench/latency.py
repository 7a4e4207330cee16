"""Small request/response round trips through the tunnel, next to the stunnel chain, ssh -R and direct TCP.

One client connection per path and round sends a ``--size``-byte request to
an echo service and waits for the whole answer before the next, ``--requests``
times (TCP_NODELAY on the client and the service). The paths take turns for
``--rounds`` rounds; per path the result is the median over rounds of each
round's p50 and p99, in microseconds, and of the CPU (utime+stime from
/proc) each process on the path spent per round trip while they were timed.
Last line: JSON.

    .venv/bin/python tests/bench/latency.py
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
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
from tests.bench.path_cpu import Processes, measured, median_per_process, path_processes, with_total  # noqa: E402
from tests.bench.stunnel_path import STUNNEL_PATH, stunnel_chain, stunnel_fields  # noqa: E402

# A Modbus/TCP request or a small RPC: tens of bytes.
DEFAULT_SIZE = 64
# 1,000 round trips per round: enough samples for a p99, about a second a path.
DEFAULT_REQUESTS = 1000
# Round trips before timing starts, so connection set-up is not measured.
WARMUP_REQUESTS = 20
DEFAULT_ROUNDS = 5


def round_trips(port: int, size: int, requests: int, processes: Processes) -> tuple[list[float], dict[str, float]]:
    """Seconds per round trip of ``size`` bytes through ``port`` to the echo service, and the path's CPU per trip."""
    payload = os.urandom(size)
    samples: list[float] = []
    with connect(port) as sock:

        def one() -> None:
            started = time.perf_counter()
            sock.sendall(payload)
            if recv_exactly(sock, size) != payload:
                raise RuntimeError("the echo came back different")
            samples.append(time.perf_counter() - started)

        def timed() -> None:
            for _ in range(requests):
                one()

        for _ in range(WARMUP_REQUESTS):
            one()
        del samples[:]
        _, cpu = measured(processes, timed)
    return samples, with_total({name: seconds * 1e6 / requests for name, seconds in cpu.items()})


def main() -> None:
    size = int_arg("size", DEFAULT_SIZE)
    requests = int_arg("requests", DEFAULT_REQUESTS)
    rounds = int_arg("rounds", DEFAULT_ROUNDS)
    echo = EchoServer()
    found: dict[str, list[tuple[list[float], dict[str, float]]]] = {}
    try:
        with paths({BENCH_ECHO: echo.port}) as (tunnel, ssh), stunnel_chain({BENCH_ECHO: echo.port}) as (chain, why):
            ports = {"tunnel": tunnel.ports[BENCH_ECHO]}
            if chain is not None:
                ports["stunnel"] = chain.ports[BENCH_ECHO]
            if ssh is not None:
                ports["ssh"] = ssh.ports[BENCH_ECHO]
            ports["direct"] = echo.port
            for port in ports.values():
                wait_for_path(port)
            processes = path_processes(tunnel, ssh, chain)
            measures: dict[str, Callable[[], tuple[list[float], dict[str, float]]]] = {
                name: (lambda p=port, n=name: round_trips(p, size, requests, processes[n]))
                for name, port in ports.items()}
            found = alternate(rounds, measures)
            stunnel = stunnel_fields(chain, why)
    finally:
        echo.close()
    micro = {name: [[s * 1e6 for s in one] for one, _ in runs] for name, runs in found.items()}
    cpu = {name: median_per_process([c for _, c in runs], 1) for name, runs in found.items()}
    p50 = {name: round(median([percentile(one, 0.50) for one in runs]), 1) for name, runs in micro.items()}
    p99 = {name: round(median([percentile(one, 0.99) for one in runs]), 1) for name, runs in micro.items()}
    has_ssh = "ssh" in micro

    def versus(values: dict[str, float], other: str) -> float | None:
        return ratio(values["tunnel"], values[other]) if other in values else None

    total = {name: per["path_total"] for name, per in cpu.items()}
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
        "p50_ratio_vs_ssh": versus(p50, "ssh"),
        "p99_ratio_vs_ssh": versus(p99, "ssh"),
        "stunnel_p50_us": p50.get("stunnel"),
        "stunnel_p99_us": p99.get("stunnel"),
        "p50_ratio_vs_stunnel": versus(p50, "stunnel"),
        "p99_ratio_vs_stunnel": versus(p99, "stunnel"),
        "tunnel_cpu_us_per_round_trip": total["tunnel"],
        "stunnel_cpu_us_per_round_trip": total.get("stunnel"),
        "ssh_cpu_us_per_round_trip": total.get("ssh"),
        "cpu_ratio_vs_stunnel": versus(total, "stunnel"),
        "cpu_ratio_vs_ssh": versus(total, "ssh"),
        "goal": "tunnel p50 and p99 no worse than ssh (ratios <= 1.0); "
                "issue 14: cpu_ratio_vs_stunnel <= 1.5, p50_ratio_vs_stunnel <= 2 on a quiet machine",
        "cpu_us_per_round_trip": cpu,
        "cpu_measured": "utime+stime from /proc/PID/stat of every process on the path while the round trips "
                        "were timed, per round trip; path_total is their sum; the client and the echo service "
                        "(threads of the benchmark, the same on every path) are not counted",
        "rounds_p50_us": {n: [round(percentile(one, 0.5), 1) for one in runs] for n, runs in micro.items()},
        "rounds_p99_us": {n: [round(percentile(one, 0.99), 1) for one in runs] for n, runs in micro.items()},
        "rounds_cpu_us_per_round_trip": {n: [round(c["path_total"], 1) for _, c in runs] for n, runs in found.items()},
        "ssh_cipher": SSH_CIPHER if has_ssh else None,
        "ssh_skipped": None if has_ssh else "OpenSSH baseline unavailable (needs root and openssh-server)",
        **stunnel,
        "path": "dialer agent -> relay -> binder agent",
        "paths": {"tunnel": TUNNEL_PATH, "stunnel": STUNNEL_PATH, "ssh": SSH_PATH, "direct": DIRECT_PATH},
        "machine": machine(),
    })


if __name__ == "__main__":
    main()
