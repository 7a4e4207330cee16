"""CPU seconds per GB carried, for every process of the tunnel, the stunnel chain and ``ssh -R``.

The headline compares the processes that play the same part, taking a stream
off an encrypted connection and writing it into the local service: the
binding agent, the ``ssh -R`` client and the stunnel chain's server process.
Each path's total over its processes is reported too (the tunnel and the
stunnel chain have three, each with a relay that decrypts and re-encrypts;
ssh has two). Each round sends ``--megabytes`` MiB through each path in turn
(as throughput.py does) and reads utime+stime from /proc/PID/stat before and
after. Last line: JSON.

    .venv/bin/python tests/bench/agent_cpu.py
"""

from __future__ import annotations

import sys
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
    emit,
    int_arg,
    machine,
    paths,
    ratio,
    send_bulk,
    wait_for_path,
)
from tests.bench.path_cpu import measured, median_per_process, path_processes, with_total  # noqa: E402
from tests.bench.stunnel_path import SERVER, STUNNEL_PATH, stunnel_chain, stunnel_fields  # noqa: E402

# 256 MiB a round: seconds of CPU on every process measured, far above the
# 10 ms resolution of /proc/PID/stat.
DEFAULT_MEGABYTES = 256
DEFAULT_ROUNDS = 3
MIB = 1024 * 1024
GB = 1e9


def main() -> None:
    megabytes = int_arg("megabytes", DEFAULT_MEGABYTES)
    rounds = int_arg("rounds", DEFAULT_ROUNDS)
    total = megabytes * MIB
    sink, echo = SinkServer(), EchoServer()
    per_round: dict[str, list[dict[str, float]]] = {}
    try:
        targets = {BENCH_SINK: sink.port, BENCH_ECHO: echo.port}
        with paths(targets) as (tunnel, ssh), stunnel_chain(targets) as (chain, why):
            sinks = {"tunnel": tunnel.ports[BENCH_SINK]}
            wait_for_path(tunnel.ports[BENCH_ECHO])
            if chain is not None:
                wait_for_path(chain.ports[BENCH_ECHO])
                sinks["stunnel"] = chain.ports[BENCH_SINK]
            if ssh is not None:
                wait_for_path(ssh.ports[BENCH_ECHO])
                sinks["ssh"] = ssh.ports[BENCH_SINK]
            processes = path_processes(tunnel, ssh, chain)
            per_round = {name: [] for name in sinks}
            for _ in range(rounds):
                for name, port in sinks.items():
                    _, cpu = measured(processes[name], lambda p=port: send_bulk(p, total))
                    per_round[name].append(with_total({n: s / (total / GB) for n, s in cpu.items()}))
            stunnel = stunnel_fields(chain, why)
    finally:
        sink.close()
        echo.close()

    cpu = {name: median_per_process(found, 3) for name, found in per_round.items()}
    path_total = {name: per["path_total"] for name, per in cpu.items()}
    agent = cpu["tunnel"]["binder_agent"]
    client = cpu["ssh"]["ssh_client"] if "ssh" in cpu else None
    stunnel_server = cpu["stunnel"][SERVER] if "stunnel" in cpu else None
    emit({
        "benchmark": "agent_cpu",
        "bytes_per_round": total,
        "rounds": rounds,
        "agent_cpu_s_per_gb": agent,
        "ssh_client_cpu_s_per_gb": client,
        "ratio_vs_ssh": ratio(agent, client) if client else None,
        "stunnel_server_cpu_s_per_gb": stunnel_server,
        "ratio_vs_stunnel_server": ratio(agent, stunnel_server) if stunnel_server else None,
        "goal": "agent_cpu_s_per_gb <= ssh_client_cpu_s_per_gb; issue 14: path_cpu_ratio_vs_stunnel <= 1.0",
        "tunnel_cpu_s_per_gb": {n: v for n, v in cpu["tunnel"].items() if n != "path_total"},
        "ssh_cpu_s_per_gb": {n: v for n, v in cpu["ssh"].items() if n != "path_total"} if "ssh" in cpu else None,
        "stunnel_cpu_s_per_gb": ({n: v for n, v in cpu["stunnel"].items() if n != "path_total"}
                                 if "stunnel" in cpu else None),
        "path_cpu_s_per_gb": path_total,
        "path_cpu_ratio_vs_stunnel": ratio(path_total["tunnel"], path_total["stunnel"]) if "stunnel" in cpu else None,
        "path_cpu_ratio_vs_ssh": ratio(path_total["tunnel"], path_total["ssh"]) if "ssh" in cpu else None,
        "rounds_path_cpu_s_per_gb": {n: [round(r["path_total"], 3) for r in found] for n, found in per_round.items()},
        "measured": "utime+stime from /proc/PID/stat of every process on each path, per GB carried; the binding "
                    "agent, the ssh -R client and the stunnel server process each write into the service",
        "ssh_cipher": SSH_CIPHER if "ssh" in cpu else None,
        "ssh_skipped": None if "ssh" in cpu else "OpenSSH baseline unavailable (needs root and openssh-server)",
        **stunnel,
        "path": "dialer agent -> relay -> binder agent",
        "paths": {"tunnel": TUNNEL_PATH, "stunnel": STUNNEL_PATH, "ssh": SSH_PATH},
        "direction": "client uploads to the service",
        "machine": machine(),
    })


if __name__ == "__main__":
    main()
