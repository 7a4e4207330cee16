"""One relay, many tunnels: memory and CPU per idle tunnel, a reconnect storm, a graceful stop.

One relay process (``outpost-controller serve`` on 127.0.0.1) and one load
process (this one) holding ``--tunnels`` authenticated idle tunnels, each kept
by the agent's own ``TunnelSupervisor`` (real TLS, real AUTH with its own key
and certificate, real keepalives and backoff). Measured:

* the relay's resident memory per idle tunnel above its baseline, and its idle
  CPU (share of one core) while the tunnels only keep alive;
* how long the fleet took to connect, and the relay's CPU per admitted tunnel;
* a reconnect storm: the relay is stopped (its graceful stop timed) and started
  again on the same port; how long until every tunnel is back, how many
  attempts failed once the new relay listened, its peak admission rate;
* a last graceful stop under the full fleet.

Identities are enrolled through a fast path that still issues real
certificates: before the relay starts, this process opens the data directory
with the controller's own code and redeems one real token per gateway through
``Enrollment.enroll`` (token check, CA signature, store rows, audit), without
20,000 HTTPS requests. All tunnels come from 127.0.0.1, so the relay's cap per
source address is raised to the fleet size (one address stands in for 10,000).

    .venv/bin/python tests/bench/fleet_scale.py [--tunnels 10000]

Prints one JSON object as its last line. Loopback only; every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cryptography.hazmat.primitives import serialization  # noqa: E402

from agent.identity.csr import build_csr  # noqa: E402
from agent.identity.ephemeral import EphemeralKeyStore  # noqa: E402
from agent.tunnel.client import TunnelCredentials, TunnelOptions  # noqa: E402
from agent.tunnel.supervisor import TunnelSupervisor  # noqa: E402

#: The issue's figure: one relay process holds this many idle tunnels.
DEFAULT_TUNNELS = 10_000
#: Tunnels connecting at once while the fleet is first brought up (the storm is not paced); ``--ramp`` sets it.
#: 128 keeps the relay's event loop busy (its CPU per admission is lowest when events arrive in batches).
RAMP_IN_FLIGHT = 128
#: Every phase that waits for the fleet gives up after this long (the goal is 60 s); the storm then
#: reports how many came back, second by second, and why the others are still down.
PHASE_TIMEOUT = 180.0
READY_TIMEOUT = 60.0
#: A graceful stop is given this long before the relay is killed (the goal is 2 s).
STOP_TIMEOUT = 60.0
#: How often a stopping relay is checked for its exit: 1 % of the 2 s goal.
STOP_POLL = 0.02
#: Seconds for the relay's memory and CPU to settle before and after the fleet connects.
SETTLE = 5.0
#: The window over which idle CPU is measured.
IDLE_WINDOW = 10.0
#: How often the fleet's connected count is sampled.
SAMPLE_INTERVAL = 0.25
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
#: Relay log lines that would mean an unexpected error.
ERROR_LINE = re.compile(r"Traceback|\bERROR\b|Error:|exception", re.IGNORECASE)
#: ``--busy-stop``: a process that keeps one core busy (other work on a shared machine), for at most argv[1] s.
SPINNER = "import sys, time\nend = time.monotonic() + float(sys.argv[1])\nwhile time.monotonic() < end: pass\n"
#: Times a stop from outside the load process: sends SIGTERM, wakes on the relay's pidfd when it has
#: exited and prints both moments (CLOCK_MONOTONIC, one clock for every process). A thread of the load
#: process polling for the exit notices it only when it gets the interpreter lock back from the load's
#: event loop, which just then answers 10,000 GOAWAYs: 0.6-2.1 s late at 10,000, against this.
STOP_TIMER = ("import os, select, signal, sys, time\npid = int(sys.argv[1])\nexited = os.pidfd_open(pid)\n"
              "print('ready', flush=True)\nsys.stdin.readline()\nsent = time.monotonic()\n"
              "os.kill(pid, signal.SIGTERM)\nselect.select([exited], [], [], float(sys.argv[2]))\n"
              "print(sent, time.monotonic(), flush=True)\n")
#: ``--profile-stop``: how long py-spy is given to attach to the relay before the stop's signal.
PROFILER_ATTACH = 1.0
RUNNER = r"""
import gc, json, logging, sys, threading, time
sys.path.insert(0, sys.argv[1])
# The collector's work, counted for the bench: each line on stdin is answered with its totals so far.
collected = {"gc_s": [0.0, 0.0, 0.0], "gc_runs": [0, 0, 0]}
began = [0.0]
def timed(phase, info):
    if phase == "start":
        began[0] = time.perf_counter()
    else:
        collected["gc_s"][info["generation"]] += time.perf_counter() - began[0]
        collected["gc_runs"][info["generation"]] += 1
