"""A running agent's steady state: the tunnel on TLS directly, and no aiohttp in the process.

Real processes (controller, link emulator, ``outpost-agent run``, which
enrolls, measures the controller's time and keeps its tunnel); the agent
says in status.json what its tunnel runs on and whether aiohttp is loaded.
The WebSocket, chosen by configuration, loads it: the probe can fail.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.bench.link_bench_setup import LinkTunnelPath
from tests.e2e.harness import read_status, wait_until

# status.json is written at every change of state; a busy machine adds a few seconds.
STATUS_WAIT = 25.0
LINK = {"profile": "ethernet", "keepalive_interval": 1.0, "ping_timeout": 3.0}


@pytest.mark.parametrize(("transport", "loaded"), [("auto", False), ("websocket", True)])
def test_the_agent_tunnels_without_aiohttp_unless_the_websocket_is_chosen(tmp_path: Path, transport: str,
                                                                          loaded: bool) -> None:
    path = LinkTunnelPath(tmp_path, "clean", {**LINK, "transport": transport}, {}, dial=False).start()
    try:
        status = wait_until(lambda: (s := read_status(path.binder_state)).get("state") == "connected" and s,
                            timeout=STATUS_WAIT, what="a connected tunnel in status.json")
        assert status["transport"] == ("websocket" if transport == "websocket" else "tls")
        assert status["aiohttp_loaded"] is loaded
    finally:
        path.stop()
