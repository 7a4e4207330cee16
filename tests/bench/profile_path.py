"""Where the data path's time goes: py-spy samples every process of the tunnel path under bulk and small messages.

The tunnel path of the other data-path benchmarks (bench_setup.TunnelPath:
client -> dialer agent -> relay -> binder agent -> service, all on 127.0.0.1)
carries two workloads in turn, each for ``--seconds``:

* bulk: uploads of ``--megabytes`` MiB to a sink service, one after another
  (as throughput.py);
* small: 64-byte request/response round trips on one connection to an echo
  service (as latency.py).

While a workload runs, one ``py-spy record`` per process (dialer agent,
relay, binder agent) samples it ``--rate`` times a second (raw collapsed
stacks, thread ids, no line numbers). py-spy leaves out samples of threads
waiting in the kernel, so a process's samples are its busy ones. Per process
and workload the result names the top ``--top`` functions by own (self)
samples (the innermost Python frame: the time a function spends in its own
code and in the C it calls) and by total samples (the function anywhere on
the stack), each with its share of the process's samples, and what share of
the workload's time its busiest thread was sampled busy. Without ``--native``
a function's own samples include the C it calls (``SSLObject.write``
includes OpenSSL's encryption, a transport's ``write`` the system call).
With ``--native``, ``loop_thread_busy`` adds up the event loop thread's
samples outside its wait for sockets by where their innermost frame is: the
read and write system calls, each library (libcrypto, libssl, libc's
unnamed code such as memcpy), each C file (uvloop's loop.c, CPython's own)
and Python code, since an unsymbolised library splits into one "function"
per address in the top lists.
Sampling pauses each process for a few microseconds per sample
(``--nonblocking`` does not pause, at the price of torn stacks), so the
workload's own figures here are not throughput or latency results: those are
throughput.py's and latency.py's.

py-spy needs ptrace on the processes: root, CAP_SYS_PTRACE, or
kernel.yama.ptrace_scope 0. Without py-spy or ptrace this says why in one
line and exits non-zero. Last line: JSON.

    .venv/bin/python tests/bench/profile_path.py [--seconds 10] [--rate 100] [--top 15] [--nonblocking] [--native] [--gil]
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.bench.bench_setup import (  # noqa: E402
    BENCH_ECHO,
    BENCH_SINK,
    ROOT,
    TUNNEL_PATH,
    EchoServer,
    SinkServer,
    TunnelPath,
    connect,
    emit,
    int_arg,
    machine,
    paths,
    recv_exactly,
    send_bulk,
    str_arg,
    wait_for_path,
)
from tests.bench.path_cpu import cpu_now  # noqa: E402

#: The program; OUTPOST_BENCH_PY_SPY names another (the smoke test names a missing one).
PY_SPY_ENV = "OUTPOST_BENCH_PY_SPY"
#: What to do when py-spy is missing: it is in the ``test`` extra.
INSTALL_HINT = "install it with .venv/bin/pip install py-spy (pyproject.toml's test extra)"
# Seconds per workload: 1,000 samples per process at the default rate, enough
# for a function at 1 % to show as about 10 samples.
DEFAULT_SECONDS = 10
# A run stays a short benchmark on a shared machine: two workloads of at most this.
MAX_SECONDS = 120
# py-spy's own default rate; each sample pauses the process for a few microseconds.
DEFAULT_RATE = 100
# Above this the pauses (blocking mode) would change what is measured by more than a few per cent.
MAX_RATE = 1000
DEFAULT_TOP = 15
# A longer list is read by no one; the raw stacks say the rest.
MAX_TOP = 200
# One bulk transfer (MiB): a fraction of a second on the path, so the opening of
# each stream is a small part of the time.
DEFAULT_MEGABYTES = 64
# The request and answer of the small-message workload (as latency.py).
SMALL_SIZE = 64
# Bounds on the workloads' loops besides their deadline.
MAX_TRANSFERS = 10_000
MAX_ROUND_TRIPS = 10_000_000
# py-spy attaches to a process (reads its memory maps and the interpreter's
# state) well within this; samples before the workload starts are idle ones.
ATTACH_SECONDS = 1.0
# After SIGINT py-spy writes its file within this; longer means it hung.
STOP_TIMEOUT = 30.0
# py-spy stops by itself this long after the workload should have ended, if
# the SIGINT that ends it early never came (the benchmark died).
DURATION_MARGIN = 30
# py-spy dump on a sleeping interpreter: a second or two; tried again while the
# interpreter starts (py-spy cannot read a version from it until it has).
PROBE_TIMEOUT = 20.0
PROBE_TRIES = 3
PROBE_PAUSE = 0.5
#: py-spy record's flags this passes on when given: --nonblocking (no pause per sample, stacks may tear) and
#: --native (C and Cython frames too: OpenSSL, uvloop; more work per sample); --gil (only samples of the thread
#: holding the GIL: a thread woken but waiting for a core, which py-spy counts as busy, mostly does not hold it).
PASSED_FLAGS = ("--nonblocking", "--native", "--gil")
#: The processes of the tunnel path, as the other benchmarks name them.
PROCESSES = ("dialer_agent", "relay", "binder_agent")


def py_spy() -> str | None:
    """The py-spy program: OUTPOST_BENCH_PY_SPY, on PATH, next to this interpreter, or in the repository's .venv."""
    named = os.environ.get(PY_SPY_ENV)
    if named:
        return named if os.access(named, os.X_OK) else None
    for candidate in (shutil.which("py-spy"), Path(sys.executable).with_name("py-spy"),
                      ROOT / ".venv" / "bin" / "py-spy"):
        if candidate and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def unavailable() -> str | None:
    """Why py-spy cannot sample this machine's Python processes, or None.

    It tries on a sleeping interpreter started the way the agents are (a child
    of this process, so py-spy is its sibling, as it is the agents').
    """
    spy = py_spy()
    if spy is None:
        where = os.environ.get(PY_SPY_ENV)
        return (f"py-spy not found at {where}" if where else "py-spy is not installed") + f": {INSTALL_HINT}"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        error = ""
        for _ in range(PROBE_TRIES):
            time.sleep(PROBE_PAUSE)
            result = subprocess.run([spy, "dump", "--pid", str(sleeper.pid)], capture_output=True, text=True,
                                    timeout=PROBE_TIMEOUT)
            if result.returncode == 0:
                return None
            lines = [line.strip() for line in result.stderr.splitlines() if line.strip()]
            error = next((line for line in lines if line.startswith("Error")), lines[0] if lines else "no message")
        return (f"py-spy cannot sample a Python process here ({error}): it needs ptrace, "
                "so run as root or with CAP_SYS_PTRACE, or set kernel.yama.ptrace_scope to 0")
    finally:
        sleeper.kill()
        sleeper.wait()


