"""The first whole path: a token file enrolls a gateway; a dial reaches its service.

Everything here is a real process on 127.0.0.1 driven through the same
commands an operator and a field technician type.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from agent.identity.state import RELAYS_FILE, STATUS_FILE
from outpostctl.quickstart import listening_port
from tests.controller.harness import audit_events_added, store_snapshot
from tests.e2e.harness import (
    Controller,
    EchoServer,
    Process,
    free_port,
    read_status,
    round_trip,
    run_cli,
    wait_until,
)

#: The relay closes a revoked identity's tunnel within 2 s; the agent then asks once more over a new TLS
#: connection and writes its status only with that answer. Slack for a loaded machine, as for its sentence.
REVOKED_SEEN_TIMEOUT = 10


class Unchanged:
    """The controller's store and the agents' state directories as they are now, to compare with later.

    Every table of the store and every file of a state directory except
    status.json, which a running agent rewrites with live counters; of it,
    what the tunnel is: its state, relay and bound services.
    """

    def __init__(self, controller: Controller, *states: Path) -> None:
        self.controller = controller
        self.states = states
        self.store = self._store()
        self.agents = self._agents()

    def _store(self) -> dict:
        return store_snapshot(self.controller.data / "store.sqlite3")

    def _agents(self) -> dict:
        files = {
            str(path): path.read_bytes()
            for state in self.states for path in sorted(state.iterdir()) if path.name != STATUS_FILE
        }
        tunnels = {str(state): {k: read_status(state).get(k) for k in ("state", "relay", "bound")}
                   for state in self.states}
        return {"files": files, "tunnels": tunnels}

    def audit_added(self) -> list[tuple[str, dict]]:
        """The audit events added since; fails when anything else in the store changed."""
        return audit_events_added(self.store, self._store())

    def assert_agents_as_they_were(self, tunnels: bool = True) -> None:
        """Every state file as it was; with ``tunnels``, each agent's tunnel too."""
        now = self._agents()
        assert now["files"] == self.agents["files"]
        if tunnels:
            assert now["tunnels"] == self.agents["tunnels"]


def write_agent_config(path: Path, state: Path, binds: dict[str, int] | None = None,
                       dials: dict[str, int] | None = None, event_loop: str | None = None,
                       prefer_relays: Sequence[str] = ()) -> Path:
    lines = [f'state_dir = "{state}"'] + ([f'event_loop = "{event_loop}"'] if event_loop else [])
    lines += ["", "[keystore]", 'backend = "software"', ""]
    if prefer_relays:
        lines += ["[link]", "prefer_relays = [{}]".format(", ".join(f'"{address}"' for address in prefer_relays)), ""]
    for service, port in (binds or {}).items():
        lines += ["[[bind]]", f'service = "{service}"', f'target = "127.0.0.1:{port}"', ""]
    for service, port in (dials or {}).items():
        lines += ["[[dial]]", f'service = "{service}"', f'listen = "127.0.0.1:{port}"', ""]
    path.write_text("\n".join(lines))
    return path


def enroll_gateway(controller: Controller, tmp_path: Path, name: str, *roles: str) -> Path:
    token = tmp_path / f"{name}.token"
    role_args = [a for r in roles for a in ("--role", r)]
    controller.ctl("identity", "create", name, *role_args, "--token-out", str(token))
    state = tmp_path / f"{name}-state"
    result = run_cli("agent", "enroll", "--token", str(token), "--state", str(state), "--keystore", "software")
    assert result.returncode == 0, result.stderr
    return state


def start_agent(tmp_path: Path, name: str, state: Path, **kwargs) -> Process:
    config = write_agent_config(tmp_path / f"{name}.toml", state, **kwargs)
    agent = Process([sys.executable, "-m", "agent", "run", "--config", str(config)])
    wait_until(lambda: read_status(state).get("state") == "connected", what=f"{name} connected")
    return agent