gc.callbacks.append(timed)
def answer():
    for _ in sys.stdin:
        print(json.dumps(collected), flush=True)
threading.Thread(target=answer, daemon=True).start()
import shared.service_manager as service_manager
from controller import cli
from shared.event_loop import run
service_manager.configure_logging(logging.WARNING, identifier="outpost-controller")
args = cli.build_parser().parse_args(sys.argv[2:])
run(cli.serve(cli.settings_from_args(args)), args.event_loop)
cli.exit_without_teardown()  # as outpost-controller serve ends
"""


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds of the event loop's thread and of all other (worker) threads together."""
    totals: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = "event_loop" if task.name == str(pid) else "workers"
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # a worker that just ended
        totals[name] = totals.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return totals


def schedstat(pid: int) -> tuple[int, int]:
    """The main thread's (ns on a CPU, ns runnable but waiting for a CPU) so far; readable until it is reaped."""
    on_cpu, waiting, _ = Path(f"/proc/{pid}/schedstat").read_text().split()
    return int(on_cpu), int(waiting)


def scheduling(pid: int) -> tuple[float, float, int, int]:
    """The process's user and system CPU seconds, and its main thread's (the event loop's) voluntary and
    involuntary context switches so far: a loop that sleeps between events switches voluntarily each time."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    status = Path(f"/proc/{pid}/status").read_text()
    switches = [int(re.search(rf"^{kind}_ctxt_switches:\s+(\d+)", status, re.MULTILINE).group(1))  # type: ignore[union-attr]
                for kind in ("voluntary", "nonvoluntary")]
    return int(fields[11]) / CLOCK_TICKS, int(fields[12]) / CLOCK_TICKS, switches[0], switches[1]


def per_tunnel(before: tuple[float, float, int, int], after: tuple[float, float, int, int],
               count: int) -> dict[str, float]:
    """User and system CPU ms, and the event loop's sleeps and preemptions, per tunnel between two samples."""
    return {"user_ms": round((after[0] - before[0]) * 1000 / count, 3),
            "system_ms": round((after[1] - before[1]) * 1000 / count, 3),
            "loop_sleeps": round((after[2] - before[2]) / count, 2),
            "loop_preempted": round((after[3] - before[3]) / count, 2)}


def cpu_ms_by_thread(before: dict[str, float], after: dict[str, float], count: int) -> dict[str, float]:
    """Milliseconds per tunnel each thread spent between two samples."""
    return {name: round((after[name] - before.get(name, 0.0)) * 1000 / count, 3) for name in after
            if after[name] - before.get(name, 0.0) > 0}


def collector_per_tunnel(before: dict[str, Any], after: dict[str, Any], count: int) -> dict[str, Any]:
    """The relay's garbage collection between two answers: ms per tunnel in all, and of each generation
    its collections and their ms per tunnel (the oldest walks the whole heap)."""
    spent = [round((b - a) * 1000 / count, 3) for a, b in zip(before["gc_s"], after["gc_s"], strict=True)]
    return {"gc_ms": round(sum(spent), 3), "gc_ms_by_generation": spent,
            "gc_runs": [b - a for a, b in zip(before["gc_runs"], after["gc_runs"], strict=True)]}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def enroll_in(context: Any, count: int) -> list[tuple[EphemeralKeyStore, Any]]:
    """``count`` gateways enrolled in ``context``: each key and its issued certificate, from a redeemed token."""
    enrolled = []
    for index in range(count):
        name = f"gw-{index:05d}"
        with context.store.transaction() as db:
            identity = context.registry.create_identity_in(db, "default", name, ("gateway",))
            token, _ = context.tokens.create_in(db, identity, 3600)
        keystore = EphemeralKeyStore()
        keystore.create()
        csr = build_csr(keystore, name).public_bytes(serialization.Encoding.PEM).decode()
        enrolled.append((keystore, context.enrollment.enroll(token, csr, "127.0.0.1")))
    return enrolled