# -- sampling ------------------------------------------------------------------------
class Recorder:
    """``py-spy record`` on one process into a raw file, from start() until stop()."""

    def __init__(self, spy: str, pid: int, output: Path, rate: int, seconds: int, flags: list[str]) -> None:
        self.output = output
        self.log = output.with_suffix(".log")
        self.command = [spy, "record", "--pid", str(pid), "--format", "raw", "--output", str(output),
                        "--rate", str(rate), "--duration", str(seconds + int(ATTACH_SECONDS) + DURATION_MARGIN),
                        "--threads", "--nolineno", *flags]
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT)

    def check_running(self) -> None:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"py-spy exited {self.process.returncode} before the workload: {self._said()}")

    def stop(self) -> str:
        """The raw stacks py-spy wrote."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise RuntimeError(f"py-spy did not stop within {STOP_TIMEOUT} s of SIGINT") from None
        if not self.output.exists():
            if self.process.returncode != 0:
                raise RuntimeError(f"py-spy exited {self.process.returncode}: {self._said()}")
            return ""  # no busy sample at all: py-spy writes no file
        return self.output.read_text()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def _said(self) -> str:
        text = self.log.read_text(errors="replace").strip() if self.log.exists() else ""
        return text.splitlines()[-1] if text else "no message"


def parse_raw(text: str) -> list[tuple[str, list[str], int]]:
    """py-spy's raw output: per line the thread, the frames outermost first, and how many samples had that stack."""
    stacks: list[tuple[str, list[str], int]] = []
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        thread = frames.pop(0) if frames and frames[0].startswith("thread ") else "thread (?)"
        if frames:
            stacks.append((thread, frames, int(count)))
    return stacks


