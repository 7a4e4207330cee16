"""Dropping tunnels: one whose TLS transport is already closing raises nothing; a stop is bounded.

Under a reconnect storm the relay aborts tunnels (deadlines, shutdown) whose
transports aiohttp already closed. CPython's TLS transport lets go of its SSL
layer on a second ``close()``; asking it for its socket then raised
``AttributeError`` out of ``RelaySession.abort``.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from agent.tunnel.client import TunnelOptions
from shared.tunnel.session import CLOSE_TIMEOUT
from tests.controller.harness import run, running_controller
from tests.controller.relay.relay_harness import SCENARIO_TIMEOUT, connect, enrolled

#: aiohttp's WebSocket over TLS is where the transport was found closed twice (the relay's end of it).
OVER_WEBSOCKET = TunnelOptions(transport="websocket")

#: The agent sees its tunnel end within this once the relay dropped it.
DROP_SEEN = 10.0
#: The relay's stop grace in these tests: far below CLOSE_TIMEOUT, so waiting for a deaf peer shows.
STOP_GRACE = 0.3


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_aborting_a_tunnel_whose_tls_transport_was_closed_twice_raises_nothing_and_drops_it(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, loop: str) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl") as ctl:
            credentials = await enrolled(ctl, "gw-abort")
            async with connect(ctl, credentials, OVER_WEBSOCKET) as (session, _):
                relay = ctl.server.relay
                assert relay is not None
                (tunnel,) = [s for s in relay.sessions if s.identity is not None]
                transport = tunnel.ws._writer.transport
                transport.close()
                transport.close()  # CPython's TLS transport drops its SSL layer here
                tunnel.abort()
                tunnel.abort()  # twice, as a deadline and a shutdown may both do
                await asyncio.wait_for(session.closed.wait(), DROP_SEEN)

    with caplog.at_level(logging.ERROR):
        run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT), loop)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_a_peer_that_never_answers_the_closing_handshake_does_not_hold_the_stop(tmp_path: Path) -> None:
    """Every tunnel is closed, the deaf one too, well within CLOSE_TIMEOUT (the grace bounds the rest)."""
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl") as ctl:
            relay = ctl.server.relay
            assert relay is not None
            async with connect(ctl, await enrolled(ctl, "gw-answers"), OVER_WEBSOCKET) as (answers, _), \
                    connect(ctl, await enrolled(ctl, "gw-deaf"), OVER_WEBSOCKET) as (deaf, _):
                tunnels = {s.admitted.name: s for s in relay.sessions if s.identity is not None}
                deaf_transport = deaf.ws._writer.transport
                deaf_transport.pause_reading()  # reads neither GOAWAY nor the WebSocket close
                relay.shutdown_grace = STOP_GRACE
                loop = asyncio.get_running_loop()
                started = loop.time()
                await relay.close()
                took = loop.time() - started
                deaf_transport.resume_reading()
                await asyncio.wait_for(answers.closed.wait(), DROP_SEEN)
                await asyncio.wait_for(deaf.closed.wait(), DROP_SEEN)
            assert took < CLOSE_TIMEOUT, f"the stop waited {took:.2f} s for a peer that never answered"
            assert not relay.sessions and all(t.closed.is_set() for t in tunnels.values())
            assert answers.close_reason is not None and answers.close_reason[1] == "relay shutting down"

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))
