"""The whole path as a person: sign in from the shell, then connect as yourself, subject to policies.

Real processes on 127.0.0.1: the identity provider (node), the controller
with a configuration file, an enrolled gateway's agent, and outpostctl.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from outpostctl.quickstart import listening_port
from tests.e2e.harness import Controller, EchoServer, Process, controller_argv, python_env, round_trip, run_cli
from tests.e2e.test_walking_skeleton import enroll_gateway, start_agent
from tests.oidc.harness import IdP, complete_device_login

#: The provider asks clients to poll every 5 s; one poll after the login, and the start, fit in this.
LOGIN_TIMEOUT = 30.0


class ConfiguredController(Controller):
    """``outpost-controller serve --config FILE`` as a process."""

    def __init__(self, data: Path, config: Path) -> None:  # not super().__init__: that starts a process without --config
        self.data = data
        self.process = Process([*controller_argv(data), "--config", str(config)])
        line = self.process.wait_for_line("ready on https://")
        self.url = line.split("ready on ", 1)[1].split()[0]
        self.ctl_config = data / "outpostctl.toml"


def write_controller_config(path: Path, idp: IdP) -> Path:
    path.write_text(f"""
[[signin.provider]]
name = "test"
issuer = "{idp.issuer}"
client_id = "{idp.client_id}"
ca_file = "{idp.ca_file}"

[signin.roles]
ops-admins = ["admin"]
ops = ["operator"]
""")
    return path


def person_env(home: Path) -> dict[str, str]:
    env = python_env()
    env["HOME"] = str(home)
    env.pop("XDG_CONFIG_HOME", None)
    env.pop("OUTPOSTCTL_CONFIG", None)
    return env


def sign_in(idp: IdP, config: Path, env: dict[str, str], login: str) -> str:
    process = Process([sys.executable, "-m", "outpostctl", "login", "--config", str(config)],
                      env=env)
    try:
        line = process.wait_for_line("To sign in, open ")
        url = line.split("open ", 1)[1].split(" in a browser")[0]
        complete_device_login(idp, url, login)
        assert process.proc.wait(LOGIN_TIMEOUT) == 0, process.output
        return process.output
    finally:
        process.stop()


def test_a_person_signs_in_and_connects_as_themselves(idp: IdP, echo_server: EchoServer, tmp_path: Path) -> None:
    controller = ConfiguredController(tmp_path / "controller", write_controller_config(tmp_path / "c.toml", idp))
    agent = None
    try:
        controller.ctl("service", "create", "modbus", "--role", "plc")
        controller.ctl("policy", "create", "--kind", "bind", "--identities", "role:gateway", "--services", "modbus")
        controller.ctl("policy", "create", "--kind", "dial", "--identities", "role:operator", "--services", "role:plc")
        state = enroll_gateway(controller, tmp_path, "gw-1", "gateway")
        agent = start_agent(tmp_path, "gw-1", state, binds={"modbus": echo_server.port})
        person = tmp_path / "person.toml"
        person.write_text(f'url = "{controller.url}"\nca = "{controller.data / "ca" / "ca.pem"}"\n')
        env = person_env(tmp_path / "oscar-home")
        output = sign_in(idp, person, env, "oscar")
        assert "Signed in as default/oscar with operator." in output
        connect = Process([sys.executable, "-m", "outpostctl", "connect", "modbus", "--listen", "127.0.0.1:0",
                           "--config", str(person)], env=env)
        try:
            port = listening_port(connect.wait_for_line("listening"))
            assert round_trip(port, b"as myself") == b"as myself"
        finally:
            connect.stop()
        events = json.loads(controller.ctl("audit", "--json").stdout)["events"]
        issued = [e for e in events if e["event"] == "session_issued"]
        assert issued and issued[-1]["fields"]["identity"] == "default/oscar"
        dials = [e for e in events if e["event"] == "dial_allowed"]
        assert dials and "default/oscar" in json.dumps(dials[-1]["fields"])
        # Signed out, the same command is refused and says to sign in.
        assert run_cli("outpostctl", "logout", "--config", str(person), env=env).returncode == 0
        refused = run_cli("outpostctl", "connect", "modbus", "--listen", "127.0.0.1:0", "--config", str(person),
                          env=env)
        assert refused.returncode != 0 and "outpostctl login" in refused.stderr
    finally:
        if agent is not None:
            agent.stop()
        controller.process.stop()
