"""A running agent reports its tunnel's counters: bytes, reconnects, last round trip; ``outpost-agent status`` shows them.

Real processes: the controller (``outpost-controller serve``), the link
emulator and ``outpost-agent run``, whose enrolled relay address is the
emulator's. Killing the emulator drops the tunnel; the agent then fails over
to the relay's own address, which the controller's relay list (AUTH_OK) named.
"""

from __future__ import annotations

from pathlib import Path

from tests.bench.link_bench_setup import LinkTunnelPath
from tests.e2e.harness import read_status, run_cli, wait_until

# status.json is rewritten every 10 s while connected (agent.tunnel.supervisor.STATUS_INTERVAL)
# and at every change of state; a busy machine adds a few seconds.
STATUS_WAIT = 25.0
LINK = {"profile": "ethernet", "keepalive_interval": 1.0, "ping_timeout": 3.0, "reconnect_initial": 0.5,
        "reconnect_max": 2.0}


def status_text(state: Path) -> str:
    result = run_cli("agent", "status", "--state", str(state))
    assert result.returncode == 0, result.stderr
    return result.stdout


def connected_with_rtt(state: Path):
    status = read_status(state)
    return status.get("state") == "connected" and status.get("rtt_ms") is not None and status


def test_a_running_agent_reports_bytes_reconnects_and_a_round_trip_that_is_never_stale(tmp_path: Path) -> None:
    path = LinkTunnelPath(tmp_path, "clean", LINK, {}, dial=False).start()
    try:
        state = path.binder_state
        first = wait_until(lambda: connected_with_rtt(state), timeout=STATUS_WAIT, what="a round trip in status.json")
        assert first["reconnects"] == 0 and first["bytes_in"] > 0 and first["bytes_out"] > 0
        text = status_text(state)
        assert f"rtt:         {first['rtt_ms']:.0f} ms" in text, text
        assert "reconnects:  0" in text and f"bytes:       in {first['bytes_in']}, out " in text, text

        emulator, path.emulator = path.emulator, None
        emulator.process.proc.kill()  # the path goes away under a live tunnel
        emulator.process.stop()
        down = wait_until(lambda: (s := read_status(state)).get("state") != "connected" and s, timeout=STATUS_WAIT,
                          what="the drop in status.json")
        assert down["reconnects"] >= 1
        assert down["rtt_ms"] is None, "a round trip of the tunnel that dropped must not look current"
        assert down["bytes_in"] >= first["bytes_in"] and down["bytes_out"] >= first["bytes_out"]

        back = wait_until(lambda: connected_with_rtt(state), timeout=STATUS_WAIT, what="a new tunnel and round trip")
        assert back["reconnects"] >= 1
        assert back["bytes_out"] > down["bytes_out"]  # counted across tunnels, not restarted
        text = status_text(state)
        assert f"reconnects:  {back['reconnects']}" in text and "rtt:         " in text, text
        assert "last drop:   tunnel closed" in text, text
    finally:
        path.stop()
