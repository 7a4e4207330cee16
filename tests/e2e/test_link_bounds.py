"""Memory stays bounded when the services behind a gateway stop reading, and the other streams keep flowing.

A real controller-plus-relay runs in-process; the gateway is the agent's own
TunnelSupervisor, binding an echo service and a service that accepts
connections and never reads them. An operator tunnel pushes data into the
stuck service on many streams while it keeps an echo conversation going.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path

from agent.tunnel.link_profiles import plan_for
from shared.protocol import ProtocolLimits
from shared.tunnel.channel import ChannelReset
from tests.controller.harness import run, running_controller
from tests.e2e.link_harness import (
    ECHO_SERVICE,
    StuckService,
    allow_echo,
    echo_once,
    echo_service,
    enrolled,
    gateway,
    operator_tunnel,
    relay_port,
    relay_url,
)

STUCK_SERVICE = "stuck"
# The gateway's limits, shrunk so a test fills them in seconds: eight stuck
# streams of a 1 MiB window would hold 8 MiB against a 4 MiB budget.
WINDOW = 1 << 20
BUDGET = 4 << 20
STUCK_STREAMS = 8
# What the operator pushes into each stuck stream at most: more than the
# window, the relay's window and the kernel buffers on the way together.
PUSH_MIB = 24
# Long enough for every stuck stream to fill what the path gives it (a fraction of a second on loopback).
PUSH_SECONDS = 4.0


async def push(channel, outcome: dict, index: int) -> None:
    try:
        for _ in range(PUSH_MIB):
            await channel.write(bytes(1 << 20))
        outcome[index] = "all written"
    except ChannelReset as exc:
        outcome[index] = exc.reason


def test_services_that_stop_reading_hold_at_most_the_tunnels_budget_while_others_flow(tmp_path: Path) -> None:
    base = plan_for("ethernet", keepalive_interval=2.0, ping_timeout=5.0)
    plan = dataclasses.replace(base, limits=ProtocolLimits(initial_window=WINDOW, receive_budget=BUDGET))

    async def body() -> dict:
        async with running_controller(tmp_path / "ctl") as ctl, echo_service() as echo_port:
            await allow_echo(ctl, STUCK_SERVICE)
            gw_creds = await enrolled(ctl, "gw-bounds", ["gateway"])
            op_creds = await enrolled(ctl, "op-bounds", ["operator"])
            stuck = await StuckService().start()
            binds = {ECHO_SERVICE: ("127.0.0.1", echo_port), STUCK_SERVICE: ("127.0.0.1", stuck.port)}
            try:
                async with gateway(gw_creds, [relay_url(relay_port(ctl))], plan, binds) as gw, \
                        operator_tunnel(ctl, op_creds) as operator:
                    await gw.wait_connected(10)
                    session = gw.supervisor.session
                    echo = operator.open_stream(ECHO_SERVICE)
                    await asyncio.wait_for(echo.wait_accepted(), 5)
                    outcome: dict[int, str] = {}
                    pushers = []
                    for index in range(STUCK_STREAMS):
                        channel = operator.open_stream(STUCK_SERVICE)
                        await asyncio.wait_for(channel.wait_accepted(), 5)
                        pushers.append(asyncio.ensure_future(push(channel, outcome, index)))
                    most_unread, echoes, slowest = 0, 0, 0.0
                    deadline = time.monotonic() + PUSH_SECONDS
                    while time.monotonic() < deadline:
                        started = time.monotonic()
                        payload = f"still here {echoes}".encode()
                        assert await echo_once(echo, payload, 5.0) == payload
                        slowest = max(slowest, time.monotonic() - started)
                        echoes += 1
                        most_unread = max(most_unread, session.conn.unread_bytes)
                        await asyncio.sleep(0.02)
                    await asyncio.sleep(0.5)  # the gateway's resets reach its local connections
                    found = {
                        "most_unread": most_unread, "outcome": dict(outcome), "echoes": echoes,
                        "slowest_echo": slowest, "reconnects": gw.supervisor.stats.reconnects,
                        "dropped": stuck.dropped(), "open_streams": len(session.conn.open_stream_ids),
                    }
                    for task in pushers:
                        task.cancel()
                    echo.reset()
                    return found
            finally:
                await stuck.close()

    found = run(asyncio.wait_for(body(), 90))
    assert found["most_unread"] <= BUDGET, found
    reset = [reason for reason in found["outcome"].values() if "fell" in reason]
    # 8 windows cannot fit in 4 MiB: the streams furthest behind were reset, each with the reason.
    assert reset, found
    assert "holds at most 4194304 unread bytes" in reset[0], found
    assert "all written" not in found["outcome"].values(), found
    # The gateway dropped the reset streams' local connections though the service never read them.
    assert found["dropped"] >= len(reset), found
    assert found["echoes"] >= 10 and found["slowest_echo"] < 2.0, found
    assert found["reconnects"] == 0, found
