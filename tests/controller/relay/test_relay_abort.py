"""Dropping a tunnel whose TLS transport is already closing: no error, the connection ends.

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

from tests.controller.harness import run, running_controller
from tests.controller.relay.relay_harness import SCENARIO_TIMEOUT, connect, enrolled

#: The agent sees its tunnel end within this once the relay dropped it.
DROP_SEEN = 10.0


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_aborting_a_tunnel_whose_tls_transport_was_closed_twice_raises_nothing_and_drops_it(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, loop: str) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl") as ctl:
            credentials = await enrolled(ctl, "gw-abort")
            async with connect(ctl, credentials) as (session, _):
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
