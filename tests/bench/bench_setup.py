"""What the data-path benchmarks share: the three paths they compare, the services, the numbers.

The paths, each carrying a local client's TCP connection to a TCP service on
127.0.0.1:

* tunnel: client -> dialer agent's ``[[dial]]`` port -> dialer agent -> TLS
  WebSocket -> relay (``outpost-controller serve``) -> TLS WebSocket -> binder
  agent (``[[bind]]``) -> service. Three processes, the product's real path.
* ssh: client -> the port ``ssh -R`` opened on a local ``sshd`` -> sshd ->
  SSH channel -> ``ssh`` client -> service. Two processes.
* direct: client -> service.

Everything listens on 127.0.0.1 only and every wait is bounded. Run the
benchmarks from the repository root (see README.md, "Performance").
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import platform
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.e2e.harness import Controller, Process, python_env, read_status, run_cli, wait_until  # noqa: E402

TUNNEL_PATH = ("client -> dialer agent [[dial]] -> TLS (ALPN outpost/1, or a WebSocket: --agent-transport) -> relay "
               "-> TLS -> binder agent [[bind]] -> service")
SSH_PATH = "client -> sshd port opened by ssh -R -> sshd -> SSH channel -> ssh client -> service"
DIRECT_PATH = "client -> service"

SSHD = "/usr/sbin/sshd"
SSH = shutil.which("ssh") or "/usr/bin/ssh"
SSH_KEYGEN = shutil.which("ssh-keygen") or "/usr/bin/ssh-keygen"
# OpenSSH's first choice on a CPU with AES-NI; the benchmark states what it used.
SSH_CIPHER = "aes128-gcm@openssh.com"
# sshd's privilege separation directory; Debian creates it only at boot.
SSHD_PRIVSEP_DIR = Path("/run/sshd")
# Starting sshd, or an ssh connection setting up its forwards, takes well under a second.
SSH_START_TIMEOUT = 20.0
# An agent connects and binds within a second or two on loopback.
AGENT_START_TIMEOUT = 30.0
# A socket operation on loopback that takes longer than this means a stuck path.
IO_TIMEOUT = 60.0
# Client send and sink receive size: large enough that per-call overhead in the
# benchmark itself is negligible next to the path being measured.
CLIENT_CHUNK = 1024 * 1024
# The sink's answer: how many bytes it received, as an unsigned 64-bit integer.
COUNT = struct.Struct(">Q")
# Connections the benchmark services may have waiting; footprint opens 100 at once.
LISTEN_BACKLOG = 256

#: The agent's systemd unit: its Environment= applies to the agents the benchmarks start.
AGENT_UNIT = ROOT / "systemd" / "outpost-agent.service"

BENCH_SINK = "bench-sink"
BENCH_ECHO = "bench-echo"


# -- services ---------------------------------------------------------------------
class _ThreadedServer:
    """A TCP service on 127.0.0.1 with one thread per connection."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(LISTEN_BACKLOG)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.settimeout(IO_TIMEOUT)
            threading.Thread(target=self._guarded, args=(conn,), daemon=True).start()

    def _guarded(self, conn: socket.socket) -> None:
        with conn:
            try:
                self.handle(conn)
            except OSError:
                pass

    def handle(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.sock.close()


class SinkServer(_ThreadedServer):
    """Reads until EOF, then answers with the byte count: the client knows every byte arrived."""

    def handle(self, conn: socket.socket) -> None:
        buffer = bytearray(CLIENT_CHUNK)
        total = 0
        while True:
            n = conn.recv_into(buffer)
            if not n:
                break
            total += n
        conn.sendall(COUNT.pack(total))


class EchoServer(_ThreadedServer):
    """Echoes every byte back."""

    def handle(self, conn: socket.socket) -> None:
        while True:
            data = conn.recv(65536)
            if not data:
                return
            conn.sendall(data)


# -- clients ----------------------------------------------------------------------
def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def send_bulk(port: int, total: int) -> float:
    """Send ``total`` bytes to a sink through ``port``; seconds until the sink confirmed all of them."""
    payload = memoryview(os.urandom(CLIENT_CHUNK))
    started = time.perf_counter()
    with connect(port) as sock:
        left = total
        while left > 0:
            n = min(left, CLIENT_CHUNK)
            sock.sendall(payload[:n])
            left -= n
        sock.shutdown(socket.SHUT_WR)
        answer = recv_exactly(sock, COUNT.size)
    elapsed = time.perf_counter() - started
    (received,) = COUNT.unpack(answer)
    if received != total:
        raise RuntimeError(f"the sink received {received} bytes of {total}")
    return elapsed


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        data = sock.recv(size - len(chunks))
        if not data:
            raise RuntimeError(f"the path closed after {len(chunks)} of {size} bytes")
        chunks += data
    return bytes(chunks)


def wait_for_path(port: int, timeout: float = SSH_START_TIMEOUT) -> None:
    """Until a byte goes through ``port`` to an echo service and back."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with connect(port) as sock:
                sock.settimeout(2.0)
                sock.sendall(b"?")
                if sock.recv(1) == b"?":
                    return
        except OSError as exc:
            last = exc
        time.sleep(0.1)
    raise RuntimeError(f"nothing came back through 127.0.0.1:{port} within {timeout} s ({last})")


# -- the tunnel path --------------------------------------------------------------
class TunnelPath:
    """A real controller + relay, a binder agent hosting ``targets`` and a dialer agent dialling them."""

    def __init__(self, workdir: Path, targets: dict[str, int]) -> None:
        self.workdir = workdir
        self.targets = targets
        self.controller: Controller | None = None
        self.binder: Process | None = None
        self.dialer: Process | None = None
        #: service name -> the dialer agent's local port for it
        self.ports: dict[str, int] = {}

    #: Identity names of the two agents (a subclass's path names its own).
    BINDER, DIALER = "bench-binder", "bench-dialer"
    #: The agents' log level; None keeps the agent's default.
    LOG_LEVEL: str | None = None

    def start(self) -> TunnelPath:
        self._start_controller()
        binder_state = self._enroll(self.BINDER)
        dialer_state = self._enroll(self.DIALER)
        #: The binder's state directory (its status.json).
        self.binder_state = binder_state
        self.binder = self._run(self.BINDER, binder_state, self._binds())
        self._start_dialer(dialer_state)
        return self

    def _start_controller(self) -> None:
        """A fresh controller with the targets as services and a bind and a dial policy for the two agents."""
        self.controller = Controller(self.workdir / "controller")
        for service in self.targets:
            self.controller.ctl("service", "create", service, "--role", "bench")
        self.controller.ctl("policy", "create", "--kind", "bind", "--identities", self.BINDER,
                            "--services", "role:bench")
        self.controller.ctl("policy", "create", "--kind", "dial", "--identities", self.DIALER,
                            "--services", "role:bench")

    def _binds(self) -> list[tuple[str, ...]]:
        return [("[[bind]]", f'service = "{s}"', f'target = "127.0.0.1:{p}"') for s, p in self.targets.items()]

    def _start_dialer(self, dialer_state: Path) -> None:
        self.ports = {service: _free_port() for service in self.targets}
        dials = [("[[dial]]", f'service = "{s}"', f'listen = "127.0.0.1:{self.ports[s]}"') for s in self.targets]
        self.dialer = self._run(self.DIALER, dialer_state, dials)

    def _enroll(self, name: str) -> Path:
        assert self.controller is not None
        token = self.workdir / f"{name}.token"
        self.controller.ctl("identity", "create", name, "--token-out", str(token))
        state = self.workdir / f"{name}-state"
        config = self.workdir / f"{name}-enroll.toml"
        config.write_text("\n".join([f'state_dir = "{state}"', "", *self._keystore(name), ""]))
        result = run_cli("agent", "enroll", "--token", str(token), "--state", str(state), "--config", str(config))
        if result.returncode != 0:
            raise RuntimeError(f"enrolling {name} failed: {result.stderr.strip()}")
        return state

    def _keystore(self, name: str) -> list[str]:
        """The ``[keystore]`` section of agent ``name`` (a subclass puts one in a TPM)."""
        return ["[keystore]", 'backend = "software"']

    def _run(self, name: str, state: Path, sections: list[tuple[str, ...]]) -> Process:
        loop = str_arg("agent-event-loop", "")
        transport = str_arg("agent-transport", "")  # the tunnel's [link] transport; unset: the default (auto)
        lines = [f'state_dir = "{state}"', *([f'log_level = "{self.LOG_LEVEL}"'] if self.LOG_LEVEL else []),
                 *([f'event_loop = "{loop}"'] if loop else []), "", *self._keystore(name), ""]
        if transport:  # into the path's own [link] section where it has one
            link = next((s for s in sections if s and s[0] == "[link]"), None)
            sections = [(*s, f'transport = "{transport}"') if s is link else s for s in sections]
            if link is None:
                sections = [("[link]", f'transport = "{transport}"'), *sections]
        for section in sections:
            lines += [*section, ""]
        config = self.workdir / f"{name}.toml"
        config.write_text("\n".join(lines))
        agent = Process([sys.executable, "-m", "agent", "run", "--config", str(config)], env=agent_env())
        try:
            wait_until(lambda: read_status(state).get("state") == "connected", timeout=AGENT_START_TIMEOUT,
                       what=f"{name} connected")
        except AssertionError:
            agent.stop()
            raise RuntimeError(f"agent {name} did not connect within {AGENT_START_TIMEOUT} s:\n{agent.output}") from None
        return agent

    @property
    def binder_pid(self) -> int:
        assert self.binder is not None
        return self.binder.proc.pid

    @property
    def dialer_pid(self) -> int:
        assert self.dialer is not None
        return self.dialer.proc.pid

    @property
    def relay_pid(self) -> int:
        assert self.controller is not None
        return self.controller.process.proc.pid

    def stop(self) -> None:
        self._stop_agents()
        if self.controller is not None:
            self.controller.process.stop()

    def _stop_agents(self) -> None:
        for process in (self.dialer, self.binder):
            if process is not None:
                process.stop()


def agent_env() -> dict[str, str]:
    """The test environment plus the ``Environment=`` lines of the agent's systemd unit, as a gateway runs it."""
    env = python_env()
    for line in AGENT_UNIT.read_text().splitlines():
        if line.startswith("Environment="):
            name, _, value = line.removeprefix("Environment=").partition("=")
            env[name] = value
    return env


# -- the OpenSSH path ---------------------------------------------------------------
class SshPath:
    """A throwaway sshd on a free loopback port and an ``ssh -N -R`` client exposing ``targets`` through it."""

    def __init__(self, workdir: Path, targets: dict[str, int]) -> None:
        self.workdir = workdir / "ssh"
        self.targets = targets
        self.sshd: subprocess.Popen | None = None
        self.client: subprocess.Popen | None = None
        #: service name -> the port sshd opened for it
        self.ports: dict[str, int] = {}

    @staticmethod
    def unavailable() -> str | None:
        """Why this machine cannot run the OpenSSH baseline, or None."""
        if not os.path.exists(SSHD) or not os.path.exists(SSH):
            return "OpenSSH is not installed (scripts/setup installs openssh-server and openssh-client)"
        if os.geteuid() != 0:
            return "sshd must run as root for the baseline (it changes to the logging-in user)"
        return None

    def start(self) -> SshPath:
        why = self.unavailable()
        if why:
            raise RuntimeError(why)
        SSHD_PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
        self.workdir.mkdir(mode=0o700)
        host_key = self.workdir / "host_ed25519"
        user_key = self.workdir / "user_ed25519"
        for key in (host_key, user_key):
            subprocess.run([SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True,
                           timeout=SSH_START_TIMEOUT)
        authorized = self.workdir / "authorized_keys"
        authorized.write_text((user_key.with_suffix(".pub")).read_text())
        authorized.chmod(0o600)
        port = _free_port()
        config = self.workdir / "sshd_config"
        config.write_text("\n".join([
            f"Port {port}",
            "ListenAddress 127.0.0.1",
            f"HostKey {host_key}",
            f"AuthorizedKeysFile {authorized}",
            f"PidFile {self.workdir / 'sshd.pid'}",
            "PermitRootLogin prohibit-password",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "StrictModes no",
            "AllowTcpForwarding yes",
            "GatewayPorts no",
            "Compression no",
            f"Ciphers {SSH_CIPHER}",
            "",
        ]))
        self.sshd = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        _wait_listening(port, self.sshd)
        forwards: list[str] = []
        for service, target in self.targets.items():
            self.ports[service] = _free_port()
            forwards += ["-R", f"127.0.0.1:{self.ports[service]}:127.0.0.1:{target}"]
        self.client = subprocess.Popen(
            [SSH, "-N", "-F", "/dev/null", "-p", str(port), "-i", str(user_key), "-c", SSH_CIPHER,
             "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
             "-o", "ExitOnForwardFailure=yes", "-o", "Compression=no", "-o", "LogLevel=ERROR",
             *forwards, f"{_user()}@127.0.0.1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        for forwarded in self.ports.values():
            deadline = time.monotonic() + SSH_START_TIMEOUT
            while not _listening(forwarded):
                if self.client.poll() is not None:
                    err = self.client.stderr.read().decode(errors="replace") if self.client.stderr else ""
                    raise RuntimeError(f"ssh -R exited {self.client.returncode}: {err.strip()}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"ssh -R did not open 127.0.0.1:{forwarded} within {SSH_START_TIMEOUT} s")
                time.sleep(0.05)
        return self

    @property
    def client_pid(self) -> int:
        assert self.client is not None
        return self.client.pid

    def sshd_session_pids(self) -> list[int]:
        """sshd's per-connection processes (children of the listener)."""
        assert self.sshd is not None
        return _descendants(self.sshd.pid)

    def version(self) -> str:
        result = subprocess.run([SSH, "-V"], capture_output=True, text=True, timeout=SSH_START_TIMEOUT)
        return (result.stderr or result.stdout).strip()

    def stop(self) -> None:
        for process in (self.client, self.sshd):
            if process is not None and process.poll() is None:
                process.terminate()
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(10)


def _user() -> str:
    import pwd

    return pwd.getpwuid(os.geteuid()).pw_name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


def _wait_listening(port: int, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + SSH_START_TIMEOUT
    while not _listening(port):
        if process.poll() is not None:
            err = process.stderr.read().decode(errors="replace") if process.stderr else ""
            raise RuntimeError(f"sshd exited {process.returncode}: {err.strip()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"sshd did not listen on 127.0.0.1:{port} within {SSH_START_TIMEOUT} s")
        time.sleep(0.05)


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(entry))
    found: list[int] = []
    todo = list(children.get(pid, []))
    while todo:
        child = todo.pop()
        found.append(child)
        todo.extend(children.get(child, []))
    return found


# -- the run as a whole ----------------------------------------------------------
@contextlib.contextmanager
def paths(targets: dict[str, int], with_ssh: bool = True,
          tunnel_path: Callable[[Path, dict[str, int]], TunnelPath] = TunnelPath,
          ) -> Iterator[tuple[TunnelPath, SshPath | None]]:
    """The tunnel and (when possible) the ssh path to ``targets``, stopped on exit."""
    with tempfile.TemporaryDirectory(prefix="outpost-bench-") as tmp:
        workdir = Path(tmp)
        tunnel = tunnel_path(workdir, targets)
        ssh = SshPath(workdir, targets) if with_ssh and SshPath.unavailable() is None else None
        try:
            tunnel.start()
            if ssh is not None:
                ssh.start()
            yield tunnel, ssh
        finally:
            if ssh is not None:
                ssh.stop()
            tunnel.stop()


# -- numbers ---------------------------------------------------------------------------
def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # After the command name: state is field 3, utime field 14 and stime field 15 (1-based).
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    """VmRSS of a live process in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"process {pid} has no VmRSS")


def percentile(samples: list[float], fraction: float) -> float:
    """The nearest-rank percentile of ``samples``."""
    ordered = sorted(samples)
    rank = max(0, min(len(ordered) - 1, int(round(fraction * len(ordered) + 0.5)) - 1))
    return ordered[rank]


def median(values: list[float]) -> float:
    return statistics.median(values)


def ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


def machine() -> dict:
    """Where the numbers came from."""
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    found = {
        "nproc": os.cpu_count(),
        "cpu": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "python_executable": sys.executable,
    }
    for module in ("aiohttp", "cryptography", "yarl", "multidict"):
        try:
            found[module] = importlib.import_module(module).__version__
        except ImportError:
            found[module] = None
    try:
        from aiohttp import _websocket  # noqa: F401  aiohttp 3.8: the C masking helper

        found["aiohttp_websocket_c"] = True
    except ImportError:
        try:
            from aiohttp._websocket import mask  # noqa: F401  aiohttp >= 3.10

            found["aiohttp_websocket_c"] = mask.__file__.endswith(".so")
        except ImportError:
            found["aiohttp_websocket_c"] = False
    result = subprocess.run([SSH, "-V"], capture_output=True, text=True, timeout=10) if os.path.exists(SSH) else None
    found["openssh"] = (result.stderr or result.stdout).strip() if result else None
    return found


def emit(result: dict) -> None:
    """The benchmark's result: one JSON object on the last line of output."""
    print(json.dumps(result, sort_keys=False))


Measure = TypeVar("Measure")


def alternate(rounds: int, measures: dict[str, Callable[[], Measure]]) -> dict[str, list[Measure]]:
    """Run each measure once per round, in turn, so machine noise lands on all paths alike."""
    results: dict[str, list[Measure]] = {name: [] for name in measures}
    for _ in range(rounds):
        for name, measure in measures.items():
            results[name].append(measure())
    return results


def str_arg(name: str, default: str) -> str:
    """``--name VALUE`` from argv (``--agent-event-loop asyncio``: the agents' loop, as their config sets it)."""
    flag = f"--{name}"
    if flag in sys.argv:
        return sys.argv[sys.argv.index(flag) + 1]
    return default


def int_arg(name: str, default: int) -> int:
    """``--name N`` from argv, for the smoke test's small sizes."""
    flag = f"--{name}"
    if flag in sys.argv:
        return int(sys.argv[sys.argv.index(flag) + 1])
    return default
