"""A real controller on loopback for the outpostctl tests, and ways to run outpostctl.

Every wait is bounded and every process started here is stopped by its fixture.
"""

from __future__ import annotations

import datetime
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from outpostctl.cli import main

ROOT = Path(__file__).resolve().parents[2]
#: A controller creates its CA and TLS key on first start: well under a second
#: here, so ten times that covers a slow CI machine.
START_TIMEOUT_SECONDS = 20.0
#: Terminating a controller closes its listener and SQLite store; that is quick.
STOP_TIMEOUT_SECONDS = 10.0
#: One outpostctl run is a Python start-up and one HTTPS request.
CLI_TIMEOUT_SECONDS = 30.0
READY_LINE = re.compile(r"outpost-controller ready on (https://\S+) \(CA (sha256:[0-9a-f]+); outpostctl config: (.+)\)")


def subprocess_env(**overrides: str) -> dict[str, str]:
    """The environment for a child: this checkout importable, no stray outpostctl config."""
    env = dict(os.environ)
    env.pop("OUTPOSTCTL_CONFIG", None)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(overrides)
    return env


@dataclass
class RunningController:
    data: Path
    url: str
    ca_fingerprint: str
    config_path: Path
    process: subprocess.Popen
    output: list[str]


def start_controller(data: Path) -> RunningController:
    """Start ``outpost-controller serve`` on 127.0.0.1:0 and wait for its ready line."""
    process = subprocess.Popen(
        [sys.executable, "-m", "controller.cli", "serve", "--data", str(data), "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=subprocess_env(), cwd=ROOT,
    )
    output: list[str] = []
    ready = threading.Event()

    def drain() -> None:
        # Keep reading to the end so a chatty controller never blocks on a full pipe.
        assert process.stdout is not None
        for line in process.stdout:
            output.append(line.rstrip("\n"))
            if READY_LINE.search(line):
                ready.set()

    threading.Thread(target=drain, daemon=True).start()
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while not ready.wait(0.05):
        if process.poll() is not None or time.monotonic() > deadline:
            stop_process(process)
            joined = "\n".join(output)
            raise AssertionError(f"the controller did not print its ready line (exit {process.returncode}):\n{joined}")
    match = next(m for m in map(READY_LINE.search, output) if m)
    return RunningController(data=data, url=match.group(1), ca_fingerprint=match.group(2),
                             config_path=Path(match.group(3)), process=process, output=output)


def stop_process(process: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL if it has not exited within STOP_TIMEOUT_SECONDS."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STOP_TIMEOUT_SECONDS)


@dataclass
class CliResult:
    code: int
    out: str
    err: str


class Ctl:
    """``outpostctl`` run in this process through ``main``, its output captured."""

    def __init__(self, capsys: pytest.CaptureFixture[str]) -> None:
        self._capsys = capsys

    def __call__(self, *args: str) -> CliResult:
        self._capsys.readouterr()
        code = main(list(args))
        captured = self._capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    def ok(self, *args: str) -> CliResult:
        """Run a command that must succeed without a word on stderr."""
        result = self(*args)
        assert result.code == 0, f"outpostctl {' '.join(args)} exited {result.code}: {result.err}"
        assert result.err == ""
        return result


def run_outpostctl(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> CliResult:
    """``python -m outpostctl ARGS`` as a child process, as an operator's shell runs it."""
    completed = subprocess.run([sys.executable, "-m", "outpostctl", *args], capture_output=True, text=True,
                               timeout=CLI_TIMEOUT_SECONDS, env=env or subprocess_env(), cwd=cwd or ROOT)
    return CliResult(completed.returncode, completed.stdout, completed.stderr)


def other_ca_pem(folder: Path) -> Path:
    """A CA certificate that did not issue the controller's certificate."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "not the outpost CA")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    path = folder / "other-ca.pem"
    path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return path
