"""A running agent whose identity the controller refuses: revoked stops it for good, disabled slows it down.

Real processes: ``outpost-controller serve``, ``outpost-agent run``, ``outpostctl``. What the
controller sees of the agent's asks is counted in its audit (``tunnel_refused``, ``renewal_refused``).
"""

from __future__ import annotations

import datetime as dt
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from agent.errors import EXIT_IDENTITY_REFUSED
from agent.identity.refusals import DISABLED_ASK_INTERVAL
from tests.e2e.harness import Controller, Process, python_env, read_status, run_cli, wait_until

#: The controller closes a revoked or disabled tunnel within 2 s; the agent's next attempt
#: follows within its first reconnect bound (5 s by default); slack for a loaded machine.
REFUSAL_SEEN_TIMEOUT = 30.0
#: How long the asks of a disabled agent are counted. The old rule (reconnect backoff from 5 s,
#: renewal retries down to 1 s near expiry) asked several times in this window.
WINDOW = 12.0
#: A reconnect bound far above REVOKED_EXIT_TIMEOUT, and how soon a revoked agent must be gone:
#: the relay closes the tunnel within 2 s, the agent asks once at once and stops.
SLOW_RECONNECT = 120.0
REVOKED_EXIT_TIMEOUT = 15.0
#: The ask interval of the agent started to watch an enable take effect (the real one is ten minutes).
SHORT_INTERVAL = 3.0
#: The audit page ``asks`` reads: the controller's cap, far above what this module's tests record
#: on the controller they share, so no earlier ask can fall off the page.
AUDIT_PAGE = 1000


@pytest.fixture(scope="module")
def controller(module_controller: Controller) -> Controller:
    """One controller for the module: each test enrolls identities of its own names, and ``asks`` filters by name."""
    return module_controller


def agent_argv(config: Path, interval: float | None = None) -> list[str]:
    """``outpost-agent run``; with ``interval``, the same program with DISABLED_ASK_INTERVAL set to it."""
    if interval is None:
        return [sys.executable, "-m", "agent", "run", "--config", str(config)]
    program = ("import sys, agent.identity.refusals as refusals; "
               f"refusals.DISABLED_ASK_INTERVAL = {interval!r}; "
               "from agent.cli import main; sys.exit(main(sys.argv[1:]))")
    return [sys.executable, "-c", program, "run", "--config", str(config)]


def enrolled(controller: Controller, tmp_path: Path, name: str) -> tuple[Path, Path]:
    """An enrolled gateway's state directory and an agent config for it (no binds, no dials)."""
    token = tmp_path / f"{name}.token"
    controller.ctl("identity", "create", name, "--role", "gateway", "--token-out", str(token))
    state = tmp_path / f"{name}-state"
    result = run_cli("agent", "enroll", "--token", str(token), "--state", str(state), "--keystore", "software")
    assert result.returncode == 0, result.stderr
    config = tmp_path / f"{name}.toml"
    config.write_text(f'state_dir = "{state}"\n\n[keystore]\nbackend = "software"\n')
    return state, config


def start(config: Path, state: Path, interval: float | None = None) -> Process:
    agent = Process(agent_argv(config, interval))
    wait_until(lambda: read_status(state).get("state") == "connected", timeout=REFUSAL_SEEN_TIMEOUT,
               what="the agent connected")
    return agent


def asks(controller: Controller, name: str) -> list[str]:
    """The controller's refusals of this identity's tunnels and renewals, oldest first."""
    events = json.loads(controller.ctl("audit", "--json", "--limit", str(AUDIT_PAGE)).stdout)["events"]
    return [e["event"] for e in events if e["event"] in ("tunnel_refused", "renewal_refused")
            and f"default/{name}" in json.dumps(e["fields"])]


