"""SIGKILL one of two controllers: enrollment, renewal and the management API keep working through the other.

Two ``--role controller`` processes on one data directory and store, behind one front (one URL for
agents, relays and outpostctl: docs/deployment.md), a relay of its own, a gateway on it.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.e2e.harness import free_port, read_status, run_cli, wait_until
from tests.e2e.relay_harness import RelayProcess, RoleController, TcpFront
from tests.e2e.test_walking_skeleton import enroll_gateway, start_agent


def test_killing_one_controller_of_a_pair_leaves_enrollment_renewal_and_the_api_working(tmp_path: Path) -> None:
    front = TcpFront()
    data = tmp_path / "controller"
    pair: list[RoleController] = []
    relay = None
    agent = None
    try:
        front.backends = [free_port(), free_port()]
        for port in front.backends:
            pair.append(RoleController(data, "controller", port, "--advertise", front.url))
        first, second = pair
        relay = RelayProcess(second, tmp_path, "r1")
        wait_until(lambda: json.loads(first.ctl("relay", "list", "--json").stdout)["relays"][0]["health"] == "live",
                   what="the relay's heartbeat")
        state = enroll_gateway(first, tmp_path, "gw-a")
        assert json.loads((state / "identity.json").read_text())["controller_url"] == front.url
        agent = start_agent(tmp_path, "gw-a", state)
        connected_since = read_status(state)["connected_since"]

        first.process.proc.kill()  # the front's first choice: every new connection now finds the other
        first.process.proc.wait(10)
        listed = json.loads(second.ctl("identity", "list", "--json").stdout)["identities"]
        assert "gw-a" in {i["name"] for i in listed}
        wait_until(lambda: json.loads(second.ctl("relay", "list", "--json").stdout)["relays"][0]["tunnels"] == 1,
                   what="the relay's tunnel count through the surviving controller")
        later = enroll_gateway(second, tmp_path, "gw-b")  # a token made and redeemed through the survivor
        assert (later / "cert.pem").is_file()
        before = (state / "cert.pem").read_text()
        renewed = run_cli("agent", "renew", "--state", str(state))
        assert renewed.returncode == 0, renewed.stderr
        assert (state / "cert.pem").read_text() != before
        # The tunnel on the relay never noticed.
        assert read_status(state)["connected_since"] == connected_since
        wait_until(lambda: read_status(state)["state"] == "connected", what="the tunnel still up")
    finally:
        if agent is not None:
            agent.stop()
        if relay is not None:
            relay.process.stop()
        for controller in pair:
            controller.process.stop()
        front.close()

