"""A controller restored from a backup taken while it ran: its enrolled gateway reconnects, no new token."""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.e2e.harness import EchoServer, free_port, read_status, run_cli, wait_until
from tests.e2e.serve_process import ServeProcess
from tests.e2e.test_lifecycle_revocation import start_gateway

#: The agent's backoff after losing its relay grows to tens of seconds; a minute covers it with jitter.
RECONNECT_TIMEOUT = 60.0


def test_a_backup_taken_while_running_restores_a_controller_its_gateway_reconnects_to(
    tmp_path: Path, echo_server: EchoServer
) -> None:
    data, port, ctl_config = tmp_path / "controller", free_port(), tmp_path / "operator.toml"
    first = ServeProcess(data, ctl_config, port=port)
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
    second = ServeProcess(data, ctl_config, port=port)
    try:
        wait_until(lambda: any(t["name"] == "gw-1" for t in second.tunnels()), timeout=RECONNECT_TIMEOUT,
                   what="the gateway back on the restored controller")
        wait_until(lambda: read_status(state).get("state") == "connected", what="the agent saying it is connected")
        second.ctl("identity", "show", "gw-1")  # the operator's credential works on the restored controller
    finally:
        if agent is not None:
            agent.stop()
        second.process.stop()