def status_text(state: Path) -> str:
    result = run_cli("agent", "status", "--state", str(state))
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_a_revoked_agent_exits_77_at_once_and_asks_no_more(controller: Controller, tmp_path: Path) -> None:
    state, config = enrolled(controller, tmp_path, "gw-rev")
    # Reconnect waits of up to two minutes: the revoked tunnel's end must not wait for one.
    with config.open("a") as extra:
        extra.write(f"\n[link]\nreconnect_initial = {SLOW_RECONNECT}\nreconnect_max = {SLOW_RECONNECT}\n")
    agent = start(config, state)
    try:
        controller.ctl("identity", "revoke", "gw-rev")
        try:
            code = agent.proc.wait(REVOKED_EXIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the revoked agent still runs:\n{agent.output}") from None
        assert code == EXIT_IDENTITY_REFUSED, agent.output
        last = agent.lines[-1]
        assert last.startswith("outpost-agent: ") and "revoked" in last and "new identity" in last, agent.output
        assert "Traceback" not in agent.output
        status = read_status(state)
        assert status["state"] == "stopped" and "revoked" in status["last_error"]
        assert asks(controller, "gw-rev") == ["tunnel_refused"], "one refused attempt, then nothing"
    finally:
        agent.stop()


def test_a_disabled_agent_keeps_running_asks_once_per_interval_and_says_why_even_near_expiry(
        controller: Controller, tmp_path: Path) -> None:
    """Two agents watched through the same window: one disabled while connected, and one disabled before it
    starts, due for renewal in the last minutes of its certificate (where the old retry rule asked about once
    a second). Each assertion names the agent it is about."""
    state, config = enrolled(controller, tmp_path, "gw-dis")
    expiring_state, expiring_config = enrolled(controller, tmp_path, "gw-exp")
    expiring_soon(controller, expiring_state, 120.0)
    controller.ctl("identity", "disable", "gw-exp")
    expiring = Process([sys.executable, "-m", "agent", "run", "--config", str(expiring_config)], env=python_env())
    try:
        agent = start(config, state)
        try:
            controller.ctl("identity", "disable", "gw-dis")
            wait_until(lambda: read_status(state).get("state") == "disabled", timeout=REFUSAL_SEEN_TIMEOUT,
                       what="the agent reports that it is disabled")
            wait_until(lambda: asks(controller, "gw-exp"), timeout=REFUSAL_SEEN_TIMEOUT, interval=0.5,
                       what="the first ask of the agent disabled near expiry")
            # The relay sends its refusal before a worker writes the row: the status can say so first.
            seen = wait_until(lambda: asks(controller, "gw-dis"), timeout=REFUSAL_SEEN_TIMEOUT, interval=0.5,
                              what="the row of the refusal the agent reported")
            time.sleep(WINDOW)
            assert agent.proc.poll() is None, f"a disabled agent must keep running:\n{agent.output}"
            assert asks(controller, "gw-dis") == seen == ["tunnel_refused"], "the agent disabled while connected"
            live = read_status(state)
            assert live["next_ask"] >= time.time() + DISABLED_ASK_INTERVAL - WINDOW - REFUSAL_SEEN_TIMEOUT
            assert live["connected_since"] is None and live["down_since"] <= time.time()
            text = status_text(state)
            line = next(line for line in text.splitlines() if line.startswith("tunnel:"))
            assert re.fullmatch(r"tunnel: +disabled by central ops; asking again at \d\d:\d\d UTC \(in (9|10) min\)",
                                line), text
            assert "connected:" not in text and re.search(r"^down: +since .* ago\)$", text, re.M), text
        finally:
            agent.stop()
        assert expiring.proc.poll() is None, f"a disabled agent near expiry must keep running:\n{expiring.output}"
        assert len(asks(controller, "gw-exp")) == 1, f"the agent disabled near expiry asked again: {asks(controller, 'gw-exp')}"
        live = read_status(expiring_state)
        assert live["state"] == "disabled" and "disabled" in live["last_error"], f"the agent disabled near expiry: {live}"
    finally:
        expiring.stop()


def test_an_enabled_agent_reconnects_at_its_next_ask(controller: Controller, tmp_path: Path) -> None:
    state, config = enrolled(controller, tmp_path, "gw-en")
    agent = start(config, state, interval=SHORT_INTERVAL)
    try:
        controller.ctl("identity", "disable", "gw-en")
        wait_until(lambda: read_status(state).get("state") == "disabled", timeout=REFUSAL_SEEN_TIMEOUT,
                   what="the agent reports that it is disabled")
        disabled_at = time.monotonic()
        controller.ctl("identity", "enable", "gw-en")
        wait_until(lambda: read_status(state).get("state") == "connected", timeout=SHORT_INTERVAL + 20,
                   what="the agent reconnected after enable")
        elapsed = time.monotonic() - disabled_at
        assert len(asks(controller, "gw-en")) <= 1 + elapsed / SHORT_INTERVAL
        assert agent.proc.poll() is None
    finally:
        agent.stop()


def expiring_soon(controller: Controller, state: Path, seconds: float) -> None:
    """Replace the gateway's certificate with one of the controller's CA that expires in ``seconds``."""
    current = x509.load_pem_x509_certificate((state / "cert.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((controller.data / "ca" / "ca.key").read_bytes(), password=None)
    now = dt.datetime.now(dt.UTC)
    builder = (x509.CertificateBuilder().subject_name(current.subject).issuer_name(current.issuer)
               .public_key(current.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(seconds=seconds)))
    for extension in current.extensions:
        builder = builder.add_extension(extension.value, extension.critical)
    certificate = builder.sign(ca_key, hashes.SHA256())
    (state / "cert.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))


def test_an_expired_disabled_gateway_waits_at_start_and_recovers_once_enabled(
        controller: Controller, tmp_path: Path) -> None:
    state, config = enrolled(controller, tmp_path, "gw-old")
    expiring_soon(controller, state, -60.0)  # back after an outage: the certificate expired a minute ago
    controller.ctl("identity", "disable", "gw-old")
    agent = Process(agent_argv(config, SHORT_INTERVAL))
    try:
        wait_until(lambda: read_status(state).get("state") == "disabled", timeout=REFUSAL_SEEN_TIMEOUT,
                   what="the agent reports that it is disabled while recovering")
        assert "disabled" in read_status(state)["last_error"]
        assert "disabled by central ops; asking again at " in status_text(state)
        time.sleep(2 * SHORT_INTERVAL)
        assert agent.proc.poll() is None, f"a disabled agent must keep running:\n{agent.output}"
        assert 1 <= len(asks(controller, "gw-old")) <= 3
        controller.ctl("identity", "enable", "gw-old")
        wait_until(lambda: read_status(state).get("state") == "connected", timeout=SHORT_INTERVAL + 20,
                   what="the agent recovered and connected after enable")
    finally:
        agent.stop()