#: The event loop waiting for its sockets (uvloop: libuv's epoll; asyncio: the selector's poll): idle, not work.
LOOP_WAITS = frozenset({"epoll_pwait", "epoll_wait", "poll"})
#: A frame of the event loop's thread (uvloop's and asyncio's run loop both sit below it).
LOOP_THREAD_MARK = "Runner.run (asyncio/runners.py)"
#: System calls named on their own in the code breakdown: the data path's reads and writes.
NAMED_CALLS = frozenset({"write", "writev", "send", "sendmsg", "read", "recv", "recvfrom", "readv"})


def code_of(frame: str) -> str:
    """Where a frame's own time goes, coarsely: a named system call, Python code, or the file or library named.

    With --native py-spy names C frames ``function (file.c)`` or ``function (libfoo.so)``, and an
    unsymbolised one by its address, so each address of one library would be a "function" of its own;
    grouping by the part in brackets adds them up (libcrypto's AES, libc's memcpy, uvloop's loop.c).
    """
    function, _, where = frame.rpartition(" (")
    where = where.rstrip(")")
    if where.endswith(".py") or where.startswith("<frozen"):
        return "Python code"
    if where.startswith("libc.so") and function in NAMED_CALLS:
        return f"{function} system call"
    return where


def loop_thread_busy(stacks: list[tuple[str, list[str], int]]) -> dict[str, object]:
    """The event loop thread's samples outside its wait for sockets, by ``code_of`` their innermost frame.

    Worker threads (the thread pool, waiting on a lock most of the time) and the loop's own wait
    are left out, so the shares are of the loop thread's work: with --native, how much of it is
    the kernel's write, OpenSSL, uvloop's C and Python code.
    """
    loop_threads = {thread for thread, frames, _ in stacks if LOOP_THREAD_MARK in frames}
    by_code: Counter[str] = Counter()
    for thread, frames, count in stacks:
        if thread in loop_threads and frames[-1].rpartition(" (")[0] not in LOOP_WAITS:
            by_code[code_of(frames[-1])] += count
    busy = sum(by_code.values())
    return {"samples": busy, "by_code": [{"code": code, "samples": n, "share": round(n / busy, 4)}
                                         for code, n in by_code.most_common()]}


def summarise(stacks: list[tuple[str, list[str], int]], top: int, rate: int, seconds: float) -> dict[str, object]:
    """Top functions by own and by total samples, with shares of all the process's samples."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    for thread, frames, count in stacks:
        own[frames[-1]] += count
        for function in set(frames):  # once per sample, however deep the recursion
            total[function] += count
        threads[thread] += count
    samples = sum(threads.values())

    def ranked(counter: Counter[str]) -> list[dict[str, object]]:
        return [{"function": function, "samples": n, "share": round(n / samples, 4)}
                for function, n in counter.most_common(top)]

    expected = rate * seconds
    return {
        "samples": samples,
        "threads_sampled": len(threads),
        "busiest_thread_busy_share": round(max(threads.values()) / expected, 3) if threads and expected else 0.0,
        "self": ranked(own),
        "total": ranked(total),
        "loop_thread_busy": loop_thread_busy(stacks),
    }


def profiled(pids: dict[str, int], work: Callable[[], dict[str, object]], workdir: Path, name: str,
             spy: str, rate: int, seconds: int, top: int, flags: list[str]) -> dict[str, object]:
    """``work()``'s own figures, and per process its CPU and its profile while the work ran."""
    recorders = {process: Recorder(spy, pid, workdir / f"{name}-{process}.raw", rate, seconds, flags)
                 for process, pid in pids.items()}
    try:
        for recorder in recorders.values():
            recorder.start()
        time.sleep(ATTACH_SECONDS)
        for recorder in recorders.values():
            recorder.check_running()
        cpu_before = cpu_now({process: [pid] for process, pid in pids.items()})
        started = time.perf_counter()
        figures = work()
        elapsed = time.perf_counter() - started
        cpu_after = cpu_now({process: [pid] for process, pid in pids.items()})
        raw = {process: recorder.stop() for process, recorder in recorders.items()}
    finally:
        for recorder in recorders.values():
            recorder.kill()
    processes = {}
    for process, text in raw.items():
        processes[process] = {
            "cpu_share": round((cpu_after[process] - cpu_before[process]) / elapsed, 3),
            **summarise(parse_raw(text), top, rate, elapsed),
        }
    return {**figures, "seconds": round(elapsed, 2), "processes": processes}


