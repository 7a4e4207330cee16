"""Real processes on loopback: the controller, agents, outpostctl, a TCP service.

Every wait is bounded; every process is stopped at the end of its test.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# A Python process importing aiohttp and cryptography starts in well under a
# second here; slow CI machines get ten times that.
START_TIMEOUT = 20.0


def admin_token_in(data_dir: Path) -> str:
    """The admin token in the outpostctl.toml a controller wrote into ``data_dir`` (it keeps only a hash)."""
    import tomllib

    return tomllib.loads((data_dir / "outpostctl.toml").read_text())["token"]


def python_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("OUTPOSTCTL_CONFIG", None)
    return env


def run_cli(module: str, *args: str, timeout: float = 60.0, env: dict | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          timeout=timeout, env=env or python_env(), cwd=cwd)


class Process:
    """A background process whose output is collected for the test report."""

    def __init__(self, argv: list[str], env: dict | None = None, cwd: Path | None = None) -> None:
        self.argv = argv
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=env or python_env(), cwd=cwd)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for_line(self, prefix: str, timeout: float = START_TIMEOUT) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if prefix in line:
                    return line
            if self.proc.poll() is not None:
                time.sleep(0.1)
                raise AssertionError(f"{self.argv[2:4]} exited {self.proc.returncode}:\n{self.output}")
            time.sleep(0.02)
        raise AssertionError(f"no line containing {prefix!r} within {timeout} s:\n{self.output}")

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        self._reader.join(2.0)
        return self.proc.returncode


def controller_argv(data: Path) -> list[str]:
    """``outpost-controller serve`` on DATA, on a free loopback port."""
    return [sys.executable, "-m", "controller.cli", "serve", "--data", str(data), "--listen", "127.0.0.1:0"]


class Controller:
    def __init__(self, data: Path) -> None:
        self.data = data
        self.process = Process(controller_argv(data))
        line = self.process.wait_for_line("ready on https://")
        self.url = line.split("ready on ", 1)[1].split()[0]
        self.ctl_config = data / "outpostctl.toml"

    def ctl(self, *args: str, check: bool = True, timeout: float = 60.0) -> subprocess.CompletedProcess:
        env = python_env()
        env["OUTPOSTCTL_CONFIG"] = str(self.ctl_config)
        result = run_cli("outpostctl", *args, env=env, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"outpostctl {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
        return result

    def ctl_process(self, *args: str) -> Process:
        env = python_env()
        env["OUTPOSTCTL_CONFIG"] = str(self.ctl_config)
        return Process([sys.executable, "-m", "outpostctl", *args], env=env)


class EchoServer:
    """A TCP service on 127.0.0.1 that echoes every byte (the gateway's Modbus, say)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                conn.sendall(data)

    def close(self) -> None:
        self.sock.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def round_trip(port: int, payload: bytes, timeout: float = 10.0) -> bytes:
    """Send ``payload`` to 127.0.0.1:port, half-close, read everything back."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            data = s.recv(65536)
            if not data:
                break
            chunks.append(data)
    return b"".join(chunks)


def wait_until(predicate, timeout: float = START_TIMEOUT, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"{what} not reached within {timeout} s")


def read_status(state: Path) -> dict:
    try:
        return json.loads((state / "status.json").read_text())
    except (OSError, ValueError):
        return {}
