"""A running agent reports its tunnel's counters: bytes, reconnects, last round trip; ``outpost-agent status`` shows them.

Real processes: the controller (``outpost-controller serve``), the link
emulator and ``outpost-agent run``, whose relay address is the emulator's.
Killing the emulator drops the tunnel; a new emulator on the same port lets
it back.
"""

from __future__ import annotations

import time
from pathlib import Path

from tests.bench.link_bench_setup import Emulator, LinkTunnelPath
from tests.e2e.harness import read_status, run_cli, wait_until

# status.json is rewritten every 10 s while connected (agent.tunnel.runner.STATUS_INTERVAL),
# on every change of state, and a busy machine adds a few seconds.
STATUS_WAIT = 25.0
LINK = {"profile": "ethernet", "keepalive_interval": 1.0, "ping_timeout": 3.0, "reconnect_initial": 0.5,
        "reconnect_max": 2.0}


def status_text(state: Path) -> str:
    result = run_cli("agent", "status", "--state", str(state))
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_a_running_agent_reports_bytes_reconnects_and_a_round_trip_that_is_never_stale(tmp_path: Path) -> None:
    path = LinkTunnelPath(tmp_path, "clean", LINK, {}, dial=False).start()
    try:
        state = path.binder_state
        first = wait_until(lambda: (s := read_status(state)).get("rtt_ms") is not None and s, timeout=STATUS_WAIT,
                           what="a round trip in status.json")
        assert first["state"] == "connected" and first["reconnects"] == 0
        assert first["bytes_in"] > 0 and first["bytes_out"] > 0
        text = status_text(state)
        assert f"rtt:         {first['rtt_ms']:.0f} ms" in text
        assert "reconnects:  0" in text and "bytes:       in " in text

        port = path.emulator.port
        path.emulator.process.proc.kill()  # the path goes away under a live tunnel
        path.emulator.process.stop()
        path.emulator = None
        down = wait_until(lambda: (s := read_status(state)).get("state") != "connected" and s, timeout=STATUS_WAIT,
                          what="the drop in status.json")
        assert down["reconnects"] >= 1
        assert down["rtt_ms"] is None, "a round trip of the tunnel that dropped must not look current"
        assert down["bytes_in"] >= first["bytes_in"] and down["bytes_out"] >= first["bytes_out"]
        text = status_text(state)
        assert "rtt:" not in text, text
        assert "reconnects:  " in text, text
        assert "tunnel:      waiting" in text or "tunnel:      connecting" in text, text

        path.emulator = Emulator(int(path.controller.url.rsplit(":", 1)[1]), "clean", "--port", str(port))
        back = wait_until(lambda: (s := read_status(state)).get("state") == "connected" and s.get("rtt_ms") and s,
                          timeout=STATUS_WAIT + 10, what="the tunnel back, with a fresh round trip")
        assert back["reconnects"] >= down["reconnects"]
        assert back["bytes_out"] > down["bytes_out"]  # counted across tunnels, not restarted
        assert back["updated"] > down["updated"]
    finally:
        path.stop()
