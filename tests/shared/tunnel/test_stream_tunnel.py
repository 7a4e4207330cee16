"""The data path on a tunnel carried on a byte stream (as on TLS): few copies, few wakes.

A local connection's message goes into the tunnel from the read callback,
without waking the splice's pump; received bulk payloads are views of the
received chunk until a reader keeps them.

Two real sessions over TCP on 127.0.0.1 with the protocol directly on the
stream (``StreamTransport``, as on TLS), a real local TCP connection spliced
into one end's stream, and an echo on the other end.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from typing import Any

import pytest
from tunnel_loopback import End, _authenticated, both_running, run, settle

from shared.protocol import INITIAL_WINDOW, Liveness, ProtocolLimits
from shared.tunnel.channel import MAX_SINK_BACKLOG, StreamChannel
from shared.tunnel.splice import splice_socket, splice_streams
from shared.tunnel.transport import StreamTransport, open_tunnel_connection

#: Deadlines far beyond the scenario, as a real tunnel's are.
ARMED = Liveness(keepalive_interval=25.0, ping_timeout=10.0, idle_timeout=60.0)
#: Round trips measured: enough that a pump wake per message would stand out from the few set-up ones.
ROUND_TRIPS = 300
#: Writes the pump may still make: the odd message that arrived while the tunnel was busy writing.
MOST_PUMP_WRITES = 10
#: Bytes of the mixed-size transfer: several windows' worth of bulk reads among small messages.
MIXED_BYTES = 6 * 1024 * 1024
#: What the dialer tries to send past a binder that stopped reading: many times any bound the relay keeps.
GREEDY_DIAL_BYTES = 256 * 1024 * 1024


@contextlib.asynccontextmanager
async def stream_tunnel(agent_limits: ProtocolLimits = ProtocolLimits()) -> AsyncIterator[tuple[End, End]]:
    """(relay end, agent end) over one loopback TCP connection, the agent's end read by a TunnelReader."""
    loop = asyncio.get_running_loop()
    relay_conn, agent_conn = _authenticated(loop.time(), ProtocolLimits(), agent_limits, ARMED)
    relay_side: asyncio.Future[End] = loop.create_future()
    tasks: list[asyncio.Task[Any]] = []

    def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session = End(relay_conn, StreamTransport(reader, writer))
        relay_side.set_result(session)
        tasks.append(loop.create_task(session.run()))

    server = await asyncio.start_server(accepted, "127.0.0.1", 0)
    async with server:
        reader, writer = await open_tunnel_connection("127.0.0.1", server.sockets[0].getsockname()[1])
        async with both_running(relay_side, End(agent_conn, StreamTransport(reader, writer)), tasks,
                                errors_tolerated=True) as ends:
            yield ends


async def echo(channel: StreamChannel) -> None:
    while chunks := await channel.read_chunks():
        await channel.write_chunks(chunks)
    await channel.end()


def counting(host: Any, method: str) -> list[int]:
    """The calls of ``host``'s coroutine method ``method`` from now on, counted in the list's one item."""
    calls = [0]
    original = getattr(host, method)

    async def counted(*args: Any) -> None:
        calls[0] += 1
        await original(*args)

    setattr(host, method, counted)
    return calls


async def warm_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """One round trip before counting: the stream's set-up wakes are not the ones measured."""
    writer.write(b"warm-up")
    assert await reader.readexactly(7) == b"warm-up"


async def round_trips(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    for n in range(ROUND_TRIPS):
        request = n.to_bytes(8, "big") * 8  # 64 bytes, as latency.py sends
        writer.write(request)
        assert await reader.readexactly(64) == request


@contextlib.asynccontextmanager
async def spliced_client(agent: End, relay: End) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter,
                                                                         list[int]]]:
    """A local client whose connection is spliced into a stream echoed by the relay's end; and the count
    of the pump's writes into that stream."""
    channel = agent.open_stream("echo")
    await channel.wait_accepted()
    echoing = asyncio.ensure_future(echo(await relay.next_stream()))
    pump_writes = counting(channel, "write_chunks")
    local: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.get_running_loop().create_future()
    server = await asyncio.start_server(lambda r, w: local.set_result((r, w)), "127.0.0.1", 0)
    async with server:
        client_reader, client_writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
        splicing = asyncio.ensure_future(splice_socket(channel, *await local))
        try:
            yield client_reader, client_writer, pump_writes
        finally:
            client_writer.close()
            await asyncio.wait({splicing, echoing}, timeout=5)
            splicing.cancel()
            echoing.cancel()


def test_request_and_response_messages_do_not_wake_the_splice_pump() -> None:
    async def scenario() -> int:
        async with stream_tunnel() as (relay, agent), spliced_client(agent, relay) as (reader, writer, pump_writes):
            await warm_up(reader, writer)
            pump_writes[0] = 0
            await round_trips(reader, writer)
            return pump_writes[0]

    writes = run(scenario)
    assert writes <= MOST_PUMP_WRITES, f"the pump wrote {writes} of {ROUND_TRIPS} messages"


