"""Whole agent processes under Debian's ``faketime``: a gateway whose clock reads 1970, or a year ahead.

libfaketime (LD_PRELOAD) makes everything in the agent process read the wrong
clock: Python, ntplib, and OpenSSL's certificate checks alike. The controller
runs on the real clock. The agent's NTP server is a loopback port nobody
answers (a cellular APN that blocks UDP 123), so only the controller's time,
fetched over TLS pinned to its CA, can correct the clock.

The library is preloaded directly rather than through the ``faketime``
wrapper, which would stand between the test and the agent and not pass
SIGTERM on. The multi-threaded build is used because the agent runs NTP
queries and key operations in threads. The monotonic clock is left alone
(FAKETIME_DONT_FAKE_MONOTONIC): asyncio's timers and the anchor of trusted
time run on it, and a gateway that boots in 1970 has a sane monotonic clock too.
"""

from __future__ import annotations

import glob
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.agent.clock.ntp_responder import NtpResponder
from tests.e2e.harness import (
    EchoServer,
    Process,
    free_port,
    python_env,
    read_status,
    round_trip,
    run_cli,
    wait_until,
)

#: Where Debian's faketime package puts the library, on any architecture.
LIBFAKETIME = next(iter(sorted(glob.glob("/usr/lib/*/faketime/libfaketimeMT.so.1"))), None)
pytestmark = pytest.mark.skipif(LIBFAKETIME is None, reason="faketime is not installed (scripts/setup installs it)")

#: libfaketime specs: "@" starts the clock at that moment and lets it run.
FAKE_CLOCKS = {"1970": "@1970-01-02 00:00:00", "year-ahead": "+366d"}
#: How each wrong clock is described, from the agent's clock sentence.
CLOCK_SENTENCES = {
    "1970": re.compile(r"the clock is off by \d+ years \d+ days? \(behind: local 1970-01-02 \d\d:\d\d UTC, "
                       r"controller \d{4}-"),
    "year-ahead": re.compile(r"the clock is off by 1 year 1 day \(ahead: local \d{4}-"),
}
#: Starting a Python process under LD_PRELOAD costs no more than without; an
#: agent command talks to loopback only.
COMMAND_TIMEOUT = 60.0
#: Enroll, measure and connect on loopback take seconds; a loaded CI machine gets more.
CONNECT_TIMEOUT = 60.0
#: The NTP query waits this long for the server nobody runs.
NTP_TIMEOUT = 1.0
#: Trusted time must match the real clock this closely (two loopback round trips, and scheduling).
TRUSTED_TIME_SLACK = 30.0


def faketime_env(spec: str) -> dict[str, str]:
    """The environment of a process whose wall clock reads ``spec`` (a libfaketime spec)."""
    assert LIBFAKETIME is not None
    return {**python_env(), "LD_PRELOAD": LIBFAKETIME, "FAKETIME": spec, "FAKETIME_DONT_FAKE_MONOTONIC": "1"}


def agent_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "agent", *args]


