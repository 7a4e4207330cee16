"""The agent's reconnect loop backs off while tunnels keep dropping, and starts over after a stable one.

A real controller-plus-relay runs in-process; the gateway is the agent's own
TunnelSupervisor behind the link emulator, whose reset_all() drops the tunnel
(an RST, as a relay restart or a carrier reset gives).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from agent.tunnel.link_profiles import plan_for
from tests.controller.harness import run, running_controller
from tests.e2e.link_harness import emulated, enrolled, gateway, relay_port, relay_url
from tests.linkemu.profiles import CLEAN

# Waits drawn below 0.2, 0.4, 0.8 s...: quick enough for a test, far below the cap.
FAST_BACKOFF = dict(keepalive_interval=5.0, ping_timeout=5.0, reconnect_initial=0.2, reconnect_max=60.0)
# Connecting (TCP + TLS + AUTH) on loopback on a busy 2-core machine, plus the longest wait here.
RECONNECT_TIMEOUT = 15.0


async def drop_and_reconnect(emu, gw) -> None:
    """End the tunnel with an RST and wait until the supervisor has the next one up."""
    reconnects = gw.supervisor.stats.reconnects
    assert emu.reset_all() == 1
    deadline = time.monotonic() + RECONNECT_TIMEOUT
    while gw.supervisor.stats.reconnects == reconnects or not gw.supervisor.connected.is_set():
        assert time.monotonic() < deadline, "the tunnel did not come back"
        await asyncio.sleep(0.02)


def test_a_tunnel_that_keeps_dropping_quickly_keeps_growing_the_wait(tmp_path: Path) -> None:
    plan = plan_for("ethernet", **FAST_BACKOFF, stable_after=30.0)

    async def body() -> list[int]:
        async with running_controller(tmp_path / "ctl") as ctl:
            creds = await enrolled(ctl, "gw-flapping", ["gateway"])
            async with emulated(relay_port(ctl), CLEAN) as emu, gateway(creds, [relay_url(emu.port)], plan) as gw:
                await gw.wait_connected(10)
                attempts = []
                for _ in range(3):
                    await drop_and_reconnect(emu, gw)
                    attempts.append(gw.supervisor.backoff.attempt)
                return attempts

    # Each quick drop doubles the bound of the next wait: 0.2, 0.4, 0.8 s.
    assert run(asyncio.wait_for(body(), 90)) == [1, 2, 3]


def test_after_a_stable_tunnel_drops_the_wait_starts_again_from_the_initial_bound(tmp_path: Path) -> None:
    plan = plan_for("ethernet", **FAST_BACKOFF, stable_after=1.5)

    async def body() -> tuple[int, int, float]:
        async with running_controller(tmp_path / "ctl") as ctl:
            creds = await enrolled(ctl, "gw-stable", ["gateway"])
            async with emulated(relay_port(ctl), CLEAN) as emu, gateway(creds, [relay_url(emu.port)], plan) as gw:
                await gw.wait_connected(10)
                await drop_and_reconnect(emu, gw)
                await drop_and_reconnect(emu, gw)
                before = gw.supervisor.backoff.attempt
                await asyncio.sleep(plan.stable_after + 0.5)  # up and healthy for longer than stable_after
                await drop_and_reconnect(emu, gw)
                return before, gw.supervisor.backoff.attempt, gw.supervisor.backoff.bound()

    before, after, next_bound = run(asyncio.wait_for(body(), 90))
    assert before == 2
    # Reset, then one wait drawn below the initial bound: the next one would be twice that.
    assert after == 1 and next_bound == 2 * plan.reconnect_initial
