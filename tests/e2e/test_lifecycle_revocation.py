"""Revocation holds across controller processes: two ``outpost-controller serve`` share one store.

A gateway tunnels to process B; the operator revokes (or disables) it through
process A. B learns of it from the store, closes the live tunnel within 2 s,
and refuses the next one; renewal is refused everywhere.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from tests.e2e.harness import (
    Controller,
    EchoServer,
    Process,
    python_env,
    read_status,
    run_cli,
    wait_until,
)
from tests.e2e.serve_process import ServeProcess, ctl_config_naming

#: The issue's promise: every relay closes the identity's tunnels within this.
REVOCATION_DEADLINE = 2.0


def ctl_config_for(controller: Controller, path: Path) -> Path:
    """An outpostctl config that keeps naming ``controller`` after another process rewrote the shared one."""
    return ctl_config_naming(controller.data, controller.url, path)


def ctl_via(config: Path, *args: str, check: bool = True):
    env = python_env()
    env["OUTPOSTCTL_CONFIG"] = str(config)
    result = run_cli("outpostctl", *args, env=env)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def start_gateway(b: ServeProcess, tmp_path: Path, name: str, echo: EchoServer) -> tuple[Path, Process, str]:
    """Enrolled through process B and tunnelled to it; returns its state, its agent and a copy of its token."""
    token = tmp_path / f"{name}.token"
    b.ctl("identity", "create", name, "--role", "gateway", "--token-out", str(token))
    kept = token.read_text().strip()  # the agent retires the file once it enrolled
    state = tmp_path / f"{name}-state"
    enrolled = run_cli("agent", "enroll", "--token", str(token), "--state", str(state), "--keystore", "software")
    assert enrolled.returncode == 0, enrolled.stderr
    config = tmp_path / f"{name}.toml"
    # Every process is a relay of the store (controller/box_relay.py): the gateway prefers B to be B's.
    config.write_text(f'state_dir = "{state}"\n\n[keystore]\nbackend = "software"\n\n'
                      f'[link]\nprefer_relays = ["{b.url.removeprefix("https://")}"]\n\n'
                      f'[[bind]]\nservice = "modbus"\ntarget = "127.0.0.1:{echo.port}"\n')
    agent = Process([sys.executable, "-m", "agent", "run", "--config", str(config)])
    wait_until(lambda: read_status(state).get("state") == "connected", what=f"{name} connected")
    assert read_status(state)["relay"].startswith(b.url.replace("https://", "wss://"))
    return state, agent, kept


def seconds_until_closed(b: ServeProcess, name: str, deadline: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < deadline + 3.0:
        if not any(t["name"] == name for t in b.tunnels()):
            return time.monotonic() - started
        time.sleep(0.05)
    return float("inf")


@pytest.fixture
def second(controller: Controller, tmp_path: Path):
    ctl_config_for(controller, tmp_path / "ctl-a.toml")
    process = ServeProcess(controller.data, tmp_path / "ctl-b.toml")
    try:
        yield process
    finally:
        process.process.stop()


def test_revoking_through_one_process_closes_the_tunnel_held_by_another_within_two_seconds(
        controller: Controller, second: ServeProcess, echo_server: EchoServer, tmp_path: Path) -> None:
    a_config = tmp_path / "ctl-a.toml"
    second.ctl("service", "create", "modbus")
    second.ctl("policy", "create", "--kind", "bind", "--identities", "role:gateway", "--services", "modbus")
    state, agent, _ = start_gateway(second, tmp_path, "gw-rev", echo_server)
    try:
        assert any(t["name"] == "gw-rev" for t in second.tunnels())
        ctl_via(a_config, "identity", "revoke", "gw-rev")
        elapsed = seconds_until_closed(second, "gw-rev", REVOCATION_DEADLINE)
        assert elapsed <= REVOCATION_DEADLINE, f"tunnel on process B still open {elapsed:.2f} s after revoke on A"
        # The agent is told why, and the next tunnel is refused at admission.
        wait_until(lambda: "revoked" in (read_status(state).get("last_error") or ""), timeout=30,
                   what="the agent reports the revocation")
        assert not any(t["name"] == "gw-rev" for t in second.tunnels())
        # Renewal is refused too, through either process, and the stored certificate stays.
        cert = (state / "cert.pem").read_bytes()
        renew = run_cli("agent", "renew", "--state", str(state))
        assert renew.returncode == 77  # EX_NOPERM: refused identity, not a lost key
        assert "revoked" in renew.stderr and renew.stderr.count("\n") == 1
        assert (state / "cert.pem").read_bytes() == cert
        audit = ctl_via(a_config, "audit", "--json").stdout
        assert "identity_revoked" in audit and "renewal_refused" in audit
    finally:
        agent.stop()


def test_disable_closes_the_tunnel_everywhere_and_enable_lets_it_renew_again(
        controller: Controller, second: ServeProcess, echo_server: EchoServer, tmp_path: Path) -> None:
    a_config = tmp_path / "ctl-a.toml"
    second.ctl("service", "create", "modbus")
    second.ctl("policy", "create", "--kind", "bind", "--identities", "role:gateway", "--services", "modbus")
    state, agent, _ = start_gateway(second, tmp_path, "gw-dis", echo_server)
    try:
        ctl_via(a_config, "identity", "disable", "gw-dis")
        elapsed = seconds_until_closed(second, "gw-dis", REVOCATION_DEADLINE)
        assert elapsed <= REVOCATION_DEADLINE, f"tunnel on process B still open {elapsed:.2f} s after disable on A"
        refused = run_cli("agent", "renew", "--state", str(state))
        assert refused.returncode == 77 and "disabled" in refused.stderr
        shown = json.loads(ctl_via(a_config, "identity", "enable", "gw-dis", "--json").stdout)
        assert shown["status"] == "enrolled"
        renewed = run_cli("agent", "renew", "--state", str(state))
        assert renewed.returncode == 0, renewed.stderr
        assert renewed.stdout.startswith("certificate renewed; valid until ")
        events = [e["event"] for e in json.loads(ctl_via(a_config, "audit", "--json").stdout)["events"]]
        assert {"identity_disabled", "identity_enabled", "renewal_refused", "renewal"} <= set(events)
    finally:
        agent.stop()
