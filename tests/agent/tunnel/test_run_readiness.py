"""``outpost-agent run`` on an enrolled gateway that cannot reach its controller tells systemd it is up.

A real agent process, enrolled against the real controller on loopback,
which is then stopped. A datagram socket stands in for systemd's notify
socket (the booted-container test, tests/packaging/test_boot_offline.py,
runs the same under systemd itself). The gateway must report READY=1 with
a status line saying it is offline and why, keep pinging the watchdog,
and keep running: systemd would otherwise kill it at its start timeout.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.agent.identity.test_renewal_keeper import age_certificate, enrolled_gateway
from tests.controller.harness import run, running_controller
from tests.e2e.harness import ROOT, python_env

# 0.5 s pings (half the interval): several arrive within each wait below.
WATCHDOG_USEC = "1000000"
# The agent starts, measures its clock and fails its first connection to a
# closed loopback port within a few seconds; a loaded machine gets more.
READY_WAIT_SECONDS = 30.0
STOP_TIMEOUT_SECONDS = 10.0


class NotifySocket:
    """Collects every sd_notify datagram the agent sends, in order."""

    def __init__(self) -> None:
        self.folder = tempfile.mkdtemp(prefix="sdn-")  # AF_UNIX paths are short: not tmp_path
        self.address = os.path.join(self.folder, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.address)
        self.received: list[dict[str, str]] = []

    def wait_for(self, key: str, timeout: float = READY_WAIT_SECONDS) -> dict[str, str]:
        """The first datagram holding ``key`` (all datagrams until then are kept)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                break
            message = dict(line.split("=", 1) for line in data.decode().splitlines())
            self.received.append(message)
            if key in message:
                return message
        raise AssertionError(f"no {key} within {timeout} s; received {self.received}")

    def close(self) -> None:
        self.sock.close()
        shutil.rmtree(self.folder)


@pytest.fixture
def notify() -> Iterator[NotifySocket]:
    receiver = NotifySocket()
    try:
        yield receiver
    finally:
        receiver.close()


def offline_gateway(tmp_path: Path, expired: bool) -> Path:
    """A gateway enrolled against a controller that is gone now; its config file."""
    async def scenario() -> Path:
        async with running_controller(tmp_path / "controller") as running:
            state = await enrolled_gateway(running, tmp_path, "gw")
            if expired:
                age_certificate(running, state, days=2)
            return state.path

    state = run(scenario())
    config = tmp_path / "agent.toml"
    config.write_text(f'state_dir = "{state}"\n[keystore]\nbackend = "software"\n')
    return config


def start_agent(config: Path, notify: NotifySocket) -> subprocess.Popen:
    env = {**python_env(), "NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": WATCHDOG_USEC}
    return subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(config)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def stop(agent: subprocess.Popen) -> str:
    agent.send_signal(signal.SIGTERM)
    try:
        _, stderr = agent.communicate(timeout=STOP_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        agent.kill()
        _, stderr = agent.communicate()
    return stderr


def test_an_enrolled_gateway_whose_controller_is_gone_is_ready_says_offline_and_keeps_its_watchdog_fed(
    tmp_path: Path, notify: NotifySocket
) -> None:
    agent = start_agent(offline_gateway(tmp_path, expired=False), notify)
    try:
        ready = notify.wait_for("READY")
        # Start-up pings already: the watchdog guards start-up, not only the run.
        assert {"WATCHDOG": "1"} in notify.received[: notify.received.index(ready)], notify.received
        assert ready["STATUS"].startswith("offline: cannot reach the relay at wss://127.0.0.1:"), ready
        assert "; trying again in " in ready["STATUS"], ready
        assert any(m.get("STATUS", "").startswith("connecting to wss://127.0.0.1:") for m in notify.received)
        del notify.received[:]
        # Ready and still pinging: a watchdog of a second would have fired by now otherwise.
        notify.wait_for("WATCHDOG")
        notify.wait_for("WATCHDOG")
        assert agent.poll() is None
    finally:
        stderr = stop(agent)
    # Logs go to the journal (NOTIFY_SOCKET says systemd); an unhandled crash would be here.
    assert "Traceback" not in stderr, stderr


def test_an_expired_gateway_that_cannot_recover_yet_is_ready_and_says_why(tmp_path: Path, notify: NotifySocket) -> None:
    agent = start_agent(offline_gateway(tmp_path, expired=True), notify)
    try:
        ready = notify.wait_for("READY")
        assert ready["STATUS"].startswith("offline: the certificate expired and recovering it failed ("), ready
        assert ready["STATUS"].endswith(" s"), ready
        del notify.received[:]
        notify.wait_for("WATCHDOG")
        assert agent.poll() is None
    finally:
        stderr = stop(agent)
    assert "Traceback" not in stderr, stderr
