"""SIGKILL a relay holding gateways: they are back on the other relay within 15 s plus their backoff jitter,
dials work again, and the gateways already on the other relay never lose their tunnel.

Real processes on loopback: one controller (``--role controller``), two relays (``--role relay``) on its
SQLite store, N ``outpost-agent run`` processes. N is 10 by default (each agent is a Python process of its
own on this 2-core machine); ``OUTPOST_FAILOVER_GATEWAYS`` raises it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from agent.tunnel.supervisor import FAILOVER_JITTER
from outpostctl.quickstart import listening_port
from tests.e2e.harness import EchoServer, Process, read_status, round_trip, wait_until
from tests.e2e.relay_harness import RelayProcess, RoleController
from tests.e2e.test_walking_skeleton import enroll_gateway, write_agent_config

GATEWAYS = int(os.environ.get("OUTPOST_FAILOVER_GATEWAYS", "10"))
#: The issue's bound: every gateway back within 15 s plus its backoff jitter.
FAILOVER_BOUND = 15.0
#: The agent's waits before it reaches the other relay: its backoff after the drop (a full-jitter draw
#: whose bound doubles with each tunnel that lasted less than two minutes, as these did: at most 4 s
#: here), then at most FAILOVER_JITTER once the dead relay refused the retry (agent/tunnel/).
BACKOFF_JITTER = 4.0 + FAILOVER_JITTER


def relays_listed(controller: RoleController) -> dict[str, dict]:
    return {r["name"]: r for r in json.loads(controller.ctl("relay", "list", "--json").stdout)["relays"]}


def tunnels_up_to(agent: Process, url: str) -> int:
    return sum(1 for line in list(agent.lines) if f"tunnel up to {url}" in line)


def test_sigkill_of_a_relay_moves_its_gateways_and_the_others_never_drop(tmp_path: Path,
                                                                        echo_server: EchoServer) -> None:
    controller = RoleController(tmp_path / "controller", "controller")
    relays: list[RelayProcess] = []
    agents: dict[str, Process] = {}
    connect = None
    try:
        relays = [RelayProcess(controller, tmp_path, "r1"), RelayProcess(controller, tmp_path, "r2")]
        wait_until(lambda: all(r["health"] == "live" for r in relays_listed(controller).values()),
                   what="both relays' heartbeats")
        controller.ctl("service", "create", "echo")
        controller.ctl("policy", "create", "--kind", "bind", "--identities", "gw-0", "--services", "echo")
        controller.ctl("policy", "create", "--kind", "dial", "--identities", "role:operator", "--services", "echo")
        states = {f"gw-{n}": enroll_gateway(controller, tmp_path, f"gw-{n}") for n in range(GATEWAYS)}
        for name, state in states.items():
            binds = {"echo": echo_server.port} if name == "gw-0" else None
            config = write_agent_config(tmp_path / f"{name}.toml", state, binds=binds)
            agents[name] = Process([sys.executable, "-m", "agent", "run", "--config", str(config)])
        wait_until(lambda: all(read_status(s).get("state") == "connected" for s in states.values()),
                   timeout=60, what="every gateway connected")
        on = {name: read_status(state)["relay"] for name, state in states.items()}
        doomed, other = relays
        moving = [name for name, url in on.items() if url == doomed.url]
        staying = [name for name, url in on.items() if url == other.url]
        # The controller spreads the equally loaded relays over the gateways by their identity.
        assert moving and staying and len(moving) + len(staying) == GATEWAYS, on
        before = {name: read_status(states[name])["connected_since"] for name in staying}

        doomed.process.proc.kill()
        killed = time.monotonic()
        wait_until(lambda: all(tunnels_up_to(agents[name], other.url) >= 1 for name in moving),
                   timeout=FAILOVER_BOUND + BACKOFF_JITTER + 10, interval=0.05, what="every gateway on r2")
        all_back = time.monotonic() - killed

        connect = controller.ctl_process("connect", "echo", "--listen", "127.0.0.1:0")
        port = listening_port(connect.wait_for_line("listening"))
        wait_until(lambda: round_trip(port, b"after the kill", timeout=5) == b"after the kill", timeout=30,
                   interval=0.5, what="a dial through r2")
        dial_back = time.monotonic() - killed

        for name in staying:
            assert read_status(states[name])["connected_since"] == before[name], name
            assert "closed" not in agents[name].output, agents[name].output
        for name in moving:
            assert read_status(states[name])["relay"] == other.url
        print(json.dumps({"gateways": GATEWAYS, "moved": len(moving), "all_back_s": round(all_back, 2),
                          "dial_back_s": round(dial_back, 2)}))
        assert all_back <= FAILOVER_BOUND + BACKOFF_JITTER, all_back
        wait_until(lambda: relays_listed(controller)["r1"]["health"] == "stale", timeout=30,
                   what="r1 shown stale")
        wait_until(lambda: relays_listed(controller)["r2"]["tunnels"] >= GATEWAYS, timeout=15,
                   what="r2's heartbeat counting every gateway")
    finally:
        if connect is not None:
            connect.stop()
        for agent in agents.values():
            agent.stop()
        for relay in relays:
            relay.process.stop()
        controller.process.stop()
