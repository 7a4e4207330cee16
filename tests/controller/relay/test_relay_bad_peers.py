"""A misbehaving agent costs the relay one tunnel or some streams, never another gateway's traffic.

A real controller-plus-relay runs in-process on 127.0.0.1. A good gateway
binds an echo service and a good operator dials it over a stream that stays
open through each attack. The misbehaving agent authenticates with the agent's
own client and then breaks the rules: garbage on the wire, DATA past the
relay's window, more streams than the relay allows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

import aiohttp

from agent.identity.tls_trust import pinned_ssl_context
from agent.tunnel.client import TunnelOptions, open_tunnel
from controller.relay.relay import RELAY_LIMITS
from shared.protocol import MAX_FRAME_PAYLOAD, MAX_STREAMS, ErrorCode
from shared.protocol.frames import FrameType, encode_frame
from tests.controller.harness import run, running_controller
from tests.e2e.link_harness import (
    ECHO_SERVICE,
    allow_echo,
    dial_echo,
    echo_once,
    echo_service,
    enrolled,
    operator_tunnel,
    relay_port,
    relay_url,
)

# A service the misbehaving agent binds and dials itself, so the relay holds its
# dials open while it waits for an ACCEPT that never comes.
LOOP_SERVICE = "loop"
# Streams the flood opens: several times what the relay allows one tunnel.
FLOOD = 4 * MAX_STREAMS
SCENARIO_TIMEOUT = 60.0


@contextlib.asynccontextmanager
async def bad_agent(ctl, credentials):
    """An authenticated tunnel that binds ``loop`` and never accepts a stream opened to it."""
    async with aiohttp.ClientSession() as http:
        options = TunnelOptions(binds={LOOP_SERVICE: ("127.0.0.1", 9)})
        session, task = await open_tunnel(http, relay_url(relay_port(ctl)), credentials,
                                          pinned_ssl_context(credentials.ca_pem), options)
        assert session.bound == (LOOP_SERVICE,)

        async def never_accept(channel) -> None:
            """The misbehaviour: hold every stream the relay opens here."""

        session.on_stream_opened = never_accept
        try:
            yield session, task
        finally:
            await session.close()
            await asyncio.wait_for(task, 10)


@contextlib.asynccontextmanager
async def bystanders(ctl, echo_port: int):
    """A good gateway binding echo and an operator with a stream to it that stays open."""
    gateway_creds = await enrolled(ctl, "gw-good", ["gateway"])
    operator_creds = await enrolled(ctl, "op-good", ["operator"])
    async with aiohttp.ClientSession() as http:
        options = TunnelOptions(binds={ECHO_SERVICE: ("127.0.0.1", echo_port)})
        good, good_task = await open_tunnel(http, relay_url(relay_port(ctl)), gateway_creds,
                                            pinned_ssl_context(gateway_creds.ca_pem), options)
        try:
            async with operator_tunnel(ctl, operator_creds) as operator:
                standing = operator.open_stream(ECHO_SERVICE)
                await asyncio.wait_for(standing.wait_accepted(), 5)
                assert await echo_once(standing, b"before", 5) == b"before"
                yield operator, standing
                # Nothing that happened to the bad tunnel reached these.
                assert await echo_once(standing, b"after", 5) == b"after"
                assert await dial_echo(operator, b"a new dial", 5) == b"a new dial"
                assert not good.conn.closed
        finally:
            await good.close()
            await good_task


async def scene(ctl, echo_port: int):
    await allow_echo(ctl, LOOP_SERVICE)
    return await enrolled(ctl, "gw-bad", ["gateway", "operator"])


def test_garbage_after_authentication_closes_only_that_tunnel_with_a_log_line(tmp_path: Path, caplog) -> None:
    async def body() -> tuple:
        async with running_controller(tmp_path / "ctl") as ctl, echo_service() as echo_port:
            bad_creds = await scene(ctl, echo_port)
            async with bystanders(ctl, echo_port), bad_agent(ctl, bad_creds) as (bad, task):
                await bad.transport.send(b"\x42" * 100)  # not a frame: type 0x42 does not exist
                await asyncio.wait_for(task, 10)
                return bad.close_reason

    with caplog.at_level(logging.WARNING, logger="shared.tunnel.session"):
        code, reason, remote = run(asyncio.wait_for(body(), SCENARIO_TIMEOUT))
    assert (code, remote) == (ErrorCode.PROTOCOL_ERROR, True)
    assert "unknown frame type 0x42" in reason
    assert any("broke the protocol (PROTOCOL_ERROR: unknown frame type 0x42)" in r.getMessage()
               for r in caplog.records)


def test_data_past_the_relays_window_closes_only_that_tunnel_with_a_log_line(tmp_path: Path, caplog) -> None:
    async def body() -> tuple:
        async with running_controller(tmp_path / "ctl") as ctl, echo_service() as echo_port:
            bad_creds = await scene(ctl, echo_port)
            async with bystanders(ctl, echo_port), bad_agent(ctl, bad_creds) as (bad, task):
                channel = bad.open_stream(LOOP_SERVICE)  # the relay waits for our own ACCEPT: nothing is consumed
                await bad.flush()
                frame = encode_frame(FrameType.DATA, 0, channel.stream_id, bytes(MAX_FRAME_PAYLOAD))
                sent = 0
                # One frame past the window, bypassing our own flow control; bounded.
                for _ in range(RELAY_LIMITS.initial_window // MAX_FRAME_PAYLOAD + 1):
                    if task.done():
                        break
                    await bad.transport.send(frame)
                    sent += MAX_FRAME_PAYLOAD
                await asyncio.wait_for(task, 10)
                return bad.close_reason, sent

    with caplog.at_level(logging.WARNING, logger="shared.tunnel.session"):
        (code, reason, remote), sent = run(asyncio.wait_for(body(), SCENARIO_TIMEOUT))
    assert sent > RELAY_LIMITS.initial_window
    assert (code, remote) == (ErrorCode.FLOW_CONTROL_ERROR, True)
    assert "exceed stream 1's window of 0" in reason
    assert any("broke the protocol (FLOW_CONTROL_ERROR" in r.getMessage() for r in caplog.records)


def test_a_stream_flood_is_refused_past_the_limit_and_the_tunnel_and_the_others_carry_on(tmp_path: Path) -> None:
    async def body() -> dict:
        async with running_controller(tmp_path / "ctl") as ctl, echo_service() as echo_port:
            bad_creds = await scene(ctl, echo_port)
            async with bystanders(ctl, echo_port) as (operator, standing), \
                    bad_agent(ctl, bad_creds) as (bad, task):
                channels = [bad.open_stream(LOOP_SERVICE) for _ in range(FLOOD)]  # one flush: a burst of OPENs
                await bad.flush()
                for _ in range(100):  # bounded: the refusals come back within a few round trips
                    refused = [c for c in channels if c.error is not None and c.error.code is ErrorCode.REFUSED_STREAM]
                    if len(refused) >= FLOOD - MAX_STREAMS:
                        break
                    await asyncio.sleep(0.05)
                # The bystanders' traffic flows while the flood's streams are held open.
                assert await echo_once(standing, b"during", 5) == b"during"
                return {"refused": len(refused), "reason": refused[0].error.reason if refused else "",
                        "still_open": sum(1 for c in channels if c.error is None), "tunnel_up": not task.done()}

    found = run(asyncio.wait_for(body(), SCENARIO_TIMEOUT))
    assert found["refused"] == FLOOD - MAX_STREAMS, found
    assert found["still_open"] == MAX_STREAMS, found
    assert f"allows {MAX_STREAMS} open streams" in found["reason"]
    assert found["tunnel_up"], found
