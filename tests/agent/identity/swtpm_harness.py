"""A real software TPM (swtpm) on loopback, for every test that needs a TPM.

swtpm is started in socket mode with no resource manager in front of it, which
is the harshest setting: a transient object the key store forgets to flush
stays in the TPM and the fourth one fails.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

SWTPM = shutil.which("swtpm")
LOOPBACK = "127.0.0.1"
#: swtpm is listening within a few hundred ms here; ten seconds covers a loaded CI box.
START_TIMEOUT = 10.0
#: Delay between readiness probes while swtpm starts.
POLL_INTERVAL = 0.02
#: SIGTERM makes swtpm save its state and exit at once; past this it is killed.
STOP_TIMEOUT = 5.0
#: Attempts at finding two adjacent free ports (server and control) before giving up.
PORT_ATTEMPTS = 50
#: Ports are drawn below Linux's default ephemeral range (32768-60999): there,
#: outgoing connections (ours included) never hold the control port P + 1.
PORT_RANGE = (20000, 32000)
#: Another process may take a port between the check and swtpm's bind; try afresh.
START_ATTEMPTS = 3
#: swtpm's log level at which it writes every command it receives, in hex.
COMMAND_LOG_LEVEL = 20
#: TPM 2.0 command codes (TPM 2.0 Part 2, TPM_CC) that tests count.
CC_CREATE_PRIMARY = 0x131
CC_LOAD = 0x157
CC_SIGN = 0x15D
#: A command starts with tag (2 bytes) and size (4); the command code follows.
_CC_OFFSET = 6


def free_port_pair() -> int:
    """A port P such that P and P + 1 are free on loopback right now."""
    for _ in range(PORT_ATTEMPTS):
        port = random.randrange(*PORT_RANGE)
        if _bindable(port) and _bindable(port + 1):
            return port
    raise RuntimeError("no two adjacent free loopback ports found")


def _bindable(port: int) -> bool:
    with socket.socket() as probe:
        # swtpm sets SO_REUSEADDR too, so a TIME_WAIT left by an earlier test does not count.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def closed_port() -> int:
    """A loopback port that nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


class Swtpm:
    """One swtpm process: its TCTI string, and the ways a field TPM loses keys."""

    def __init__(self, workdir: Path, log_commands: bool = False) -> None:
        if SWTPM is None:
            pytest.skip("swtpm is not installed (Debian package: swtpm)")
        self.workdir = workdir
        self.state_dir = workdir / "tpm-state"
        self.log_path = workdir / "swtpm.log"
        #: swtpm writes every command here when ``log_commands`` (see ``commands()``).
        self.command_log = workdir / "swtpm-commands.log"
        self.log_commands = log_commands
        self.port = free_port_pair()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def tcti(self) -> str:
        return f"swtpm:host={LOOPBACK},port={self.port}"

    def start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        command = [
            SWTPM, "socket", "--tpm2",
            "--server", f"type=tcp,port={self.port},bindaddr={LOOPBACK}",
            "--ctrl", f"type=tcp,port={self.port + 1},bindaddr={LOOPBACK}",
            "--tpmstate", f"dir={self.state_dir}",
            "--flags", "not-need-init,startup-clear",
        ]
        if self.log_commands:
            command += ["--log", f"file={self.command_log},level={COMMAND_LOG_LEVEL}"]
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"swtpm exited with {self._process.returncode}: {self.log_path.read_text()}")
            if _listening(self.port) and _listening(self.port + 1):
                return
            time.sleep(POLL_INTERVAL)
        self.stop()
        raise RuntimeError(f"swtpm did not listen on {LOOPBACK}:{self.port} within {START_TIMEOUT} s")

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STOP_TIMEOUT)

    def clear(self) -> None:
        """TPM2_Clear through the lockout hierarchy, as ``tpm2_clear`` does: new owner seed."""
        from agent.identity.tss import ESAPI, ESYS_TR, TCTILdr

        with TCTILdr("swtpm", f"host={LOOPBACK},port={self.port}") as tcti:
            with ESAPI(tcti) as esapi:
                esapi.clear(ESYS_TR.RH_LOCKOUT)

    def replace(self) -> None:
        """Another TPM on the same address: stop, wipe the state, start again."""
        self.stop()
        shutil.rmtree(self.state_dir)
        self.start()

    def commands(self) -> list[int]:
        """The command codes this TPM received so far (across restarts), oldest first.

        Read from swtpm's own log of the bytes it got, so it counts what
        reached the chip whatever the client did.
        """
        if not self.log_commands:
            raise RuntimeError("start swtpm with log_commands=True to count its commands")
        try:
            lines = self.command_log.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []
        codes: list[int] = []
        command: bytearray | None = None
        for line in lines + [""]:
            text = line.strip()
            if command is not None and text and all(len(b) == 2 for b in text.split()):
                try:
                    command += bytes.fromhex(text)
                    continue
                except ValueError:
                    pass
            if command is not None and len(command) >= _CC_OFFSET + 4:
                codes.append(int.from_bytes(command[_CC_OFFSET:_CC_OFFSET + 4], "big"))
            command = bytearray() if text.startswith("SWTPM_IO_Read:") else None
        return codes

    def esapi(self):  # type: ignore[no-untyped-def]
        """An ESAPI context for test set-up; the caller closes it (and its TCTI)."""
        from agent.identity.tss import ESAPI

        return ESAPI(self.tcti)


def _listening(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=POLL_INTERVAL * 10):
            return True
    except OSError:
        return False


def started_swtpm(workdir: Path, log_commands: bool = False) -> Swtpm:
    """A fresh swtpm with its own state in ``workdir``, started (retrying port clashes)."""
    tpm = Swtpm(workdir, log_commands)
    for attempt in range(1, START_ATTEMPTS + 1):
        try:
            tpm.start()
            return tpm
        except RuntimeError:
            if attempt == START_ATTEMPTS:
                raise
            tpm.port = free_port_pair()
    return tpm


@contextmanager
def running_swtpm(workdir: Path, log_commands: bool = False) -> Iterator[Swtpm]:
    """A started swtpm (see :func:`started_swtpm`), stopped on leaving."""
    tpm = started_swtpm(workdir, log_commands=log_commands)
    try:
        yield tpm
    finally:
        tpm.stop()


@pytest.fixture
def counted_swtpm(tmp_path: Path) -> Iterator[Swtpm]:
    """A fresh swtpm that logs every command it receives, so a test counts what reached it."""
    with running_swtpm(tmp_path / "counted-swtpm", log_commands=True) as tpm:
        yield tpm
