"""Two ``TunnelSession`` ends joined by a real WebSocket on 127.0.0.1, for the glue's behaviour tests.

A module with its own name, not conftest.py: test folders here have no
__init__.py, so ``import conftest`` could pick up another folder's conftest.

Each end runs a real protocol ``Connection``; the two are authenticated by
exchanging their handshake bytes directly (the handshake is the core's and the
agent's and relay's business, tested there), then handed to the sessions.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, TypeVar

import aiohttp
from aiohttp import web

from shared.protocol import Connection, Liveness, ProtocolLimits, Role
from shared.tunnel.channel import StreamChannel
from shared.tunnel.session import WS_RECEIVE_MAX, TunnelSession

T = TypeVar("T")

#: Every scenario ends well within this, on a loaded machine too; past it the
#: test fails instead of hanging the suite.
SCENARIO_DEADLINE = 30.0
#: How long "nothing more happens" is watched for: many event-loop turns and
#: loopback round trips, so a write that could go on would have.
SETTLE = 0.3
#: Bounds a wait for what one end will do (a frame across loopback): far more than it takes under
#: emulation on a loaded machine; past it the test fails instead of waiting on.
PROMPT = 10.0
#: How often such a wait looks again.
PROMPT_POLL = 0.01
#: A small window, so a few KiB are enough to exhaust a stream's credit.
SMALL_WINDOW = 4096
#: Neither end pings nor times out: a scenario's pauses must not end the tunnel.
QUIET = Liveness(keepalive_interval=None, idle_timeout=None)
#: Rounds of handing handshake bytes across; three settle it.
MAX_HANDSHAKE_ROUNDS = 10


def run(scenario: Callable[[], Awaitable[T]]) -> T:
    """Run one async scenario on a fresh event loop, bounded by SCENARIO_DEADLINE."""
    async def bounded() -> T:
        return await asyncio.wait_for(scenario(), SCENARIO_DEADLINE)
    return asyncio.run(bounded())


class End(TunnelSession):
    """One end of the tunnel: accepts (or refuses) every stream the peer opens, and queues its channel."""

    def __init__(self, conn: Connection, ws: object, *, accept: bool = True) -> None:
        super().__init__(conn, ws)
        self.accept = accept
        self.opened: asyncio.Queue[StreamChannel] = asyncio.Queue()

    async def on_stream_opened(self, channel: StreamChannel) -> None:
        if not self.accept:
            await super().on_stream_opened(channel)  # refuses: SERVICE_UNKNOWN
            return
        if channel.error is not None or self.conn.closed:
            return  # the opener gave up before this end came to accept
        self.conn.accept_stream(channel.stream_id)
        await self.flush()
        await self.opened.put(channel)

    async def next_stream(self) -> StreamChannel:
        return await self.opened.get()


def _authenticated(now: float, relay_limits: ProtocolLimits,
                   agent_limits: ProtocolLimits, liveness: Liveness) -> tuple[Connection, Connection]:
    relay = Connection(Role.RELAY, now, limits=relay_limits, liveness=liveness)
    agent = Connection(Role.AGENT, now, limits=agent_limits, liveness=liveness)

    def exchange() -> None:
        for _ in range(MAX_HANDSHAKE_ROUNDS):
            to_agent, to_relay = relay.data_to_send(), agent.data_to_send()
            if not to_agent and not to_relay:
                return
            agent.receive_data(to_agent, now)
            relay.receive_data(to_relay, now)
        raise AssertionError("the handshake never settled")

    relay.send_challenge(bytes(32))
    exchange()
    agent.send_auth(["-----BEGIN CERTIFICATE-----\nleaf\n-----END CERTIFICATE-----\n"], b"signature")
    exchange()
    relay.accept_auth({"identity": "spiffe://example.org/acme/gw-1", "name": "gw-1", "time": 1700000000})
    exchange()
    assert relay.authenticated and agent.authenticated
    return relay, agent


@contextlib.asynccontextmanager
async def both_running(relay_side: Awaitable[End], agent: End, tasks: Iterable[asyncio.Task[Any]] = (), *,
                       errors_tolerated: bool = False) -> AsyncIterator[tuple[End, End]]:
    """(relay end, agent end) with the agent's end running too; at the end both closed and their tasks done.

    ``errors_tolerated``: a task's error at the end is not the scenario's (on a bare TCP stream, an end may
    find its socket already gone, ENOTCONN, when its peer closed first).
    """
    running = [asyncio.get_running_loop().create_task(agent.run()), *tasks]
    relay = await relay_side
    try:
        yield relay, agent
    finally:
        await agent.close()
        await relay.close()
        await asyncio.wait_for(asyncio.gather(*running, return_exceptions=errors_tolerated), SCENARIO_DEADLINE)


@contextlib.asynccontextmanager
async def tunnel(*, relay_limits: ProtocolLimits = ProtocolLimits(), agent_limits: ProtocolLimits = ProtocolLimits(),
                 relay_accepts: bool = True, agent_accepts: bool = True,
                 liveness: Liveness = QUIET) -> AsyncIterator[tuple[End, End]]:
    """(relay end, agent end) of one authenticated tunnel over a WebSocket on 127.0.0.1, both running."""
    loop = asyncio.get_running_loop()
    relay_conn, agent_conn = _authenticated(loop.time(), relay_limits, agent_limits, liveness)
    relay_side: asyncio.Future[End] = loop.create_future()

    async def handle(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=WS_RECEIVE_MAX)
        await ws.prepare(request)
        session = End(relay_conn, ws, accept=relay_accepts)
        relay_side.set_result(session)
        await session.run()
        return ws

    app = web.Application()
    app.router.add_get("/tunnel", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    await web.SockSite(runner, sock).start()
    http = aiohttp.ClientSession()
    try:
        ws = await http.ws_connect(f"http://127.0.0.1:{port}/tunnel", max_msg_size=WS_RECEIVE_MAX, autoping=True)
        async with both_running(relay_side, End(agent_conn, ws, accept=agent_accepts)) as ends:
            yield ends
    finally:
        await http.close()
        await runner.cleanup()


async def settle() -> None:
    """Give both ends time to do whatever they still can."""
    await asyncio.sleep(SETTLE)


async def until(condition: Callable[[], bool], what: str) -> None:
    """Wait (bounded) until ``condition()`` holds: what must have happened is waited for, not slept for."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + PROMPT
    while not condition():
        assert loop.time() < deadline, f"{what}: not within {PROMPT} s"
        await asyncio.sleep(PROMPT_POLL)


async def read_exactly(channel: StreamChannel, size: int) -> bytes:
    """``size`` bytes from ``channel``, read as they come."""
    received = bytearray()
    while len(received) < size:
        data = await channel.read()
        assert data, f"the stream ended after {len(received)} of {size} bytes"
        received += data
    return bytes(received)


async def read_to_end(channel: StreamChannel) -> bytes:
    received = bytearray()
    while data := await channel.read():
        received += data
    return bytes(received)
