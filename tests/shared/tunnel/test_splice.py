"""Splices: a stream carried into a local TCP connection (the agent) or into another stream (the relay).

Real sessions over WebSockets on 127.0.0.1 (tunnel_loopback.py) and real
loopback TCP connections for the local side.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from tunnel_loopback import SMALL_WINDOW, End, read_exactly, read_to_end, run, settle, tunnel

from shared.protocol import ErrorCode, ProtocolLimits
from shared.tunnel.channel import ChannelReset, StreamChannel
from shared.tunnel.splice import splice_socket, splice_streams

SMALL = ProtocolLimits(initial_window=SMALL_WINDOW)
#: How long a splice may take to end once one side ended; far more than a loopback round trip.
PROMPT = 5.0
#: Socket buffers of the local connection in a slow-reader scenario: small, so a
#: few hundred KiB are enough to fill them.
TINY_SOCKET_BUFFER = 4096


# -- the relay's splice: a stream into another stream --------------------------

@dataclass
class Relayed:
    """A dialer's stream through the relay's splice to a binder's stream, as the relay joins them."""

    dialer: End
    binder: End
    relay_to_dialer: End
    relay_to_binder: End
    dial: StreamChannel  # the dialer's end
    served: StreamChannel  # the binder's end
    splice: asyncio.Future[None]


@contextlib.asynccontextmanager
async def relayed(limits: ProtocolLimits = ProtocolLimits()) -> AsyncIterator[Relayed]:
    async with tunnel(relay_limits=limits, agent_limits=limits) as (relay_a, dialer), \
            tunnel(relay_limits=limits, agent_limits=limits) as (relay_b, binder):
        dial = dialer.open_stream("svc")
        a = await relay_a.next_stream()
        b = relay_b.open_stream("svc")
        await b.wait_accepted()
        served = await binder.next_stream()
        splice = asyncio.ensure_future(splice_streams(a, b))
        try:
            yield Relayed(dialer, binder, relay_a, relay_b, dial, served, splice)
        finally:
            splice.cancel()


def test_relayed_bytes_flow_both_ways_and_the_splice_ends_when_both_directions_ended() -> None:
    request, answer = b"q" * 100_000, b"a" * 300_000

    async def scenario() -> None:
        async with relayed() as r:
            await r.dial.write(request)
            await r.dial.end()
            assert await read_to_end(r.served) == request
            assert not r.splice.done()  # half-closed: the answer may still come
            await r.served.write(answer)
            await r.served.end()
            assert await read_to_end(r.dial) == answer
            await asyncio.wait_for(r.splice, PROMPT)
            assert r.relay_to_dialer.streams == {} and r.relay_to_binder.streams == {}

    run(scenario)


def test_relayed_bytes_keep_their_order_when_the_shortcut_and_the_pump_take_turns() -> None:
    # Small windows and a reader that pauses: the relay passes messages on at once while the
    # binder's window allows, and its pump carries them while it does not; none may overtake another.
    messages = [n.to_bytes(4, "big") * 25 for n in range(2000)]  # 100 bytes each, 200 KB: many windows

    async def scenario() -> None:
        async with relayed(SMALL) as r:
            async def send() -> None:
                for message in messages:
                    await r.dial.write(message)
                await r.dial.end()

            sender = asyncio.ensure_future(send())
            received = bytearray()
            while True:
                data = await r.served.read()
                if not data:
                    break
                received += data
                if len(received) % 7 == 0:
                    await asyncio.sleep(0.001)  # a reader that falls behind now and then
            await sender
            assert bytes(received) == b"".join(messages)

    run(scenario)


@pytest.mark.parametrize("side", ["binder", "dialer"])
def test_a_reset_on_either_side_reaches_the_other_with_its_reason_and_ends_the_splice(side: str) -> None:
    async def scenario() -> None:
        async with relayed() as r:
            await r.dial.write(b"hello")
            assert await read_exactly(r.served, 5) == b"hello"
            resetting, other = (r.served, r.dial) if side == "binder" else (r.dial, r.served)
            resetting.reset(ErrorCode.CONNECT_FAILED, f"the {side} gave up")
            with pytest.raises(ChannelReset) as passed_on:
                await asyncio.wait_for(other.read(), PROMPT)
            assert passed_on.value.code is ErrorCode.CONNECT_FAILED
            assert passed_on.value.reason == f"the {side} gave up"
            await asyncio.wait_for(r.splice, PROMPT)
            assert r.relay_to_dialer.streams == {} and r.relay_to_binder.streams == {}

    run(scenario)


def test_when_the_binders_tunnel_goes_the_dialers_stream_is_reset_and_the_splice_ends() -> None:
    async def scenario() -> None:
        async with relayed() as r:
            reading = asyncio.ensure_future(r.dial.read())
            await r.binder.close(ErrorCode.NO_ERROR, "gateway stopping")
            with pytest.raises(ChannelReset):
                await asyncio.wait_for(reading, PROMPT)
            await asyncio.wait_for(r.splice, PROMPT)
            assert not r.dialer.conn.closed  # only the stream, not the dialer's tunnel

    run(scenario)


def test_a_binder_that_never_reads_holds_the_relay_to_its_windows() -> None:
    async def scenario() -> None:
        async with relayed(SMALL) as r:
            writer = asyncio.ensure_future(r.dial.write(b"f" * (1024 * 1024)))  # 256 windows' worth
            for _ in range(5):
                await settle()
                # The relay holds at most one window from the dialer, the binder at most one from the relay.
                assert r.relay_to_dialer.conn.unread_bytes <= SMALL_WINDOW
                assert r.binder.conn.unread_bytes <= SMALL_WINDOW
            assert not writer.done() and not r.splice.done()
            # And it all arrives once the binder reads.
            assert await read_exactly(r.served, 1024 * 1024) == b"f" * (1024 * 1024)
            await asyncio.wait_for(writer, PROMPT)

    run(scenario)