def test_messages_sent_at_once_and_by_the_pump_keep_their_order() -> None:
    async def scenario() -> tuple[bytes, bytes, int]:
        pattern = random.Random(14)
        sent = bytearray()
        async with stream_tunnel() as (relay, agent), spliced_client(agent, relay) as (reader, writer, pump_writes):
            received = bytearray()

            async def collect() -> None:
                while len(received) < MIXED_BYTES:
                    received.extend(await reader.read(1 << 20))

            collecting = asyncio.ensure_future(collect())
            while len(sent) < MIXED_BYTES:
                size = min(pattern.choice((1, 64, 1500, 70_000, 300_000)), MIXED_BYTES - len(sent))
                piece = bytes([len(sent) % 251]) * size
                sent += piece
                writer.write(piece)
                if pattern.random() < 0.3:
                    await writer.drain()
                    await asyncio.sleep(0)
            await writer.drain()
            await asyncio.wait_for(collecting, 20)
            return bytes(sent), bytes(received), pump_writes[0]

    sent, received, pump_writes = run(scenario)
    assert received == sent
    assert pump_writes > 0  # the bulk reads went through the pump, the small ones at once, interleaved


def test_a_payload_kept_for_a_reader_is_bytes_of_its_own_not_a_view_of_the_chunk() -> None:
    async def scenario() -> list[type]:
        async with stream_tunnel() as (relay, agent):
            outgoing = agent.open_stream("svc")
            await outgoing.wait_accepted()
            incoming = await relay.next_stream()
            await outgoing.write(b"k" * 200_000)  # bulk frames: views on receipt
            for _ in range(100):
                if incoming.received == 200_000:
                    break
                await asyncio.sleep(0.01)
            kept = [type(chunk) for chunk in incoming._chunks]
            assert b"".join(await incoming.read_chunks()) == b"k" * 200_000
            return kept

    kept = run(scenario)
    assert kept and set(kept) == {bytes}


@pytest.mark.parametrize(("method", "counted"), [("flush", "flushes"), ("_receive", "wakes of the reading task")])
def test_a_response_takes_neither_a_flush_nor_a_wake_of_the_reading_task(method: str, counted: str) -> None:
    """The agent's end receives 300 responses: none queues anything to send, so none awaits a flush (its lock,
    its drain); its requests leave from the read callback, so the tunnel's async flush is not used at all; and
    each response is handled in the read callback, so the reading task does not wake for it."""
    async def scenario() -> int:
        async with stream_tunnel() as (relay, agent), spliced_client(agent, relay) as (reader, writer, _):
            await warm_up(reader, writer)
            calls = counting(agent, method)
            await round_trips(reader, writer)
            return calls[0]

    calls = run(scenario)
    assert calls <= MOST_PUMP_WRITES, f"{calls} {counted} for {ROUND_TRIPS} round trips"


def test_a_flow_control_violation_handled_in_the_callback_still_ends_the_tunnel_with_its_reason() -> None:
    from shared.protocol import ErrorCode
    from shared.protocol.frames import FrameType, encode_frame

    async def scenario() -> tuple[Any, bool]:
        async with stream_tunnel() as (relay, agent):
            outgoing = agent.open_stream("svc")
            await outgoing.wait_accepted()
            await relay.next_stream()
            too_much = encode_frame(FrameType.DATA, 0, outgoing.stream_id, b"z" * (64 * 1024))
            assert relay.transport.write_nowait is not None
            for _ in range(40):  # 2.5 MiB on a 2 MiB window
                relay.transport.writer.write(too_much)  # type: ignore[attr-defined]
            await asyncio.wait_for(agent.closed.wait(), 10)
            return agent.close_reason, agent.conn.closed

    reason, closed = run(scenario)
    assert closed and reason is not None and reason[0] is ErrorCode.FLOW_CONTROL_ERROR


def test_a_binder_that_grants_a_huge_window_and_stops_reading_holds_the_relay_to_the_dialers_window() -> None:
    """The window a binder (or a relay link) grants is its own to choose: the relay must not queue all of it
    unsent and credit the dialer back at once, or a peer that stops reading pins all the dialer sends."""
    greedy = ProtocolLimits(initial_window=1024**3, receive_budget=1024**3)

    async def scenario() -> None:
        async with stream_tunnel() as (relay_a, dialer), stream_tunnel(greedy) as (relay_b, binder):
            dial = dialer.open_stream("svc")
            a = await relay_a.next_stream()
            b = relay_b.open_stream("svc")
            await b.wait_accepted()
            await binder.next_stream()
            splice = asyncio.ensure_future(splice_streams(a, b))
            assert isinstance(binder.transport, StreamTransport)
            binder.transport.writer.transport.pause_reading()  # the binder reads nothing more from the relay
            writer = asyncio.ensure_future(dial.write(b"f" * GREEDY_DIAL_BYTES))
            try:
                for _ in range(5):
                    await settle()
                    # Unsent at the relay: the shortcut's bound and what the pump holds (one dialer window).
                    assert relay_b.backlog() <= MAX_SINK_BACKLOG + 2 * INITIAL_WINDOW, relay_b.backlog()
                    assert relay_a.conn.unread_bytes <= INITIAL_WINDOW
                assert not writer.done()
            finally:
                writer.cancel()
                splice.cancel()

    run(scenario)