@pytest.mark.parametrize("event_loop", ["asyncio", "uvloop"])
def test_a_dial_reaches_the_service_a_gateway_binds(controller: Controller, echo_server: EchoServer,
                                                    tmp_path: Path, event_loop: str) -> None:
    if event_loop == "uvloop":
        pytest.importorskip("uvloop", reason="uvloop is not installed (python3-uvloop)")
    controller.ctl("service", "create", "modbus", "--role", "plc")
    controller.ctl("policy", "create", "--kind", "bind", "--identities", "role:gateway", "--services", "modbus")
    controller.ctl("policy", "create", "--kind", "dial", "--identities", "role:operator", "--services", "role:plc")
    state = enroll_gateway(controller, tmp_path, "gw-1", "gateway")
    assert not list(tmp_path.glob("*-state/*.token"))
    agent = start_agent(tmp_path, "gw-1", state, binds={"modbus": echo_server.port}, event_loop=event_loop)
    try:
        # One loop for the whole process, the one the config names.
        assert f"running on the {event_loop} " in agent.wait_for_line("running on the ")
        assert read_status(state)["bound"] == ["modbus"]
        connect = controller.ctl_process("connect", "modbus", "--listen", "127.0.0.1:0")
        try:
            port = listening_port(connect.wait_for_line("listening"))
            payload = os.urandom(300_000)
            assert round_trip(port, payload) == payload
            assert round_trip(port, b"second connection") == b"second connection"
        finally:
            connect.stop()
        shown = json.loads(controller.ctl("identity", "show", "gw-1", "--json").stdout)
        assert shown["status"] == "enrolled"
        audit = controller.ctl("audit", "--json").stdout
        assert "dial_allowed" in audit and "tunnel_connected" in audit
    finally:
        agent.stop()


def test_a_dial_with_no_policy_is_refused_with_the_reason_and_changes_nothing(
        controller: Controller, echo_server: EchoServer, tmp_path: Path) -> None:
    """connect asks the relay's own decision (policy explain) first; the relay's refusal of such a dial
    is tested in tests/controller/relay/test_relay_decisions.py."""
    controller.ctl("service", "create", "historian")
    controller.ctl("policy", "create", "--kind", "bind", "--identities", "gw-2", "--services", "historian")
    state = enroll_gateway(controller, tmp_path, "gw-2")
    agent = start_agent(tmp_path, "gw-2", state, binds={"historian": echo_server.port})
    reason = "no policy allows identity default/operator to dial service default/historian"
    try:
        before = Unchanged(controller, state)
        refused = controller.ctl("connect", "historian", "--listen", "127.0.0.1:0", check=False)
        assert refused.returncode != 0 and "listening" not in refused.stdout
        assert refused.stderr.startswith(f"outpostctl: {reason}, so the local port would refuse every connection")
        assert before.audit_added() == []  # no session certificate, no tunnel, no dial
        before.assert_agents_as_they_were()
        assert echo_server.connections == 0
    finally:
        agent.stop()


def test_a_gateway_dialling_an_unknown_service_is_told_so_and_nothing_changes(
        controller: Controller, echo_server: EchoServer, tmp_path: Path) -> None:
    controller.ctl("service", "create", "telemetry")
    controller.ctl("policy", "create", "--kind", "bind", "--identities", "site-u", "--services", "telemetry")
    host_state = enroll_gateway(controller, tmp_path, "site-u")
    dial_state = enroll_gateway(controller, tmp_path, "central-u")
    port = free_port()  # a [[dial]] names its port; the agent reports no port it chose itself
    host = start_agent(tmp_path, "site-u", host_state, binds={"telemetry": echo_server.port})
    dialer = start_agent(tmp_path, "central-u", dial_state, dials={"no-such-service": port})
    reason = "no service named default/no-such-service"
    try:
        before = Unchanged(controller, host_state, dial_state)
        assert round_trip(port, b"hello") == b""
        dialer.wait_for_line(f"dial no-such-service refused: {reason}")
        assert before.audit_added() == [
            ("dial_requested", {"identity": "default/central-u", "service": "default/no-such-service",
                                "requested": "no-such-service", "remote": "127.0.0.1"}),
            ("dial_denied", {"identity": "default/central-u", "service": "default/no-such-service", "reason": reason})]
        before.assert_agents_as_they_were()
        assert echo_server.connections == 0
    finally:
        dialer.stop()
        host.stop()


