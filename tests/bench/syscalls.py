"""System calls and context switches per 64-byte round trip, per process: the tunnel next to the stunnel chain.

One client connection per path sends ``--size`` bytes to an echo service and
waits for the whole answer, ``--requests`` times, while ``strace -c -f`` is
attached to every process of the path (each thread followed). strace makes
every system call slower, so this counts, it does not time: the latency
benchmark times without it. Context switches (the difference of
``voluntary_ctxt_switches`` and ``nonvoluntary_ctxt_switches`` over every
thread in /proc/PID/task), minor page faults and user and system CPU
(/proc/PID/stat, sampled at the 10 ms tick: 5 us per round trip at 2,000) are
taken in a pass before, without strace. Last line: JSON.

    .venv/bin/python tests/bench/syscalls.py [--requests 2000]
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.bench.bench_setup import (  # noqa: E402
    BENCH_ECHO,
    EchoServer,
    connect,
    emit,
    int_arg,
    machine,
    paths,
    recv_exactly,
    wait_for_path,
)
from tests.bench.path_cpu import path_processes  # noqa: E402
from tests.bench.stunnel_path import stunnel_chain, stunnel_fields  # noqa: E402

DEFAULT_SIZE = 64
# 2,000 round trips: a count per round trip to three digits, about two seconds a path under strace.
DEFAULT_REQUESTS = 2000
# Round trips before counting, so connection set-up is not counted.
WARMUP_REQUESTS = 50
# strace needs a moment to attach to every thread before the counted trips start.
ATTACH_SECONDS = 1.0
# strace writes its table within this after SIGINT; longer means it hung.
STRACE_STOP_TIMEOUT = 20.0


def strace_table(path: Path) -> tuple[dict[str, int], int]:
    """``strace -c`` output: system call name -> calls, and how many calls failed (EAGAIN and the like)."""
    calls: dict[str, int] = {}
    failed = 0
    for line in path.read_text().splitlines():
        fields = line.split()
        # % time, seconds, usecs/call, calls, [errors,] syscall
        if len(fields) in (5, 6) and fields[3].isdigit() and fields[-1] != "total":
            calls[fields[-1]] = int(fields[3])
            failed += int(fields[4]) if len(fields) == 6 else 0
    return calls, failed


def stat_counts(pid: int) -> tuple[int, float, float]:
    """Minor page faults, user and system CPU seconds of the whole process so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # After the command name: minflt is field 10, utime 14, stime 15 (1-based, state being 3).
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[7]), int(fields[11]) / tick, int(fields[12]) / tick


def context_switches(pid: int) -> tuple[int, int]:
    voluntary = involuntary = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            for line in (task / "status").read_text().splitlines():
                if line.startswith("voluntary_ctxt_switches:"):
                    voluntary += int(line.split()[1])
                elif line.startswith("nonvoluntary_ctxt_switches:"):
                    involuntary += int(line.split()[1])
        except FileNotFoundError:
            continue
    return voluntary, involuntary


def exchange(sock: object, payload: bytes, count: int) -> None:
    for _ in range(count):
        sock.sendall(payload)  # type: ignore[attr-defined]
        if recv_exactly(sock, len(payload)) != payload:  # type: ignore[arg-type]
            raise RuntimeError("the echo came back different")


def counted(port: int, pids: dict[str, int], size: int, requests: int, workdir: Path) -> dict[str, object]:
    """Per process: system calls per round trip by name, and context switches per round trip."""
    payload = os.urandom(size)
    found: dict[str, object] = {}
    with connect(port) as sock:
        exchange(sock, payload, WARMUP_REQUESTS)
        before = {name: context_switches(pid) for name, pid in pids.items()}
        stat_before = {name: stat_counts(pid) for name, pid in pids.items()}
        exchange(sock, payload, requests)
        after = {name: context_switches(pid) for name, pid in pids.items()}
        stat = {name: [b - a for a, b in zip(stat_before[name], stat_counts(pid), strict=True)] for name, pid in pids.items()}
        tracers = {}
        for name, pid in pids.items():
            out = workdir / f"{name}.strace"
            tracers[name] = (out, subprocess.Popen(
                ["strace", "-c", "-f", "-o", str(out), "-p", str(pid)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(ATTACH_SECONDS)
        exchange(sock, payload, requests)
        for _, tracer in tracers.values():
            tracer.send_signal(signal.SIGINT)
        for name, (out, tracer) in tracers.items():
            tracer.wait(STRACE_STOP_TIMEOUT)
            table, failed = strace_table(out)
            total = sum(table.values())
            found[name] = {
                "syscalls_per_round_trip": round(total / requests, 2),
                "failed_syscalls_per_round_trip": round(failed / requests, 2),
                "by_name": {call: round(n / requests, 2) for call, n in
                            sorted(table.items(), key=lambda item: -item[1]) if n / requests >= 0.01},
                "voluntary_switches_per_round_trip": round((after[name][0] - before[name][0]) / requests, 2),
                "involuntary_switches_per_round_trip": round((after[name][1] - before[name][1]) / requests, 2),
                "minor_faults_per_round_trip": round(stat[name][0] / requests, 2),
                "user_cpu_us_per_round_trip": round(stat[name][1] * 1e6 / requests, 1),
                "system_cpu_us_per_round_trip": round(stat[name][2] * 1e6 / requests, 1),
            }
    return found


def main() -> None:
    if shutil.which("strace") is None:
        raise SystemExit("strace is not installed: apt-get install strace")
    size = int_arg("size", DEFAULT_SIZE)
    requests = int_arg("requests", DEFAULT_REQUESTS)
    echo = EchoServer()
    results: dict[str, object] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="outpost-syscalls-") as tmp, \
                paths({BENCH_ECHO: echo.port}, with_ssh=False) as (tunnel, _), \
                stunnel_chain({BENCH_ECHO: echo.port}) as (chain, why):
            ports = {"tunnel": tunnel.ports[BENCH_ECHO]}
            if chain is not None:
                ports["stunnel"] = chain.ports[BENCH_ECHO]
            processes = path_processes(tunnel, None, chain)
            for port in ports.values():
                wait_for_path(port)
            for name, port in ports.items():
                pids = {proc: found[0] for proc, found in processes[name]().items()}
                results[name] = counted(port, pids, size, requests, Path(tmp))
            stunnel = stunnel_fields(chain, why)
    finally:
        echo.close()

    def path_total(name: str) -> float | None:
        per = results.get(name)
        return round(sum(p["syscalls_per_round_trip"] for p in per.values()), 2) if per else None  # type: ignore

    emit({
        "benchmark": "syscalls",
        "request_bytes": size,
        "requests": requests,
        "tunnel_syscalls_per_round_trip": path_total("tunnel"),
        "stunnel_syscalls_per_round_trip": path_total("stunnel"),
        "per_process": results,
        "counted": "strace -c -f on each process while the round trips ran (after a warm-up); "
                   "context switches from /proc/PID/task/*/status, minor faults and user/system CPU from /proc/PID/stat "
                   "in a pass without strace",
        **{key: value for key, value in stunnel.items() if key == "stunnel_skipped"},
        "load_average": os.getloadavg(),
        "machine": machine(),
    })


if __name__ == "__main__":
    main()
