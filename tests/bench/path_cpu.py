"""CPU of every process on every path, from /proc: what a path costs beyond the client and the service.

The client and the service are threads of the benchmark itself and the same
on every path, so they are left out; direct TCP therefore costs 0 here.
"""

from __future__ import annotations

from collections.abc import Callable

from tests.bench.bench_setup import SshPath, TunnelPath, cpu_seconds, median
from tests.bench.stunnel_path import StunnelChain

#: process name -> the pids it is now (sshd's session processes come and go with connections)
Processes = Callable[[], dict[str, list[int]]]


def path_processes(tunnel: TunnelPath, ssh: SshPath | None, chain: StunnelChain | None) -> dict[str, Processes]:
    """Per path measured, the processes that carry it."""
    found: dict[str, Processes] = {
        "tunnel": lambda: {"dialer_agent": [tunnel.dialer_pid], "relay": [tunnel.relay_pid],
                           "binder_agent": [tunnel.binder_pid]},
    }
    if chain is not None:
        found["stunnel"] = lambda: {name: [pid] for name, pid in chain.pids.items()}
    if ssh is not None:
        found["ssh"] = lambda: {"sshd": ssh.sshd_session_pids(), "ssh_client": [ssh.client_pid]}
    found["direct"] = lambda: {}
    return found


def cpu_now(processes: dict[str, list[int]]) -> dict[str, float]:
    """utime+stime seconds of each named process (summed over its pids)."""
    return {name: sum(cpu_seconds(pid) for pid in pids) for name, pids in processes.items()}


def measured(processes: Processes, work: Callable[[], object]) -> tuple[object, dict[str, float]]:
    """``work()``'s result and the CPU seconds each process of the path spent while it ran."""
    found = processes()
    before = cpu_now(found)
    result = work()
    after = cpu_now(found)
    return result, {name: after[name] - before[name] for name in found}


def with_total(per_process: dict[str, float]) -> dict[str, float]:
    """The same, plus ``path_total``: the sum over the path's processes."""
    return {**per_process, "path_total": sum(per_process.values())}


def median_per_process(rounds: list[dict[str, float]], digits: int) -> dict[str, float]:
    """Per process (and ``path_total``), the median over rounds."""
    if not rounds:
        return {}
    return {name: round(median([one[name] for one in rounds]), digits) for name in rounds[0]}