def test_an_operator_dialling_an_unknown_service_is_told_so_before_anything_listens(controller: Controller) -> None:
    refused = controller.ctl("connect", "no-such-service", "--listen", "127.0.0.1:0", check=False)
    assert refused.returncode != 0
    assert "listening" not in refused.stdout
    assert refused.stderr.strip() == (
        "outpostctl: there is no service default/no-such-service, so nothing would answer on the local port; "
        "see outpostctl service list, or create it with outpostctl service create no-such-service")


def test_an_agent_sent_to_a_relay_not_from_its_pinned_ca_refuses_it_and_nothing_changes(
        controller: Controller, tmp_path: Path) -> None:
    impostor = Controller(tmp_path / "impostor")
    try:
        state = enroll_gateway(controller, tmp_path, "gw-i")
        # As if DNS or the stored relay list led elsewhere: a relay whose certificate another CA issued.
        (state / RELAYS_FILE).write_text(json.dumps({"relays": [impostor.url.replace("https://", "wss://") + "/v1/tunnel"]}))
        real, fake = Unchanged(controller, state), Unchanged(impostor)
        agent = Process([sys.executable, "-m", "agent", "run", "--config",
                         str(write_agent_config(tmp_path / "gw-i.toml", state))])
        try:
            error = wait_until(lambda: read_status(state).get("last_error"), what="the agent's verdict on the relay")
            assert "presented a certificate not issued by the pinned controller CA" in error
            assert read_status(state)["state"] != "connected"
        finally:
            agent.stop()
        assert real.audit_added() == [] and fake.audit_added() == []
        real.assert_agents_as_they_were(tunnels=False)  # it had no tunnel before it ran
    finally:
        impostor.process.stop()


def test_a_gateway_dials_a_service_another_gateway_binds(controller: Controller, echo_server: EchoServer,
                                                         tmp_path: Path) -> None:
    controller.ctl("service", "create", "telemetry")
    controller.ctl("policy", "create", "--kind", "bind", "--identities", "site-a", "--services", "telemetry")
    controller.ctl("policy", "create", "--kind", "dial", "--identities", "central", "--services", "telemetry")
    host_state = enroll_gateway(controller, tmp_path, "site-a")
    dial_state = enroll_gateway(controller, tmp_path, "central")
    port = free_port()
    host = start_agent(tmp_path, "site-a", host_state, binds={"telemetry": echo_server.port})
    dialer = start_agent(tmp_path, "central", dial_state, dials={"telemetry": port})
    try:
        payload = os.urandom(1_000_000)
        assert round_trip(port, payload) == payload
    finally:
        dialer.stop()
        host.stop()


def test_revoking_an_identity_closes_its_tunnel(controller: Controller, echo_server: EchoServer,
                                                tmp_path: Path) -> None:
    controller.ctl("service", "create", "cam")
    controller.ctl("policy", "create", "--kind", "bind", "--identities", "gw-r", "--services", "cam")
    state = enroll_gateway(controller, tmp_path, "gw-r")
    agent = start_agent(tmp_path, "gw-r", state, binds={"cam": echo_server.port})
    try:
        controller.ctl("identity", "revoke", "gw-r")
        wait_until(lambda: read_status(state).get("state") != "connected", timeout=REVOKED_SEEN_TIMEOUT,
                   what="tunnel closed")
        wait_until(lambda: "revoked" in (read_status(state).get("last_error") or ""), timeout=REVOKED_SEEN_TIMEOUT,
                   what="agent says it was revoked")
    finally:
        agent.stop()
