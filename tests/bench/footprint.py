"""Resident memory of a binding agent: idle with its tunnel up, then with 100 open streams.

The binder agent hosts an echo service; a dialer agent dials it through the
relay. Idle: VmRSS after the tunnel is up and one round trip went through.
Busy: ``--streams`` client connections to the dialer's port, each with a
``--payload``-byte round trip done and the connection still open. Both
agents and the relay are reported. Last line: JSON.

    .venv/bin/python tests/bench/footprint.py
"""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.bench.bench_setup import (  # noqa: E402
    BENCH_ECHO,
    TUNNEL_PATH,
    EchoServer,
    connect,
    emit,
    int_arg,
    machine,
    paths,
    read_status,
    recv_exactly,
    rss_kib,
    str_arg,
    wait_for_path,
)

DEFAULT_STREAMS = 100
# Each stream carries a little data both ways, so its buffers exist.
DEFAULT_PAYLOAD = 16 * 1024
# Let the agent settle (status write, garbage) before reading VmRSS.
SETTLE_SECONDS = 1.0
IDLE_GOAL_MIB = 32


def snapshot(pids: dict[str, int]) -> dict[str, float]:
    return {name: round(rss_kib(pid) / 1024, 1) for name, pid in pids.items()}


def main() -> None:
    streams = int_arg("streams", DEFAULT_STREAMS)
    size = int_arg("payload", DEFAULT_PAYLOAD)
    echo = EchoServer()
    try:
        with paths({BENCH_ECHO: echo.port}, with_ssh=False) as (tunnel, _):
            port = tunnel.ports[BENCH_ECHO]
            wait_for_path(port)
            pids = {"binder_agent": tunnel.binder_pid, "dialer_agent": tunnel.dialer_pid, "relay": tunnel.relay_pid}
            time.sleep(SETTLE_SECONDS)
            idle = snapshot(pids)
            aiohttp_loaded = read_status(tunnel.binder_state).get("aiohttp_loaded")
            payload = os.urandom(size)
            sockets: list[socket.socket] = []
            try:
                for _ in range(streams):
                    sock = connect(port)
                    sockets.append(sock)
                    sock.sendall(payload)
                    if recv_exactly(sock, size) != payload:
                        raise RuntimeError("the echo came back different")
                time.sleep(SETTLE_SECONDS)
                busy = snapshot(pids)
                open_streams = echo.connections - 1  # the first was wait_for_path's probe
            finally:
                for sock in sockets:
                    sock.close()
    finally:
        echo.close()
    emit({
        "benchmark": "footprint",
        "agent_idle_rss_mib": idle["binder_agent"],
        "agent_streams_rss_mib": busy["binder_agent"],
        "streams": streams,
        "streams_reached_service": open_streams,
        "payload_bytes_per_stream": size,
        "goal": f"agent_idle_rss_mib <= {IDLE_GOAL_MIB}",
        "goal_met": idle["binder_agent"] <= IDLE_GOAL_MIB,
        "idle_rss_mib": idle,
        "streams_rss_mib": busy,
        "transport": str_arg("agent-transport", "auto"),
        "aiohttp_loaded": aiohttp_loaded,
        "measured": "VmRSS from /proc/PID/status of the binding agent (software key store)",
        "path": "dialer agent -> relay -> binder agent",
        "paths": {"tunnel": TUNNEL_PATH},
        "machine": machine(),
    })


if __name__ == "__main__":
    main()
