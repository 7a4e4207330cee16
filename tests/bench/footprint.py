"""Resident memory of a binding agent: idle with its tunnel up, then with 100 open streams.

The binder agent hosts an echo service; a dialer agent dials it through the
relay. Idle: VmRSS after the tunnel is up and one round trip went through.
Busy: ``--streams`` client connections to the dialer's port, each with a
``--payload``-byte round trip done and the connection still open. Both
agents and the relay are reported. Last line: JSON.

``--key tpm`` puts the binding agent's device key in a swtpm the benchmark
starts on loopback (enrolled and run with ``keystore.backend = "tpm"``);
the dialer keeps a software key. ``--agent-event-loop asyncio`` runs the
agents on plain asyncio instead of uvloop.

    .venv/bin/python tests/bench/footprint.py
    /usr/bin/python3 tests/bench/footprint.py --key tpm --agent-event-loop asyncio
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.bench.bench_setup import (  # noqa: E402
    BENCH_ECHO,
    TUNNEL_PATH,
    EchoServer,
    TunnelPath,
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
#: Issue 14's goals for the idle agent, by where its device key lives.
IDLE_GOAL_MIB = {"software": 32, "tpm": 40}
KEYS = tuple(IDLE_GOAL_MIB)


class TpmBinderPath(TunnelPath):
    """The tunnel path with the binding agent's device key in the TPM at ``tcti``."""

    TCTI = ""

    def _keystore(self, name: str) -> list[str]:
        if name != self.BINDER:
            return super()._keystore(name)
        return ["[keystore]", 'backend = "tpm"', f'tcti = "{self.TCTI}"']


@contextlib.contextmanager
def key_store(key: str) -> Iterator[type[TunnelPath]]:
    """The tunnel path class for ``key``; for "tpm" a swtpm on loopback, stopped on exit."""
    if key == "software":
        yield TunnelPath
        return
    from tests.agent.identity.swtpm_harness import SWTPM, started_swtpm

    if SWTPM is None:
        raise SystemExit("footprint.py --key tpm needs swtpm (Debian package: swtpm)")
    with tempfile.TemporaryDirectory(prefix="outpost-bench-tpm-") as workdir:
        swtpm = started_swtpm(Path(workdir))
        try:
            yield type("SwtpmBinderPath", (TpmBinderPath,), {"TCTI": swtpm.tcti})
        finally:
            swtpm.stop()


def snapshot(pids: dict[str, int]) -> dict[str, float]:
    return {name: round(rss_kib(pid) / 1024, 1) for name, pid in pids.items()}


def mapped_libraries(pid: int) -> list[str]:
    """The TSS and cffi shared objects mapped into ``pid``: what a TPM key brings in."""
    names = set()
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        name = line.rsplit("/", 1)[-1] if "/" in line else ""
        if name.startswith(("libtss2", "_cffi_backend", "_libtpm2_pytss")):
            names.add(name)
    return sorted(names)


def main() -> None:
    streams = int_arg("streams", DEFAULT_STREAMS)
    size = int_arg("payload", DEFAULT_PAYLOAD)
    key = str_arg("key", "software")
    if key not in KEYS:
        raise SystemExit(f"footprint.py: --key must be one of {', '.join(KEYS)}, not {key!r}")
    echo = EchoServer()
    try:
        with key_store(key) as path_class, \
                paths({BENCH_ECHO: echo.port}, with_ssh=False, tunnel_path=path_class) as (tunnel, _):
            port = tunnel.ports[BENCH_ECHO]
            wait_for_path(port)
            pids = {"binder_agent": tunnel.binder_pid, "dialer_agent": tunnel.dialer_pid, "relay": tunnel.relay_pid}
            time.sleep(SETTLE_SECONDS)
            idle = snapshot(pids)
            status = read_status(tunnel.binder_state)
            aiohttp_loaded = status.get("aiohttp_loaded")
            backend_loaded = status.get("openssl_backend_loaded")
            key_file = sorted(p.name for p in tunnel.binder_state.glob("key*"))
            libraries = mapped_libraries(tunnel.binder_pid)
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
        "goal": f"agent_idle_rss_mib <= {IDLE_GOAL_MIB[key]}",
        "goal_met": idle["binder_agent"] <= IDLE_GOAL_MIB[key],
        "key": key,
        "key_file": key_file,
        "binder_libraries": libraries,
        "event_loop": str_arg("agent-event-loop", "default"),
        "idle_rss_mib": idle,
        "streams_rss_mib": busy,
        "transport": str_arg("agent-transport", "auto"),
        "aiohttp_loaded": aiohttp_loaded,
        "openssl_backend_loaded": backend_loaded,
        "measured": "VmRSS from /proc/PID/status of the binding agent, idle: tunnel up, one round trip done",
        "path": "dialer agent -> relay -> binder agent",
        "paths": {"tunnel": TUNNEL_PATH},
        "machine": machine(),
    })


if __name__ == "__main__":
    main()
