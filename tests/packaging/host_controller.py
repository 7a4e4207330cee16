"""A controller on the host's loopback for booted gateways to enroll against, and outpostctl.

The container shares the host's network, so ``https://127.0.0.1:PORT`` in a
token reaches this controller from inside it too.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONTROLLER_START_SECONDS = 30
PROCESS_TIMEOUT_SECONDS = 30


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def python(module: str, *args: str) -> list[str]:
    """The command line running ``module``'s CLI from this checkout."""
    return [sys.executable, "-c", f"import sys; from {module}.cli import main; sys.exit(main(sys.argv[1:]))", *args]


@dataclass
class HostController:
    ctl_config: Path
    port: int

    def outpostctl(self, *args: str) -> str:
        result = subprocess.run(python("outpostctl", "--config", str(self.ctl_config), *args), cwd=REPO,
                                capture_output=True, text=True, timeout=PROCESS_TIMEOUT_SECONDS)
        assert result.returncode == 0, result.stderr
        return result.stdout


@contextmanager
def host_controller(data: Path) -> Iterator[HostController]:
    """``outpost-controller serve`` on 127.0.0.1, stopped (its port closed) on leaving."""
    port = free_port()
    process = subprocess.Popen(python("controller", "serve", "--data", str(data), "--listen", f"127.0.0.1:{port}"),
                               cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + CONTROLLER_START_SECONDS
        while not (data / "outpostctl.toml").exists():
            assert process.poll() is None and time.monotonic() < deadline, "controller did not start"
            time.sleep(0.2)
        yield HostController(data / "outpostctl.toml", port)
    finally:
        process.terminate()
        process.wait(timeout=PROCESS_TIMEOUT_SECONDS)
