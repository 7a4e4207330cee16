"""A controller restored from a backup taken while it ran: its enrolled gateway reconnects, no new token."""

from __future__ import annotations

import json
import shutil
import ssl
import sys
import tomllib
import urllib.request
from pathlib import Path

from tests.e2e.harness import EchoServer, Process, free_port, python_env, read_status, run_cli, wait_until
from tests.e2e.test_lifecycle_revocation import start_gateway

#: The agent's backoff after losing its relay grows to tens of seconds; a minute covers it with jitter.
RECONNECT_TIMEOUT = 60.0


class PortController:
    """``serve`` on a port chosen here, so a restored controller is where the agent looks for it.

    ``ctl_config`` is the operator's own copy of outpostctl.toml (a backup leaves it out).
    """

    def __init__(self, data: Path, port: int, ctl_config: Path) -> None:
        self.process = Process([sys.executable, "-m", "controller.cli", "serve", "--data", str(data),
                                "--listen", f"127.0.0.1:{port}"])
        line = self.process.wait_for_line("ready on https://")
        self.url = line.split("ready on ", 1)[1].split()[0]
        if not ctl_config.exists():
            shutil.copy(data / "outpostctl.toml", ctl_config)
        self.ctl_config = ctl_config
        self.token = tomllib.loads(ctl_config.read_text())["token"]
        self.tls = ssl.create_default_context(cafile=str(data / "ca" / "ca.pem"))

    def ctl(self, *args: str) -> None:
        env = python_env()
        env["OUTPOSTCTL_CONFIG"] = str(self.ctl_config)
        result = run_cli("outpostctl", *args, env=env)
        assert result.returncode == 0, result.stderr

    def tunnels(self) -> list[dict]:
        request = urllib.request.Request(self.url + "/api/v1/status", headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(request, context=self.tls, timeout=5) as response:
            return json.loads(response.read())["tunnels"]


def test_a_backup_taken_while_running_restores_a_controller_its_gateway_reconnects_to(
    tmp_path: Path, echo_server: EchoServer
) -> None:
    data, port, ctl_config = tmp_path / "controller", free_port(), tmp_path / "operator.toml"
    first = PortController(data, port, ctl_config)
    agent = None
    try:
        first.ctl("service", "create", "modbus")
        first.ctl("policy", "create", "--kind", "bind", "--identities", "role:gateway", "--services", "modbus")
        state, agent, _ = start_gateway(first, tmp_path, "gw-1", echo_server)  # type: ignore[arg-type]
        backed = run_cli("controller.cli", "backup", str(tmp_path / "backup"), "--data", str(data))
        assert backed.returncode == 0, backed.stderr
    finally:
        first.process.stop()
    shutil.rmtree(data)  # the machine is lost; the backup and the operator's outpostctl.toml are not
    restored = run_cli("controller.cli", "restore", str(tmp_path / "backup"), "--data", str(data))
    assert restored.returncode == 0, restored.stderr
    second = PortController(data, port, ctl_config)
    try:
        wait_until(lambda: any(t["name"] == "gw-1" for t in second.tunnels()), timeout=RECONNECT_TIMEOUT,
                   what="the gateway back on the restored controller")
        wait_until(lambda: read_status(state).get("state") == "connected", what="the agent saying it is connected")
        second.ctl("identity", "show", "gw-1")  # the operator's credential works on the restored controller
    finally:
        if agent is not None:
            agent.stop()
        second.process.stop()
