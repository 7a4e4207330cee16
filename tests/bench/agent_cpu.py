"""CPU seconds per GB carried: the binding agent next to the ``ssh -R`` client.

Both processes play the same part: they take a stream off an encrypted
connection and write it into the local service. Each round sends
``--megabytes`` MiB through each path in turn (as throughput.py does) and
reads utime+stime from /proc/PID/stat before and after. The dialer agent,
the relay and sshd are reported too, for the whole picture. Last line: JSON.

    .venv/bin/python tests/bench/agent_cpu.py
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.bench.bench_setup import (  # noqa: E402
    BENCH_ECHO,
    BENCH_SINK,
    SSH_CIPHER,
    SSH_PATH,
    TUNNEL_PATH,
    EchoServer,
    SinkServer,
    cpu_seconds,
    emit,
    int_arg,
    machine,
    median,
    paths,
    ratio,
    send_bulk,
    wait_for_path,
)

# 256 MiB a round: seconds of CPU on every process measured, far above the
# 10 ms resolution of /proc/PID/stat.
DEFAULT_MEGABYTES = 256
DEFAULT_ROUNDS = 3
MIB = 1024 * 1024
GB = 1e9


def cpu_per_gb(pids: dict[str, Callable[[], list[int]]], send: Callable[[], float], total: int) -> dict[str, float]:
    """CPU seconds per GB of each named process group while ``send`` carries ``total`` bytes."""
    groups = {name: find() for name, find in pids.items()}
    before = {name: sum(cpu_seconds(p) for p in group) for name, group in groups.items()}
    send()
    after = {name: sum(cpu_seconds(p) for p in group) for name, group in groups.items()}
    return {name: (after[name] - before[name]) / (total / GB) for name in groups}


def main() -> None:
    megabytes = int_arg("megabytes", DEFAULT_MEGABYTES)
    rounds = int_arg("rounds", DEFAULT_ROUNDS)
    total = megabytes * MIB
    sink, echo = SinkServer(), EchoServer()
    tunnel_rounds: list[dict[str, float]] = []
    ssh_rounds: list[dict[str, float]] = []
    try:
        with paths({BENCH_SINK: sink.port, BENCH_ECHO: echo.port}) as (tunnel, ssh):
            wait_for_path(tunnel.ports[BENCH_ECHO])
            if ssh is not None:
                wait_for_path(ssh.ports[BENCH_ECHO])
            tunnel_pids = {"binder_agent": lambda: [tunnel.binder_pid], "dialer_agent": lambda: [tunnel.dialer_pid],
                           "relay": lambda: [tunnel.relay_pid]}
            for _ in range(rounds):
                tunnel_rounds.append(cpu_per_gb(tunnel_pids, lambda: send_bulk(tunnel.ports[BENCH_SINK], total),
                                                total))
                if ssh is not None:
                    ssh_pids = {"ssh_client": lambda: [ssh.client_pid], "sshd": ssh.sshd_session_pids}
                    ssh_rounds.append(cpu_per_gb(ssh_pids, lambda: send_bulk(ssh.ports[BENCH_SINK], total), total))
    finally:
        sink.close()
        echo.close()

    def medians(found: list[dict[str, float]]) -> dict[str, float]:
        return {name: round(median([r[name] for r in found]), 3) for name in (found[0] if found else {})}

    tunnel_cpu, ssh_cpu = medians(tunnel_rounds), medians(ssh_rounds)
    agent = tunnel_cpu["binder_agent"]
    client = ssh_cpu.get("ssh_client")
    emit({
        "benchmark": "agent_cpu",
        "bytes_per_round": total,
        "rounds": rounds,
        "agent_cpu_s_per_gb": agent,
        "ssh_client_cpu_s_per_gb": client,
        "ratio_vs_ssh": ratio(agent, client) if client else None,
        "goal": "agent_cpu_s_per_gb <= ssh_client_cpu_s_per_gb",
        "tunnel_cpu_s_per_gb": tunnel_cpu,
        "ssh_cpu_s_per_gb": ssh_cpu or None,
        "measured": "binding agent (writes into the service) vs ssh -R client (writes into the service); "
                    "utime+stime from /proc/PID/stat",
        "ssh_cipher": SSH_CIPHER if ssh_rounds else None,
        "ssh_skipped": None if ssh_rounds else "OpenSSH baseline unavailable (needs root and openssh-server)",
        "path": "dialer agent -> relay -> binder agent",
        "paths": {"tunnel": TUNNEL_PATH, "ssh": SSH_PATH},
        "direction": "client uploads to the service",
        "machine": machine(),
    })


if __name__ == "__main__":
    main()