def run_faked(spec: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(agent_argv(*args), capture_output=True, text=True, timeout=COMMAND_TIMEOUT,
                          env=faketime_env(spec))


def silent_ntp_server() -> str:
    """A loopback UDP port with nobody behind it (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


class ControllerProcess:
    """``outpost-controller serve`` on a fixed loopback port (tokens name it), on the real clock
    unless ``faketime`` gives a libfaketime spec."""

    def __init__(self, data: Path, port: int, *flags: str, faketime: str | None = None) -> None:
        argv = [sys.executable, "-m", "controller.cli", "serve", "--data", str(data),
                "--listen", f"127.0.0.1:{port}", *flags]
        self.process = Process(argv, env=faketime_env(faketime) if faketime else python_env())
        line = self.process.wait_for_line("ready on https://")
        self.url = line.split("ready on ", 1)[1].split()[0]
        self.data = data

    def ctl(self, *args: str) -> subprocess.CompletedProcess:
        env = python_env()
        env["OUTPOSTCTL_CONFIG"] = str(self.data / "outpostctl.toml")
        result = run_cli("outpostctl", *args, env=env)
        assert result.returncode == 0, f"outpostctl {' '.join(args)}: {result.stderr}"
        return result

    def stop(self) -> None:
        self.process.stop()


@pytest.fixture
def controller(tmp_path: Path):
    running = ControllerProcess(tmp_path / "controller", free_port())
    try:
        yield running
    finally:
        running.stop()


def write_config(tmp_path: Path, *, ntp: str, token: Path | None = None, binds: dict[str, int] | None = None) -> Path:
    lines = [f'state_dir = "{tmp_path / "state"}"', "", "[keystore]", 'backend = "software"', "",
             "[clock]", f'ntp_servers = ["{ntp}"]', f"ntp_timeout = {NTP_TIMEOUT}", ""]
    if token is not None:
        lines += ["[enrollment]", f'token_paths = ["{token}"]', ""]
    for service, port in (binds or {}).items():
        lines += ["[[bind]]", f'service = "{service}"', f'target = "127.0.0.1:{port}"', ""]
    path = tmp_path / "agent.toml"
    path.write_text("\n".join(lines))
    return path


def new_token(controller: ControllerProcess, tmp_path: Path, name: str, *flags: str) -> Path:
    token = tmp_path / f"{name}.token"
    controller.ctl("identity", "create", name, *flags, "--token-out", str(token))
    return token


def expected_offset(which: str, started: float) -> float:
    """Seconds to add to the faked clock of a process started at real time ``started``."""
    return started - 86400.0 if which == "1970" else -366 * 86400.0


def stored_identity(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "state" / "identity.json").read_text())


@pytest.mark.parametrize("which", sorted(FAKE_CLOCKS))
def test_a_gateway_with_a_wrong_clock_enrolls_and_renews_and_says_how_far_off_its_clock_is(
        controller: ControllerProcess, tmp_path: Path, which: str) -> None:
    token = new_token(controller, tmp_path, "gw-clock")
    config = write_config(tmp_path, ntp=silent_ntp_server())

    enrolled = run_faked(FAKE_CLOCKS[which], "enroll", "--token", str(token), "--config", str(config))

    assert enrolled.returncode == 0, enrolled.stderr
    assert enrolled.stdout.startswith("enrolled as spiffe://")
    assert CLOCK_SENTENCES[which].search(enrolled.stdout), enrolled.stdout
    assert "using the controller's time" in enrolled.stdout
    assert abs(stored_identity(tmp_path)["enrolled_at"] - time.time()) < TRUSTED_TIME_SLACK

    before = (tmp_path / "state" / "cert.pem").read_bytes()
    renewed = run_faked(FAKE_CLOCKS[which], "renew", "--config", str(config))

    assert renewed.returncode == 0, renewed.stderr
    assert renewed.stdout.startswith("certificate renewed; valid until ")
    assert CLOCK_SENTENCES[which].search(renewed.stdout), renewed.stdout
    assert (tmp_path / "state" / "cert.pem").read_bytes() != before
    events = [e["event"] for e in json.loads(controller.ctl("audit", "--json").stdout)["events"]]
    assert "renewal" in events


def test_an_ntp_server_that_answers_is_believed_when_the_controller_agrees(
        controller: ControllerProcess, tmp_path: Path) -> None:
    token = new_token(controller, tmp_path, "gw-ntp")
    with NtpResponder() as ntp:  # on the real clock, like the controller
        config = write_config(tmp_path, ntp=ntp.address)
        enrolled = run_faked(FAKE_CLOCKS["1970"], "enroll", "--token", str(token), "--config", str(config))

    assert enrolled.returncode == 0, enrolled.stderr
    assert ntp.requests >= 1
    assert "(behind: local 1970-01-02" in enrolled.stdout and "using NTP time" in enrolled.stdout, enrolled.stdout


@pytest.mark.parametrize("which", sorted(FAKE_CLOCKS))
def test_a_gateway_with_a_wrong_clock_enrolls_from_a_token_file_tunnels_and_reports_trusted_times(
        controller: ControllerProcess, echo_server: EchoServer, tmp_path: Path, which: str) -> None:
    controller.ctl("service", "create", "modbus")
    controller.ctl("policy", "create", "--kind", "bind", "--identities", "gw-field", "--services", "modbus")
    controller.ctl("policy", "create", "--kind", "dial", "--identities", "role:operator", "--services", "modbus")
    token = new_token(controller, tmp_path, "gw-field")
    config = write_config(tmp_path, ntp=silent_ntp_server(), token=token, binds={"modbus": echo_server.port})
    state = tmp_path / "state"

    started = time.time()
    agent = Process(agent_argv("run", "--config", str(config)), env=faketime_env(FAKE_CLOCKS[which]))
    try:
        wait_until(lambda: read_status(state).get("state") == "connected", timeout=CONNECT_TIMEOUT,
                   what=f"the agent ({which}) connected")
        assert not token.exists(), "the redeemed token is retired"
        status = read_status(state)
        real_now = time.time()
        assert status["clock_source"] == "controller"
        assert abs(status["clock_offset_s"] - expected_offset(which, started)) < TRUSTED_TIME_SLACK
        for key in ("connected_since", "updated"):
            assert abs(status[key] - real_now) < TRUSTED_TIME_SLACK, f"{key} is trusted time, not the faked clock"
        assert status["cert_not_after"] > status["next_renewal"] > real_now

        port = free_port()
        connect = Process([sys.executable, "-m", "outpostctl", "connect", "modbus", "--listen", f"127.0.0.1:{port}"],
                          env={**python_env(), "OUTPOSTCTL_CONFIG": str(controller.data / "outpostctl.toml")})
        try:
            connect.wait_for_line("listening")
            payload = os.urandom(100_000)
            assert round_trip(port, payload) == payload, "the tunnel carries a stream"
        finally:
            connect.stop()

        shown = run_faked(FAKE_CLOCKS[which], "status", "--config", str(config))
        assert shown.returncode == 0, shown.stderr
        assert CLOCK_SENTENCES[which].search(shown.stdout), shown.stdout
        assert re.search(r"^next renewal: \d{4}-\d\d-\d\d \d\d:\d\d UTC \(in \d+ h \d+ min\)$", shown.stdout, re.M), \
            shown.stdout
        assert "(EXPIRED)" not in shown.stdout
    finally:
        assert agent.stop() == 0, agent.output
    assert "waiting for the clock to be set" not in agent.output