# -- the workloads --------------------------------------------------------------------
def bulk(port: int, megabytes: int, seconds: int) -> Callable[[], dict[str, object]]:
    def work() -> dict[str, object]:
        deadline = time.monotonic() + seconds
        transfers, busy = 0, 0.0
        while time.monotonic() < deadline and transfers < MAX_TRANSFERS:
            busy += send_bulk(port, megabytes * 1024 * 1024)
            transfers += 1
        sent = transfers * megabytes * 1024 * 1024
        return {"transfers": transfers, "bytes": sent, "mbit_s_while_sampled": round(sent * 8 / busy / 1e6, 1)}

    return work


def small(port: int, seconds: int) -> Callable[[], dict[str, object]]:
    def work() -> dict[str, object]:
        payload = os.urandom(SMALL_SIZE)
        trips = 0
        with connect(port) as sock:
            started = time.perf_counter()
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline and trips < MAX_ROUND_TRIPS:
                sock.sendall(payload)
                if recv_exactly(sock, SMALL_SIZE) != payload:
                    raise RuntimeError("the echo came back different")
                trips += 1
            took = time.perf_counter() - started
        return {"round_trips": trips, "request_bytes": SMALL_SIZE,
                "us_per_round_trip_while_sampled": round(took * 1e6 / max(trips, 1), 1)}

    return work


def bounded(name: str, value: int, low: int, high: int) -> int:
    if not low <= value <= high:
        raise SystemExit(f"profile_path: --{name} {value} is out of range: give {low} to {high}")
    return value


def main() -> None:
    seconds = bounded("seconds", int_arg("seconds", DEFAULT_SECONDS), 1, MAX_SECONDS)
    rate = bounded("rate", int_arg("rate", DEFAULT_RATE), 1, MAX_RATE)
    top = bounded("top", int_arg("top", DEFAULT_TOP), 1, MAX_TOP)
    megabytes = bounded("megabytes", int_arg("megabytes", DEFAULT_MEGABYTES), 1, 1024)
    flags = [flag for flag in PASSED_FLAGS if flag in sys.argv]
    why = unavailable()
    if why:
        raise SystemExit(f"profile_path: {why}")
    spy = py_spy()
    assert spy is not None
    sink, echo = SinkServer(), EchoServer()
    workloads: dict[str, dict[str, object]] = {}
    try:
        targets = {BENCH_SINK: sink.port, BENCH_ECHO: echo.port}
        with tempfile.TemporaryDirectory(prefix="outpost-profile-") as tmp, \
                paths(targets, with_ssh=False) as (tunnel, _):
            wait_for_path(tunnel.ports[BENCH_ECHO])
            pids = pids_of(tunnel)

            def run(name: str, work: Callable[[], dict[str, object]]) -> None:
                workloads[name] = profiled(pids, work, Path(tmp), name, spy, rate, seconds, top, flags)

            run("bulk", bulk(tunnel.ports[BENCH_SINK], megabytes, seconds))
            run("small", small(tunnel.ports[BENCH_ECHO], seconds))
    finally:
        sink.close()
        echo.close()
    emit({
        "benchmark": "profile_path",
        "seconds_per_workload": seconds,
        "rate_hz": rate,
        "top": top,
        "py_spy_flags": flags,
        "agent_event_loop": str_arg("agent-event-loop", "") or "auto",
        "py_spy": py_spy_version(spy),
        "workloads": workloads,
        "sampled": "py-spy record --format raw --threads --nolineno on each process while the workload ran; "
                   "samples are the busy ones (threads waiting in the kernel are left out); share = of the "
                   "process's samples in that workload; self = innermost Python frame, total = anywhere on the stack; "
                   "loop_thread_busy = the event loop thread's samples outside its wait, by the code of the "
                   "innermost frame (with --native: system calls, libraries, C files, Python code)",
        "path": "dialer agent -> relay -> binder agent",
        "paths": {"tunnel": TUNNEL_PATH},
        "load_average": os.getloadavg(),
        "machine": machine(),
    })


def pids_of(tunnel: TunnelPath) -> dict[str, int]:
    found = {"dialer_agent": tunnel.dialer_pid, "relay": tunnel.relay_pid, "binder_agent": tunnel.binder_pid}
    assert tuple(found) == PROCESSES
    return found


def py_spy_version(spy: str) -> str:
    result = subprocess.run([spy, "--version"], capture_output=True, text=True, timeout=PROBE_TIMEOUT)
    return result.stdout.strip()


if __name__ == "__main__":
    main()
