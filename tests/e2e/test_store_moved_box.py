"""A box on SQLite moved into PostgreSQL: the same data directory serves on the moved store and the fleet goes on.

Real processes: ``serve`` on SQLite with an enrolled gateway, a revoked one and
policies; stopped; ``store-move``; ``serve --store postgresql://...`` on the same
data directory and port (tests/controller/postgres_harness.py's server).
"""

from __future__ import annotations

import sys
from pathlib import Path

from controller.store import Store
from outpostctl.quickstart import listening_port
from tests.controller.postgres_harness import postgres, postgres_url  # noqa: F401
from tests.e2e.harness import EchoServer, Process, free_port, python_env, read_status, round_trip, run_cli, wait_until
from tests.e2e.serve_process import ServeProcess
from tests.e2e.test_backup_restore import RECONNECT_TIMEOUT
from tests.e2e.test_lifecycle_revocation import start_gateway


def serials(url: str) -> list[str]:
    store = Store(url)
    try:
        return [str(row["serial"]) for row in store.query("SELECT serial FROM certificates")]
    finally:
        store.close()


def test_a_box_moved_to_postgresql_keeps_its_gateways_revocations_serials_and_audit_chain(
    tmp_path: Path, echo_server: EchoServer, postgres_url: str  # noqa: F811
) -> None:
    data, port, ctl_config = tmp_path / "box", free_port(), tmp_path / "operator.toml"
    box = ServeProcess(data, ctl_config, port=port)
    agent = revoked_agent = None
    try:
        box.ctl("service", "create", "modbus")
        box.ctl("policy", "create", "--kind", "bind", "--identities", "role:gateway", "--services", "modbus")
        box.ctl("policy", "create", "--kind", "dial", "--identities", "operator", "--services", "modbus")
        state, agent, _ = start_gateway(box, tmp_path, "gw-1", echo_server)
        revoked_state, revoked_agent, _ = start_gateway(box, tmp_path, "gw-2", echo_server)
        box.ctl("identity", "revoke", "gw-2")
        # While the box serves, what it commits after the snapshot would stay behind: refused.
        busy = run_cli("controller.cli", "store-move", "--data", str(data), "--to", postgres_url)
        assert busy.returncode == 75 and "stop every process on this data directory first" in busy.stderr
    finally:
        if revoked_agent is not None:
            revoked_agent.stop()
        box.process.stop()
    moved = run_cli("controller.cli", "store-move", "--data", str(data), "--to", postgres_url)
    assert moved.returncode == 0, moved.stderr
    assert "certificates: " in moved.stdout and f"--store {postgres_url.split('?')[0]}" in moved.stdout
    before = serials(postgres_url)
    assert len(before) >= 2

    served = ServeProcess(data, ctl_config, port=port, store=postgres_url)
    connect = None
    try:
        # The gateway that ran all along finds its controller again, now on PostgreSQL, and a dial reaches it.
        wait_until(lambda: any(t["name"] == "gw-1" for t in served.tunnels()), timeout=RECONNECT_TIMEOUT,
                   what="gw-1 back on the controller serving the moved store")
        wait_until(lambda: read_status(state).get("state") == "connected", what="gw-1's agent connected")
        env = python_env()
        env["OUTPOSTCTL_CONFIG"] = str(ctl_config)
        connect = Process([sys.executable, "-m", "outpostctl", "connect", "modbus", "--listen", "127.0.0.1:0"],
                          env=env)
        dial_port = listening_port(connect.wait_for_line("listening"))
        assert round_trip(dial_port, b"after the move") == b"after the move"
        # The revoked gateway stays revoked: its renewal is refused.
        renew = run_cli("agent", "renew", "--state", str(revoked_state))
        assert renew.returncode == 77 and "revoked" in renew.stderr, renew.stderr
        # The next enrollment gets a serial of its own.
        start_gateway(served, tmp_path, "gw-3", echo_server)[1].stop()
        after = serials(postgres_url)
        assert len(after) > len(before) and len(set(after)) == len(after) and set(before) < set(after)
    finally:
        if connect is not None:
            connect.stop()
        if agent is not None:
            agent.stop()
        served.process.stop()
    verified = run_cli("controller.cli", "audit", "verify", "--data", str(data), "--store", postgres_url)
    assert verified.returncode == 0 and verified.stdout.startswith("the chain is whole"), verified.stdout