# -- the agent's splice: a stream into a local TCP connection --------------------

@dataclass
class Hosted:
    """A dial from the relay's end carried by the agent's splice into a local service's connection."""

    relay: End
    agent: End
    dial: StreamChannel  # the relay's end of the stream
    service_reader: asyncio.StreamReader  # the local service's side of the TCP connection
    service_writer: asyncio.StreamWriter
    splice: asyncio.Future[None]


@contextlib.asynccontextmanager
async def hosted(limits: ProtocolLimits = ProtocolLimits(), socket_buffer: int | None = None) -> AsyncIterator[Hosted]:
    accepted: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if socket_buffer is not None:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, socket_buffer)  # inherited at accept
    listener.bind(("127.0.0.1", 0))
    server = await asyncio.start_server(lambda r, w: accepted.put_nowait((r, w)), sock=listener)
    try:
        async with tunnel(relay_limits=limits, agent_limits=limits) as (relay, agent):
            dial = relay.open_stream("svc")
            channel = await agent.next_stream()
            reader, writer = await asyncio.open_connection(*listener.getsockname()[:2])
            if socket_buffer is not None:
                writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, socket_buffer)
                writer.transport.set_write_buffer_limits(high=socket_buffer)
            service_reader, service_writer = await accepted.get()
            splice = asyncio.ensure_future(splice_socket(channel, reader, writer))
            try:
                yield Hosted(relay, agent, dial, service_reader, service_writer, splice)
            finally:
                splice.cancel()
                service_writer.close()
    finally:
        server.close()


async def read_until_reset(reader: asyncio.StreamReader, limit: int) -> int:
    """Read what the connection still delivers; its size once the connection is reset (ConnectionResetError)."""
    received = 0
    while received <= limit:
        data = await reader.read(65536)
        if not data:
            raise AssertionError("the connection ended with a FIN, not a reset")
        received += len(data)
    raise AssertionError(f"more than {limit} bytes and no reset")


def test_a_hosted_stream_carries_both_ways_with_half_closes_and_the_splice_ends_after_both() -> None:
    async def scenario() -> None:
        async with hosted() as h:
            # The service answers first and half-closes; the dialer still sends after that.
            h.service_writer.write(b"banner")
            h.service_writer.write_eof()
            assert await read_to_end(h.dial) == b"banner"
            assert not h.splice.done()
            await h.dial.write(b"request after the banner ended")
            await h.dial.end()
            assert await h.service_reader.read() == b"request after the banner ended"  # then EOF
            assert h.service_reader.at_eof()
            await asyncio.wait_for(h.splice, PROMPT)
            assert h.agent.streams == {}

    run(scenario)


def test_the_end_of_a_hosted_stream_reaches_the_service_as_eof_while_it_still_answers() -> None:
    async def scenario() -> None:
        async with hosted() as h:
            await h.dial.write(b"the whole request")
            await h.dial.end()
            # EOF arrives while the connection stays open for the answer.
            assert await asyncio.wait_for(h.service_reader.read(), PROMPT) == b"the whole request"
            assert not h.splice.done()
            h.service_writer.write(b"answer after the request ended")
            h.service_writer.write_eof()
            assert await read_to_end(h.dial) == b"answer after the request ended"
            await asyncio.wait_for(h.splice, PROMPT)

    run(scenario)


def test_a_reset_from_the_far_end_resets_the_local_connection_and_ends_the_splice() -> None:
    async def scenario() -> None:
        async with hosted() as h:
            await h.dial.write(b"x")
            assert await h.service_reader.readexactly(1) == b"x"
            h.dial.reset(ErrorCode.CANCEL, "the operator hung up")
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(read_until_reset(h.service_reader, 0), PROMPT)
            await asyncio.wait_for(h.splice, PROMPT)
            assert h.agent.streams == {}

    run(scenario)


def test_a_reset_ends_the_splice_even_while_the_local_service_has_stopped_reading() -> None:
    size = 4 * 1024 * 1024

    async def scenario() -> None:
        async with hosted(socket_buffer=TINY_SOCKET_BUFFER) as h:
            writer = asyncio.ensure_future(h.dial.write(b"s" * size))
            await settle()
            assert not writer.done()  # the service reads nothing: everything backs up to the dialer
            h.dial.reset(ErrorCode.CANCEL, "the operator hung up")
            await asyncio.wait_for(h.splice, PROMPT)
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(read_until_reset(h.service_reader, size), PROMPT)
            with pytest.raises(ChannelReset):
                await writer

    run(scenario)


def test_a_local_connection_that_fails_resets_the_stream_with_connect_failed() -> None:
    async def scenario() -> None:
        async with hosted() as h:
            reading = asyncio.ensure_future(h.dial.read())
            sock = h.service_writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            h.service_writer.transport.abort()  # an RST to the agent
            with pytest.raises(ChannelReset) as failed:
                await asyncio.wait_for(reading, PROMPT)
            assert failed.value.code is ErrorCode.CONNECT_FAILED
            assert failed.value.reason == "the local connection failed"
            await asyncio.wait_for(h.splice, PROMPT)
            assert not h.relay.conn.closed and not h.agent.conn.closed  # only the stream

    run(scenario)


def test_when_the_tunnel_goes_the_local_connection_is_reset_and_the_splice_ends() -> None:
    async def scenario() -> None:
        async with hosted() as h:
            await h.relay.close(ErrorCode.NO_ERROR, "relay shutting down")
            await asyncio.wait_for(h.splice, PROMPT)
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(read_until_reset(h.service_reader, 0), PROMPT)

    run(scenario)
