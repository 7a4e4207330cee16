"""The first whole path: a token file enrolls a gateway; a dial reaches its service.

Everything here is a real process on 127.0.0.1 driven through the same
commands an operator and a field technician type.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import pytest

from tests.e2e.harness import (
    Controller,
    EchoServer,
    Process,
    free_port,
    python_env,
    read_status,
    round_trip,
    run_cli,
    wait_until,
)


def write_agent_config(path: Path, state: Path, binds: dict[str, int] = {}, dials: dict[str, int] = {}) -> Path:
    lines = [f'state_dir = "{state}"', "", "[keystore]", 'backend = "software"', ""]
    for service, port in binds.items():
        lines += ["[[bind]]", f'service = "{service}"', f'target = "127.0.0.1:{port}"', ""]
    for service, port in dials.items():
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


def test_a_dial_reaches_the_service_a_gateway_binds(controller: Controller, echo_server: EchoServer,
                                                    tmp_path: Path) -> None:
    controller.ctl("service", "create", "modbus", "--role", "plc")
    controller.ctl("policy", "create", "--kind", "bind", "--identities", "role:gateway", "--services", "modbus")
    controller.ctl("policy", "create", "--kind", "dial", "--identities", "role:operator", "--services", "role:plc")
    state = enroll_gateway(controller, tmp_path, "gw-1", "gateway")
    assert not list(tmp_path.glob("*-state/*.token"))
    agent = start_agent(tmp_path, "gw-1", state, binds={"modbus": echo_server.port})
    try:
        assert read_status(state)["bound"] == ["modbus"]
        port = free_port()
        connect = controller.ctl_process("connect", "modbus", "--listen", f"127.0.0.1:{port}")
        try:
            connect.wait_for_line("listening")
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


def test_a_dial_with_no_policy_is_refused_with_the_reason(controller: Controller, echo_server: EchoServer,
                                                         tmp_path: Path) -> None:
    controller.ctl("service", "create", "historian")
    controller.ctl("policy", "create", "--kind", "bind", "--identities", "gw-2", "--services", "historian")
    state = enroll_gateway(controller, tmp_path, "gw-2")
    agent = start_agent(tmp_path, "gw-2", state, binds={"historian": echo_server.port})
    try:
        port = free_port()
        connect = controller.ctl_process("connect", "historian", "--listen", f"127.0.0.1:{port}")
        try:
            connect.wait_for_line("listening")
            assert round_trip(port, b"hello") == b""
            connect.wait_for_line("no policy allows")
        finally:
            connect.stop()
        assert echo_server.connections == 0
        assert "dial_denied" in controller.ctl("audit", "--json").stdout
    finally:
        agent.stop()


def test_a_dial_to_an_unknown_service_says_so(controller: Controller, tmp_path: Path) -> None:
    port = free_port()
    connect = controller.ctl_process("connect", "no-such-service", "--listen", f"127.0.0.1:{port}")
    try:
        connect.wait_for_line("listening")
        assert round_trip(port, b"hello") == b""
        connect.wait_for_line("no service named default/no-such-service")
    finally:
        connect.stop()


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
        wait_until(lambda: read_status(state).get("state") != "connected", timeout=5, what="tunnel closed")
        wait_until(lambda: "revoked" in (read_status(state).get("last_error") or ""), timeout=10,
                   what="agent says it was revoked")
    finally:
        agent.stop()