def enroll_fleet(data: Path, port: int, count: int) -> list[TunnelCredentials]:
    """``count`` gateways, each with its own key and a certificate from a redeemed token."""
    from controller.bootstrap import open_data_dir
    from controller.settings import Settings

    context = open_data_dir(Settings(data_dir=data, listen_host="127.0.0.1", listen_port=port))
    try:
        return [TunnelCredentials(uri=issued.identity.uri, chain_pem=[issued.certificate_pem],
                                  ca_pem=context.ca.certificate_pem, keystore=keystore)
                for keystore, issued in enroll_in(context, count)]
    finally:
        context.close()


class Relay:
    """The relay process under test, on a fixed port so that it can be restarted under the fleet."""

    def __init__(self, data: Path, port: int, tunnels: int, log_path: Path, busy_stop: int = 0,
                 profile_stop: Path | None = None, profile_admission: Path | None = None) -> None:
        self.data, self.port, self.tunnels, self.log_path = data, port, tunnels, log_path
        self.process: subprocess.Popen[str] | None = None
        #: Processes that spin on a core from just before each stop's signal until the relay exited.
        self.busy_stop = busy_stop
        #: ``--profile-stop``: py-spy records each stop into this file's name plus the stop's number.
        self.profile_stop = profile_stop
        #: ``--profile-admission``: py-spy records the bring-up and the storm into this file's name plus the phase.
        self.profile_admission = profile_admission
        self.stops = 0

    def start(self) -> float:
        """Start; returns the monotonic time it said it was ready."""
        log = self.log_path.open("a")
        self.process = subprocess.Popen(
            [sys.executable, "-c", RUNNER, str(ROOT), "serve", "--data", str(self.data),
             "--listen", f"127.0.0.1:{self.port}", "--max-unauthenticated-per-address", str(self.tunnels + 100)],
            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
        )
        log.close()
        assert self.process.stdout is not None
        deadline = time.monotonic() + READY_TIMEOUT
        line = ""
        while time.monotonic() < deadline and "ready on" not in line:
            line = self.process.stdout.readline()
            if not line and self.process.poll() is not None:
                break
        if "ready on" not in line:
            self.process.kill()
            raise RuntimeError(f"the relay did not start: {line!r}; see {self.log_path}")
        return time.monotonic()

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def stop(self) -> dict[str, Any]:
        """SIGTERM; how the stop went (killed past STOP_TIMEOUT): ``wall_s`` from the signal until the
        process exited, both seen by ``STOP_TIMER`` outside this busy process;
        ``cpu_s`` it spent meanwhile, ``load_average`` as it began, and where its main thread's time went.

        The CPU is the process's utime+stime from /proc just before the signal and from its exit
        status (``wait4``'s rusage: every thread, to the last tick) after. The main thread runs the
        event loop; its scheduler figures (/proc/PID/schedstat: ns on a CPU, ns runnable but waiting
        for one), read before the signal and from the exited process before it is reaped, split the
        stop's wall time into running, waiting for a core (``event_loop_runqueue_wait_s``: the
        machine was busy) and neither (``event_loop_blocked_s``: I/O, a lock, a worker, a sleep).
        """
        process = self.process
        assert process is not None
        profiler = self._start_profiler()
        load = [round(value, 2) for value in os.getloadavg()]
        cpu = cpu_seconds(process.pid)
        begin_cpu, begin_wait = schedstat(process.pid)
        timer = subprocess.Popen([sys.executable, "-c", STOP_TIMER, str(process.pid), str(STOP_TIMEOUT)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert timer.stdin is not None and timer.stdout is not None
        timer.stdout.readline()  # "ready": it holds the relay's pidfd
        spinners = [subprocess.Popen([sys.executable, "-c", SPINNER, str(STOP_TIMEOUT)]) for _ in range(self.busy_stop)]
        timer.stdin.write("go\n")
        timer.stdin.flush()
        deadline = time.monotonic() + STOP_TIMEOUT
        try:
            # Exited, not reaped yet: its main thread's figures are final and still readable.
            while os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is None:
                if time.monotonic() >= deadline:
                    process.kill()
                    deadline = float("inf")
                time.sleep(STOP_POLL)
            moments = timer.communicate(timeout=STOP_TIMEOUT)[0].split()
            if len(moments) != 2:
                raise RuntimeError(f"the stop timer gave {moments!r}, not two times: it needs os.pidfd_open "
                                   "(Linux 5.3 or later) and the relay still running when it starts")
            took = float(moments[1]) - float(moments[0])
            end_cpu, end_wait = schedstat(process.pid)
            _, status, usage = os.wait4(process.pid, 0)
            process.returncode = os.waitstatus_to_exitcode(status)
        finally:
            for spinner in spinners:
                spinner.kill()
                spinner.wait()
            if profiler is not None:
                profiler.wait(PROFILER_ATTACH + STOP_TIMEOUT)
        total = usage.ru_utime + usage.ru_stime - cpu
        loop_cpu, loop_wait = (end_cpu - begin_cpu) / 1e9, (end_wait - begin_wait) / 1e9
        return {
            "wall_s": round(took, 2),
            "cpu_s": round(total, 2),
            "load_average": load,
            "event_loop_cpu_s": round(loop_cpu, 2),
            "event_loop_runqueue_wait_s": round(loop_wait, 2),
            "event_loop_blocked_s": round(max(0.0, took - loop_cpu - loop_wait), 2),
            "other_threads_cpu_s": round(max(0.0, total - loop_cpu), 2),
        }

    def _start_profiler(self) -> subprocess.Popen[bytes] | None:
        """py-spy recording the relay until it exits (``--profile-stop``), or None; its attaching is not timed."""
        self.stops += 1
        if self.profile_stop is None:
            return None
        spy = Path(sys.executable).with_name("py-spy")
        output = self.profile_stop.with_name(f"{self.profile_stop.name}.{self.stops}")
        assert self.process is not None
        # --idle: a stop's time waiting (on a worker's commit, a lock, a core) shows, not only its CPU.
        profiler = subprocess.Popen([str(spy), "record", "--pid", str(self.process.pid), "--format", "raw",
                                     "--rate", "250", "--threads", "--idle", "--nonblocking", "-o", str(output)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(PROFILER_ATTACH)
        return profiler

    def profile(self, phase: str) -> subprocess.Popen[bytes] | None:
        """py-spy recording the relay until ``stop_profiling`` (``--profile-admission``), or None."""
        if self.profile_admission is None:
            return None
        spy = Path(sys.executable).with_name("py-spy")
        output = self.profile_admission.with_name(f"{self.profile_admission.name}.{phase}")
        profiler = subprocess.Popen([str(spy), "record", "--pid", str(self.pid), "--format", "raw",
                                     "--rate", "250", "--threads", "--nonblocking", "-o", str(output)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(PROFILER_ATTACH)
        return profiler

    @staticmethod
    def stop_profiling(profiler: subprocess.Popen[bytes] | None) -> None:
        """SIGINT ends a py-spy recording and makes it write its file."""
        if profiler is not None:
            profiler.send_signal(signal.SIGINT)
            profiler.wait(STOP_TIMEOUT)

    def collector(self) -> dict[str, Any]:
        """The relay's cyclic garbage collection so far: seconds inside it and collections per generation."""
        assert self.process is not None and self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write("\n")
        self.process.stdin.flush()
        answer: dict[str, Any] = json.loads(self.process.stdout.readline())
        return answer

    def error_lines(self) -> list[str]:
        return [line for line in self.log_path.read_text().splitlines() if ERROR_LINE.search(line)]


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def connected(fleet: list[TunnelSupervisor]) -> int:
    return sum(1 for s in fleet if s.current_session() is not None)


def attempts(fleet: list[TunnelSupervisor]) -> int:
    return sum(s.stats.reconnects for s in fleet)


class FailureReasons(logging.Handler):
    """Counts the fleet's failed attempts by what the supervisor logged, numbers and addresses taken out."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.counts: dict[str, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        why = re.sub(r"\d+(\.\d+)?", "N", record.getMessage())
        self.counts[why] = self.counts.get(why, 0) + 1

    def take(self) -> dict[str, int]:
        """The counts since the last take, most frequent first (at most 8)."""
        counts, self.counts = self.counts, {}
        return dict(sorted(counts.items(), key=lambda kv: -kv[1])[:8])


async def wait_all(fleet: list[TunnelSupervisor], relay: Relay
                   ) -> tuple[float | None, int, list[int], dict[str, int], dict[str, Any]]:
    """Until every tunnel is up or PHASE_TIMEOUT: (seconds or None, relay CPU ms meanwhile, connected count per
    second, why the ones still down are down, relay CPU ms per tunnel by thread and its scheduling meanwhile)."""
    started = time.monotonic()
    cpu = cpu_seconds(relay.pid)
    threads = thread_cpu_seconds(relay.pid)
    sched = scheduling(relay.pid)
    mine = os.times()
    per_second: list[int] = []
    next_sample = started + 1.0
    while connected(fleet) < len(fleet) and time.monotonic() - started < PHASE_TIMEOUT:
        await asyncio.sleep(SAMPLE_INTERVAL)
        if time.monotonic() >= next_sample:
            per_second.append(connected(fleet))
            next_sample += 1.0
    took = time.monotonic() - started if connected(fleet) == len(fleet) else None
    down: dict[str, int] = {}
    for supervisor in fleet:
        if supervisor.current_session() is None:
            why = re.sub(r" at 0x[0-9a-f]+", "", f"{supervisor.stats.state}: {supervisor.stats.last_error}")
            down[why] = down.get(why, 0) + 1
    by_thread: dict[str, Any] = {**cpu_ms_by_thread(threads, thread_cpu_seconds(relay.pid), len(fleet)),
                                 **per_tunnel(sched, scheduling(relay.pid), len(fleet))}
    # The load process answers every CHALLENGE: busy near a whole core, its answers come late and the
    # relay's count of tunnels admitting (its BUSY cap) fills with its slowness, not the relay's.
    now = os.times()
    by_thread["load_process_cpu_pct"] = round(
        (now.user + now.system - mine.user - mine.system) * 100 / max(time.monotonic() - started, 1e-3), 1)
    return took, round((cpu_seconds(relay.pid) - cpu) * 1000), per_second, down, by_thread


async def wait_none(fleet: list[TunnelSupervisor]) -> None:
    """Until every supervisor saw its tunnel end (the relay exited: each sees its connection close)."""
    deadline = time.monotonic() + PHASE_TIMEOUT
    while connected(fleet) and time.monotonic() < deadline:
        await asyncio.sleep(SAMPLE_INTERVAL)


async def bring_up(fleet: list[TunnelSupervisor], tasks: list[asyncio.Task[None]], in_flight: int) -> None:
    """Start the supervisors ``in_flight`` at a time (first connection only)."""
    gate = asyncio.Semaphore(in_flight)

    async def one(supervisor: TunnelSupervisor) -> None:
        async with gate:
            tasks.append(asyncio.get_running_loop().create_task(supervisor.run()))
            await asyncio.wait_for(supervisor.connected.wait(), PHASE_TIMEOUT)

    await asyncio.gather(*(one(s) for s in fleet))


def peak_rate(per_second: list[int]) -> int:
    return max((b - a for a, b in zip([0, *per_second], per_second, strict=False)), default=0)


async def measure(credentials: list[TunnelCredentials], relay: Relay, ramp: int, load_nice: int = 0
                  ) -> dict[str, Any]:
    url = f"wss://127.0.0.1:{relay.port}/v1/tunnel"
    fleet = [TunnelSupervisor([url], c, TunnelOptions()) for c in credentials]
    reasons = FailureReasons()
    supervisor_log = logging.getLogger("agent.tunnel.supervisor")
    supervisor_log.addHandler(reasons)
    supervisor_log.setLevel(logging.WARNING)
    supervisor_log.propagate = False  # counted, not printed: 10,000 lines a storm
    tasks: list[asyncio.Task[None]] = []
    loop = asyncio.get_running_loop()
    # The relay is started and stopped from a thread of its own, made before the fleet's thread lowers
    # its priority (Linux: per thread, inherited by threads and processes made after), so the relay
    # keeps priority 0 across restarts while the fleet's loop keeps running.
    relay_thread = ThreadPoolExecutor(1, thread_name_prefix="relay")
    await loop.run_in_executor(relay_thread, relay.start)
    if load_nice:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), load_nice)

    async def in_relay_thread(call: Callable[[], Any]) -> Any:
        return await loop.run_in_executor(relay_thread, call)
    await asyncio.sleep(SETTLE)
    baseline = rss_kib(relay.pid)
    try:
        profiler = await in_relay_thread(lambda: relay.profile("bringup"))
        collector = await in_relay_thread(relay.collector)
        started = time.monotonic()
        cpu = cpu_seconds(relay.pid)
        threads = thread_cpu_seconds(relay.pid)
        sched = scheduling(relay.pid)
        await bring_up(fleet, tasks, ramp)
        established_s = time.monotonic() - started
        admission_by_thread: dict[str, Any] = {**cpu_ms_by_thread(threads, thread_cpu_seconds(relay.pid), len(fleet)),
                                               **per_tunnel(sched, scheduling(relay.pid), len(fleet))}
        admission_cpu_ms = (cpu_seconds(relay.pid) - cpu) * 1000 / len(fleet)
        admission_by_thread.update(collector_per_tunnel(collector, await in_relay_thread(relay.collector), len(fleet)))
        await in_relay_thread(lambda: relay.stop_profiling(profiler))
        await asyncio.sleep(SETTLE)
        holding = rss_kib(relay.pid)
        cpu = cpu_seconds(relay.pid)
        await asyncio.sleep(IDLE_WINDOW)
        idle_cpu_pct = (cpu_seconds(relay.pid) - cpu) * 100 / IDLE_WINDOW
        say(f"{len(fleet)} up in {established_s:.1f} s, {admission_cpu_ms:.2f} ms relay CPU each "
            f"{admission_by_thread}; {(holding - baseline) / len(fleet):.1f} KiB each; idle CPU {idle_cpu_pct:.2f} %")

        # The storm: stop the relay under the fleet, start it again on the same port.
        attempts_at_stop = attempts(fleet)
        stop_first = await in_relay_thread(relay.stop)
        await wait_none(fleet)
        await in_relay_thread(relay.start)
        profiler = await in_relay_thread(lambda: relay.profile("storm"))
        collector = await in_relay_thread(relay.collector)
        attempts_at_ready = attempts(fleet)
        reasons.take()
        say(f"relay restarted under {len(fleet)}; stopped: {stop_first}")
        storm_s, storm_cpu_ms, per_second, storm_down, storm_by_thread = await wait_all(fleet, relay)
        storm_failures = reasons.take()
        storm_by_thread.update(collector_per_tunnel(collector, await in_relay_thread(relay.collector), len(fleet)))
        await in_relay_thread(lambda: relay.stop_profiling(profiler))
        # Each tunnel's drop counts once; every other attempt failed.
        failed_while_down = attempts_at_ready - attempts_at_stop - len(fleet)
        failed_after_ready = attempts(fleet) - attempts_at_ready
        storm_rss = rss_kib(relay.pid)
        await asyncio.sleep(SETTLE)
        stop_last = await in_relay_thread(relay.stop)
    finally:
        for supervisor in fleet:
            supervisor._stop.set()
            if supervisor.session is not None:
                supervisor.session.abort()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), STOP_TIMEOUT)
        if relay.process is not None and relay.process.poll() is None:
            relay.process.kill()
        relay_thread.shutdown(wait=False)
    return {
        "load_average": [round(load, 2) for load in os.getloadavg()],
        "tunnels": len(fleet),
        "relay_baseline_kib": baseline,
        "relay_holding_kib": holding,
        "relay_kib_per_tunnel": round((holding - baseline) / len(fleet), 1),
        "relay_idle_cpu_pct": round(idle_cpu_pct, 2),
        "established_s": round(established_s, 2),
        "admission_cpu_ms": round(admission_cpu_ms, 3),
        "admission_cpu_ms_by_thread": admission_by_thread,
        "storm_all_back_s": None if storm_s is None else round(storm_s, 2),
        "storm_back_per_s": per_second,
        "storm_still_down": dict(sorted(storm_down.items(), key=lambda kv: -kv[1])[:8]),
        "storm_failed_attempts": max(0, failed_after_ready),
        "storm_failed_while_down": max(0, failed_while_down),
        "storm_failures_by_reason": storm_failures,
        "storm_admission_cpu_ms": round(storm_cpu_ms / len(fleet), 3),
        "storm_admission_cpu_ms_by_thread": storm_by_thread,
        "storm_peak_admissions_per_s": peak_rate(per_second),
        "storm_relay_kib": storm_rss,
        "graceful_stop_s": stop_last["wall_s"],
        "graceful_stop_before_storm_s": stop_first["wall_s"],
        # The relay's own CPU during each stop, how busy the machine was as it began, and where the time went.
        "stop_cpu_s": stop_last["cpu_s"],
        "stop_load_average": stop_last["load_average"],
        "stop_before_storm_cpu_s": stop_first["cpu_s"],
        "stop_before_storm_load_average": stop_first["load_average"],
        "stop_detail": stop_last,
        "stop_before_storm_detail": stop_first,
        "relay_error_line_count": len(relay.error_lines()),
        "relay_error_lines": relay.error_lines()[:20],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--tunnels", type=int, default=DEFAULT_TUNNELS)
    parser.add_argument("--ramp", type=int, default=RAMP_IN_FLIGHT, metavar="N",
                        help="tunnels connecting at once during the first bring-up (few: admissions arrive spread out)")
    parser.add_argument("--busy-stop", type=int, default=0, metavar="N",
                        help="N processes keep a core busy during each stop (the stop on a loaded machine)")
    parser.add_argument("--load-nice", type=int, default=0, metavar="N",
                        help="the fleet's thread runs at nice N (the relay at 0): the relay gets a core first, "
                             "as on its own machine with the gateways elsewhere")
    parser.add_argument("--profile-stop", type=Path, default=None, metavar="FILE",
                        help="record each stop with py-spy (collapsed stacks) into FILE.1, FILE.2")
    parser.add_argument("--profile-admission", type=Path, default=None, metavar="FILE",
                        help="record the bring-up and the storm with py-spy (collapsed stacks) into FILE.bringup, "
                             "FILE.storm (py-spy's own CPU shares the cores: compare profiles, not CPU figures)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.CRITICAL)  # the fleet's own reconnect lines would be 10,000 each
    from shared.event_loop import run, uvloop_module

    load_at_start = [round(load, 2) for load in os.getloadavg()]  # the machine is shared: say how busy it was
    with tempfile.TemporaryDirectory(prefix="outpost-fleet-") as workdir:
        data = Path(workdir) / "relay"
        port = free_port()
        started = time.monotonic()
        credentials = enroll_fleet(data, port, args.tunnels)
        enroll_s = time.monotonic() - started
        print(f"enrolled {args.tunnels} in {enroll_s:.1f} s", file=sys.stderr, flush=True)
        relay = Relay(data, port, args.tunnels, Path(workdir) / "relay.log", args.busy_stop,
                      args.profile_stop, args.profile_admission)
        result = run(measure(credentials, relay, args.ramp, args.load_nice), "auto")
    print(json.dumps({
        "benchmark": "fleet_scale",
        "machine": {"nproc": os.cpu_count(), "python": platform.python_version()},
        "event_loop": "uvloop" if uvloop_module() is not None else "asyncio",
        "enroll_s": round(enroll_s, 1),
        "load_average_at_start": load_at_start,
        "busy_stop": args.busy_stop,
        "load_nice": args.load_nice,
        "ramp_in_flight": args.ramp,
        "goals": {"relay_kib_per_tunnel": 64, "relay_idle_cpu_pct": 5, "established_s": 60,
                  "admission_cpu_ms": 1, "storm_all_back_s": 60, "graceful_stop_s": 2},
        **result,
    }))


if __name__ == "__main__":
    main()
