"""Whole agent processes under libfaketime: a gateway whose clock reads 1970, or a year ahead.

The controller runs on the real clock (tests/e2e/clock_harness.py). The
agent's NTP server is a loopback port nobody answers (a cellular APN that
blocks UDP 123), so only the controller's time, fetched over TLS pinned to
its CA, can correct the clock.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.agent.clock.ntp_responder import NtpResponder
from tests.e2e.clock_harness import (
    FAKE_CLOCKS,
    LIBFAKETIME,
    ControllerProcess,
    agent_argv,
    faketime_env,
    silent_ntp_server,
    write_agent_config,
)
from tests.e2e.harness import EchoServer, Process, free_port, read_status, round_trip, wait_until

pytestmark = pytest.mark.skipif(LIBFAKETIME is None, reason="faketime is not installed (scripts/setup installs it)")

#: How each wrong clock is described, from the agent's clock sentence.
CLOCK_SENTENCES = {
    "1970": re.compile(r"the clock is off by \d+ years \d+ days? \(behind: local 1970-01-02 \d\d:\d\d UTC, "
                       r"controller \d{4}-"),
    "year-ahead": re.compile(r"the clock is off by 36[5-7] days \(ahead: local \d{4}-"),
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


def run_faked(spec: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(agent_argv(*args), capture_output=True, text=True, timeout=COMMAND_TIMEOUT,
                          env=faketime_env(spec))


@pytest.fixture
def controller(tmp_path: Path):
    running = ControllerProcess(tmp_path / "controller", free_port())
    try:
        yield running
    finally:
        running.stop()


def write_config(tmp_path: Path, *, ntp: str, token: Path | None = None, binds: dict[str, int] | None = None) -> Path:
    return write_agent_config(tmp_path, ntp=ntp, token=token, binds=binds, ntp_timeout=NTP_TIMEOUT)


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
        connect = controller.ctl_process("connect", "modbus", "--listen", f"127.0.0.1:{port}")
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


#: The controller's clock two days before its own CA was made: the time it reports is provably wrong.
CONTROLLER_BEFORE_ITS_CA = "-2d"
UNTRUSTWORTHY = re.compile(r"the controller at https://127\.0\.0\.1:\d+ reports \d{4}-\d\d-\d\d \d\d:\d\d UTC, "
                           r"before its own CA was created \(\d{4}-\d\d-\d\d \d\d:\d\d UTC\); refusing to trust that "
                           r"time — check the controller's clock; no NTP server answered either, so nothing can tell "
                           r"this gateway the time: fix the controller's clock or allow NTP \(UDP port 123\)")


def state_snapshot(state: Path) -> dict[str, bytes]:
    if not state.exists():
        return {}
    return {p.name: p.read_bytes() for p in sorted(state.iterdir()) if p.is_file() and p.name != "status.json"}


def test_when_even_the_controllers_time_cannot_be_trusted_enroll_says_why_in_one_line_and_the_token_stays_good(
        tmp_path: Path) -> None:
    port, data = free_port(), tmp_path / "controller"
    controller = ControllerProcess(data, port)
    token = new_token(controller, tmp_path, "gw-lost")
    controller.stop()
    config = write_config(tmp_path, ntp=silent_ntp_server())

    wrong = ControllerProcess(data, port, faketime=CONTROLLER_BEFORE_ITS_CA)
    try:
        refused = run_faked(FAKE_CLOCKS["1970"], "enroll", "--token", str(token), "--config", str(config))
    finally:
        wrong.stop()

    assert refused.returncode == 75, refused.stderr
    assert refused.stdout == "" and refused.stderr.count("\n") == 1 and "Traceback" not in refused.stderr
    assert UNTRUSTWORTHY.fullmatch(refused.stderr.strip().removeprefix("outpost-agent: ")), refused.stderr
    assert not (tmp_path / "state").exists(), "nothing was created"

    # Nothing was spent either: once the controller's clock is right, the same token enrolls.
    controller = ControllerProcess(data, port)
    try:
        enrolled = run_faked(FAKE_CLOCKS["1970"], "enroll", "--token", str(token), "--config", str(config))
    finally:
        controller.stop()
    assert enrolled.returncode == 0, enrolled.stderr


def test_when_even_the_controllers_time_cannot_be_trusted_run_says_why_keeps_the_tunnel_down_and_changes_nothing(
        tmp_path: Path) -> None:
    port, data = free_port(), tmp_path / "controller"
    controller = ControllerProcess(data, port)
    try:
        token = new_token(controller, tmp_path, "gw-lost")
        config = write_config(tmp_path, ntp=silent_ntp_server())
        assert run_faked(FAKE_CLOCKS["1970"], "enroll", "--token", str(token), "--config", str(config)).returncode == 0
    finally:
        controller.stop()
    state = tmp_path / "state"
    before = state_snapshot(state)

    wrong = ControllerProcess(data, port, faketime=CONTROLLER_BEFORE_ITS_CA)
    agent = Process(agent_argv("run", "--config", str(config)), env=faketime_env(FAKE_CLOCKS["1970"]))
    try:
        wait_until(lambda: read_status(state).get("last_error"), timeout=CONNECT_TIMEOUT, what="a failed tunnel")
        status = read_status(state)
        shown = run_faked(FAKE_CLOCKS["1970"], "status", "--config", str(config))
    finally:
        assert agent.stop() == 0, agent.output
        wrong.stop()

    assert status["state"] != "connected" and status["clock_source"] == "local"
    assert UNTRUSTWORTHY.fullmatch(status["clock_problem"]), status["clock_problem"]
    assert "but this gateway's clock reads 1970-01-02" in status["last_error"]
    said = [line for line in agent.output.splitlines() if "before its own CA was created" in line]
    assert len(said) == 1 and " ERROR " in said[0], agent.output
    assert UNTRUSTWORTHY.search(shown.stdout), shown.stdout
    assert state_snapshot(state) == before, "no renewal, recovery or anything else on an untrusted clock"
