"""Processes on a chosen clock: libfaketime preloaded, and a controller on a fixed port.

libfaketime (Debian's faketime package) makes everything in a process read
the wrong wall clock: Python, ntplib and OpenSSL's certificate checks alike.
It is preloaded directly rather than through the ``faketime`` wrapper, which
would stand between the test and the process and not pass SIGTERM on. The
multi-threaded build is used because the agent runs NTP queries and key
operations in threads. The monotonic clock is left alone
(FAKETIME_DONT_FAKE_MONOTONIC): asyncio's timers and the anchor of trusted
time run on it, and a gateway that boots in 1970 has a sane monotonic clock too.
"""

from __future__ import annotations

import glob
import socket
import subprocess
import sys
from pathlib import Path

from tests.e2e.harness import Process, python_env, run_cli

#: Where Debian's faketime package puts the library, on any architecture.
LIBFAKETIME = next(iter(sorted(glob.glob("/usr/lib/*/faketime/libfaketimeMT.so.1"))), None)
#: libfaketime specs: "@" starts the clock at that moment and lets it run.
FAKE_CLOCKS = {"1970": "@1970-01-02 00:00:00", "year-ahead": "+366d"}


def faketime_env(spec: str | None) -> dict[str, str]:
    """The environment of a process whose wall clock reads ``spec`` (None: the real clock)."""
    if spec is None:
        return python_env()
    assert LIBFAKETIME is not None, "faketime is not installed (scripts/setup installs it)"
    return {**python_env(), "LD_PRELOAD": LIBFAKETIME, "FAKETIME": spec, "FAKETIME_DONT_FAKE_MONOTONIC": "1"}


def agent_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "agent", *args]


def silent_ntp_server() -> str:
    """A loopback UDP port with nobody behind it (bound, then released): NTP blocked on the APN."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


class ControllerProcess:
    """``outpost-controller serve`` on a fixed loopback port (tokens and relay lists name it),
    so it can be restarted at the same address; on the real clock unless ``faketime`` is a spec."""

    def __init__(self, data: Path, port: int, *flags: str, faketime: str | None = None) -> None:
        argv = [sys.executable, "-m", "controller.cli", "serve", "--data", str(data),
                "--listen", f"127.0.0.1:{port}", *flags]
        self.process = Process(argv, env=faketime_env(faketime))
        line = self.process.wait_for_line("ready on https://")
        self.url = line.split("ready on ", 1)[1].split()[0]
        self.data = data
        self.ctl_env = {**python_env(), "OUTPOSTCTL_CONFIG": str(data / "outpostctl.toml")}

    def ctl(self, *args: str) -> subprocess.CompletedProcess:
        result = run_cli("outpostctl", *args, env=self.ctl_env)
        assert result.returncode == 0, f"outpostctl {' '.join(args)}: {result.stderr}"
        return result

    def ctl_process(self, *args: str) -> Process:
        return Process([sys.executable, "-m", "outpostctl", *args], env=self.ctl_env)

    def stop(self) -> None:
        self.process.stop()


def write_agent_config(directory: Path, *, ntp: str | None = None, token: Path | None = None,
                       binds: dict[str, int] | None = None, ntp_timeout: float = 1.0) -> Path:
    """``directory/agent.toml`` for an agent whose state is ``directory/state``, software key."""
    lines = [f'state_dir = "{directory / "state"}"', "", "[keystore]", 'backend = "software"', ""]
    if ntp is not None:
        lines += ["[clock]", f'ntp_servers = ["{ntp}"]', f"ntp_timeout = {ntp_timeout}", ""]
    if token is not None:
        lines += ["[enrollment]", f'token_paths = ["{token}"]', ""]
    for service, port in (binds or {}).items():
        lines += ["[[bind]]", f'service = "{service}"', f'target = "127.0.0.1:{port}"', ""]
    path = directory / "agent.toml"
    path.write_text("\n".join(lines))
    return path
