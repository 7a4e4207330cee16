"""``outpost-agent status`` and ``run`` from the command line: readable output, one-line errors."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent.identity.software import SoftwareKeyStore
from agent.identity.state import EnrolledIdentity, StateDir
from tests.agent.cli_helpers import one_line_error, run_cli
from tests.agent.enrollment.fake_controller import TestCA

URI = "spiffe://outpost.test/plant-a/pump-1"


@pytest.fixture
def enrolled(tmp_path: Path) -> StateDir:
    state = StateDir(tmp_path / "state")
    store = SoftwareKeyStore(state.path)
    store.create()
    ca = TestCA()
    cert = ca.issue(store.public_key(), "pump-1", [x509.UniformResourceIdentifier(URI)])
    state.save_enrollment(EnrolledIdentity(
        name="pump-1", tenant="plant-a", uri=URI, controller_url="https://controller.example:8443",
        relays=["wss://relay.example/v1/tunnel"], ca_pem=ca.pem,
        cert_pem=cert.public_bytes(serialization.Encoding.PEM).decode(), key_backend="software",
        enrolled_at=time.time(),
    ))
    return state


def test_status_shows_identity_key_and_certificate_expiry(enrolled: StateDir):
    result = run_cli("status", "--state", enrolled.path)

    assert result.returncode == 0, result.stderr
    assert f"identity:    {URI}" in result.stdout
    assert "key:         software" in result.stdout
    expiry = enrolled.load().not_after().strftime("%Y-%m-%d %H:%M UTC")
    assert f"certificate: valid until {expiry}" in result.stdout
    assert "no status yet" in result.stdout


def test_status_includes_the_tunnel_status_when_the_agent_runs(enrolled: StateDir):
    enrolled.write_status({
        "state": "connected", "relay": "wss://relay.example/v1/tunnel", "rtt_ms": 612.4,
        "bytes_in": 1200, "bytes_out": 3400, "bound": ["modbus"], "last_error": None,
    })

    result = run_cli("status", "--state", enrolled.path)

    assert result.returncode == 0, result.stderr
    for line in ("tunnel:      connected", "relay:       wss://relay.example/v1/tunnel",
                 "rtt:         612 ms", "bytes:       in 1200, out 3400", "bound:       modbus"):
        assert line in result.stdout
    assert "last error" not in result.stdout


def test_status_shows_renewal_and_tunnel_times_in_utc_with_how_far_away_they_are(enrolled: StateDir):
    now = time.time()
    enrolled.write_status({
        "state": "connected", "connected_since": now - 2 * 3600 - 5 * 60, "updated": now - 10 * 60 - 15,
        "cert_not_after": now + 8 * 3600, "next_renewal": now + 5 * 3600 + 12 * 60 + 30,
        "renewal_error": "could not reach the controller at https://c/v1/renew to renew the certificate (timed out); "
                         "the agent retries on its own",
        "clock_offset_s": 0.0, "clock_source": "controller",
    })

    result = run_cli("status", "--state", enrolled.path)

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    utc = r"\d{4}-\d\d-\d\d \d\d:\d\d UTC"
    assert any(re.fullmatch(f"next renewal: {utc} \\(in 5 h 12 min\\)", line) for line in lines), result.stdout
    assert "renewal:     the last attempt failed: could not reach the controller at https://c/v1/renew" in result.stdout
    assert any(re.fullmatch(f"connected:   since {utc} \\(2 h 5 min ago\\)", line) for line in lines), result.stdout
    assert any(re.fullmatch(f"updated:     {utc} \\(10 min ago\\)", line) for line in lines), result.stdout
    assert any(re.fullmatch(f"certificate: valid until {utc} \\(in \\d+ h \\d+ min\\)", line) for line in lines)
    assert not re.search(r"\d{9,}\.\d", result.stdout), "no raw unix times"
    assert "cert not after" not in result.stdout and "next renewal:  " not in result.stdout


def test_a_running_agent_reports_its_next_renewal_in_status(tmp_path: Path):
    import sys

    from agent.identity.renewal_schedule import RENEW_AT_FRACTION, RENEW_JITTER_FRACTION, RenewalSchedule
    from tests.e2e.harness import Controller, Process, read_status, wait_until
    from tests.e2e.harness import run_cli as run_module

    controller = Controller(tmp_path / "controller")
    try:
        token = tmp_path / "gw.token"
        controller.ctl("identity", "create", "gw-status", "--token-out", str(token))
        state = tmp_path / "state"
        assert run_module("agent", "enroll", "--token", str(token), "--state", str(state),
                          "--keystore", "software").returncode == 0
        config = tmp_path / "agent.toml"
        config.write_text(f'state_dir = "{state}"\n[keystore]\nbackend = "software"\n')
        agent = Process([sys.executable, "-m", "agent.cli", "run", "--config", str(config)])
        try:
            wait_until(lambda: read_status(state).get("state") == "connected", what="the agent connected")
            live = read_status(state)
            shown = run_cli("status", "--state", state)
        finally:
            agent.stop()
    finally:
        controller.process.stop()

    schedule = RenewalSchedule.for_certificate(StateDir(state).load().certificate())
    fraction = (live["next_renewal"] - schedule.not_before) / schedule.lifetime
    assert RENEW_AT_FRACTION - RENEW_JITTER_FRACTION - 1e-6 <= fraction <= RENEW_AT_FRACTION + RENEW_JITTER_FRACTION + 1e-6
    assert live["cert_not_after"] == schedule.not_after and live["renewal_error"] is None
    assert shown.returncode == 0, shown.stderr
    assert re.search(r"^next renewal: \d{4}-\d\d-\d\d \d\d:\d\d UTC \(in \d+ h \d+ min\)$", shown.stdout, re.M), \
        shown.stdout


def test_status_json_is_machine_readable(enrolled: StateDir):
    enrolled.write_status({"state": "reconnecting", "bytes_in": 5})

    result = run_cli("status", "--json", "--state", enrolled.path)

    report = json.loads(result.stdout)
    assert report["identity"] == URI and report["key_backend"] == "software"
    assert report["cert_not_after"] == enrolled.load().not_after().timestamp()
    assert report["cert_expired"] is False
    assert report["tunnel"] == {"state": "reconnecting", "bytes_in": 5}


def test_status_reads_the_state_dir_from_the_config(enrolled: StateDir, tmp_path: Path):
    config = tmp_path / "agent.toml"
    config.write_text(f'state_dir = "{enrolled.path}"\n')

    result = run_cli("status", "--config", config)

    assert result.returncode == 0, result.stderr
    assert URI in result.stdout


def test_status_of_a_gateway_not_enrolled_says_how_to_enroll(tmp_path: Path):
    result = run_cli("status", "--state", tmp_path / "empty")

    assert result.returncode == 75
    assert one_line_error(result).endswith("enroll it with: outpost-agent enroll --token FILE")
    assert result.stdout == ""


def test_run_with_a_bad_config_is_one_line_naming_the_file(tmp_path: Path):
    config = tmp_path / "agent.toml"
    config.write_text('[[bind]]\nservice = "modbus"\ntarget = "127.0.0.1:99999"\n')

    result = run_cli("run", "--config", config)

    assert result.returncode == 64
    assert one_line_error(result) == (
        f"outpost-agent: {config}: 'bind[0].target' has port 99999, outside 1-65535; fix the port"
    )


def test_run_on_a_gateway_not_enrolled_waits_for_a_token_file_and_stops_cleanly(tmp_path: Path):
    import sys

    from tests.e2e.harness import Process

    token = tmp_path / "enroll.token"
    config = tmp_path / "agent.toml"
    config.write_text(f'state_dir = "{tmp_path / "state"}"\n[keystore]\nbackend = "software"\n'
                      f'[enrollment]\ntoken_paths = ["{token}"]\n')

    agent = Process([sys.executable, "-m", "agent.cli", "run", "--config", str(config)])
    agent.wait_for_line(f"waiting for enrollment: no token file in {token}; copy the token file from central ops")

    assert agent.stop() == 0
    assert not StateDir(tmp_path / "state").is_enrolled()


@pytest.mark.parametrize("args", [
    ("status", "--state", "/tmp/a", "--config", "/tmp/b"),
    ("run", "--config"),
    ("run", "--config", "a.toml", "--json"),
    ("enroll",),
    ("enroll", "--token", "t", "--keystore", "hsm"),
    ("launch",),
])
def test_usage_mistakes_are_one_line_with_exit_64(args):
    result = run_cli(*args)

    assert result.returncode == 64
    assert one_line_error(result).endswith("see 'outpost-agent --help'")


def test_python_dash_m_agent_is_the_same_command():
    import subprocess
    import sys

    from tests.agent.cli_helpers import CLI_TIMEOUT, ROOT

    result = subprocess.run([sys.executable, "-m", "agent", "--help"], capture_output=True, text=True,
                            timeout=CLI_TIMEOUT, cwd=ROOT)

    assert result.returncode == 0
    assert "enroll" in result.stdout and "status" in result.stdout and "run" in result.stdout


def test_the_daemon_command_line_loads_no_module_it_does_not_use(tmp_path: Path):
    """``run --config FILE`` (how systemd starts the agent) reads its two words without argparse, whose
    help formatter imports shutil, bz2 and lzma; nor does the tunnel's code load platform or http."""
    import subprocess
    import sys

    from tests.agent.cli_helpers import CLI_TIMEOUT, ROOT

    probe = ("import sys; import agent.tunnel.runner; from agent.cli import main; "
             f"main(['run', '--config={tmp_path / 'missing.toml'}']); main(['run', '--config', 'missing.toml']); "
             "print(sorted(m for m in ('argparse', 'shutil', 'bz2', 'lzma', 'platform', 'http') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=CLI_TIMEOUT, cwd=ROOT)

    assert result.stdout.strip() == "[]", result.stderr
    assert result.stderr.count("missing.toml does not exist") == 2
