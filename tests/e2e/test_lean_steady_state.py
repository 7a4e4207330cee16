"""A running agent's steady state: the tunnel on TLS directly, and no aiohttp in the process.

Real processes (controller, link emulator, ``outpost-agent run``, which
measures the controller's time and keeps its tunnel, its software key
enrolled by ``outpost-agent enroll``); the agent says in status.json what its
tunnel runs on and whether aiohttp and cryptography's OpenSSL backend are
loaded. The WebSocket, chosen by configuration, loads aiohttp: the probe can
fail. Neither transport needs the backend: signing the tunnel's challenge and
checking certificates go through libcrypto (shared/libcrypto.py).
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
        assert status["openssl_backend_loaded"] is False
    finally:
        path.stop()
