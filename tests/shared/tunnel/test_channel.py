"""StreamChannel, one stream as an awaitable reader and writer: what each end of a tunnel can rely on.

Two real sessions over a WebSocket on 127.0.0.1 (tunnel_loopback.py); the
agent end opens the streams, the relay end accepts them.
"""

from __future__ import annotations

import asyncio

import pytest
from tunnel_loopback import SMALL_WINDOW, read_exactly, read_to_end, run, settle, tunnel, until

from shared.protocol import ErrorCode, ProtocolLimits
from shared.tunnel.channel import ChannelReset

#: The relay end advertises a small window, so that a few KiB exhaust the agent's credit.
SMALL = ProtocolLimits(initial_window=SMALL_WINDOW)


def test_bytes_arrive_in_order_and_end_reads_as_empty() -> None:
    payload = bytes(range(256)) * 1024  # 256 KiB: many frames and several windows

    async def scenario() -> None:
        async with tunnel() as (relay, agent):
            outgoing = agent.open_stream("echo")
            await outgoing.wait_accepted()
            incoming = await relay.next_stream()
            assert incoming.service == "echo"

            async def send() -> None:
                await outgoing.write(payload[:1000])
                await outgoing.write_chunks([payload[1000:5000], payload[5000:]])
                await outgoing.end()

            sender = asyncio.ensure_future(send())
            assert await read_to_end(incoming) == payload
            await sender
            assert await incoming.read() == b"" and await incoming.read_chunks() == []  # the end stays an end

    run(scenario)


def test_half_close_leaves_the_other_direction_open() -> None:
    async def scenario() -> None:
        async with tunnel() as (relay, agent):
            outgoing = agent.open_stream("svc")
            incoming = await relay.next_stream()
            await outgoing.write(b"request")
            await outgoing.end()
            assert await read_to_end(incoming) == b"request"
            await incoming.write(b"answer after the request ended")
            await incoming.end()
            assert await read_to_end(outgoing) == b"answer after the request ended"

    run(scenario)


def test_a_refused_stream_raises_on_wait_accepted_with_the_refusal() -> None:
    async def scenario() -> None:
        async with tunnel(relay_accepts=False) as (_relay, agent):
            channel = agent.open_stream("nothing-here")
            with pytest.raises(ChannelReset) as refused:
                await channel.wait_accepted()
            assert refused.value.code is ErrorCode.SERVICE_UNKNOWN
            assert "hosts no services" in refused.value.reason
            with pytest.raises(ChannelReset):
                await channel.write(b"x")
            assert channel.stream_id not in agent.streams

    run(scenario)


def test_a_writer_stops_at_the_window_and_goes_on_when_the_reader_reads() -> None:
    payload = b"w" * (3 * SMALL_WINDOW)

    async def scenario() -> None:
        async with tunnel(relay_limits=SMALL) as (relay, agent):
            outgoing = agent.open_stream("svc")
            incoming = await relay.next_stream()
            writer = asyncio.ensure_future(outgoing.write(payload))
            await until(lambda: relay.conn.unread_bytes >= SMALL_WINDOW, "a window at the relay")
            await settle()  # for more than a window to cross, had the writer not stopped
            # Nobody read: exactly one window crossed, the rest waits for credit at the writer.
            assert not writer.done()
            assert agent.conn.send_window(outgoing.stream_id) == 0
            assert relay.conn.unread_bytes == SMALL_WINDOW
            assert await read_exactly(incoming, len(payload)) == payload
            await asyncio.wait_for(writer, 5)

    run(scenario)


def test_credit_for_a_chunk_returns_when_the_reader_comes_back_for_more() -> None:
    async def scenario() -> None:
        async with tunnel(relay_limits=SMALL) as (relay, agent):
            outgoing = agent.open_stream("svc")
            incoming = await relay.next_stream()
            await outgoing.write(b"a" * SMALL_WINDOW)
            first = await incoming.read()
            await settle()
            # Read, but perhaps not yet written onward: the sender gets no credit for it yet.
            assert agent.conn.send_window(outgoing.stream_id) == 0
            reading = asyncio.ensure_future(incoming.read())  # back for more: the credit for `first` goes now
            await until(lambda: agent.conn.send_window(outgoing.stream_id) > 0, "credit at the agent")
            await settle()  # for more credit to come, had more been given
            assert agent.conn.send_window(outgoing.stream_id) == len(first)
            reading.cancel()

    run(scenario)


def test_a_reader_that_never_reads_holds_one_window_whatever_the_writer_sends() -> None:
    async def scenario() -> None:
        async with tunnel(relay_limits=SMALL) as (relay, agent):
            outgoing = agent.open_stream("svc")
            await relay.next_stream()
            writer = asyncio.ensure_future(outgoing.write(b"f" * (1024 * 1024)))  # 256 windows' worth
            for _ in range(5):
                await settle()
                assert relay.conn.unread_bytes <= SMALL_WINDOW
                assert len(agent.conn.data_to_send()) == 0  # nothing queued behind the window either
            assert not writer.done()
            writer.cancel()

    run(scenario)


def test_a_reset_reaches_the_reader_and_the_writer_of_the_other_end_with_its_code_and_reason() -> None:
    async def scenario() -> None:
        async with tunnel(relay_limits=SMALL) as (relay, agent):
            outgoing = agent.open_stream("svc")
            incoming = await relay.next_stream()
            await incoming.write(b"unread by the agent")
            blocked = asyncio.ensure_future(outgoing.write(b"b" * (2 * SMALL_WINDOW)))  # waits for credit
            await settle()
            assert not blocked.done()

            incoming.reset(ErrorCode.CONNECT_FAILED, "the local service went away")
            with pytest.raises(ChannelReset) as at_writer:
                await asyncio.wait_for(blocked, 5)
            assert at_writer.value.code is ErrorCode.CONNECT_FAILED
            assert at_writer.value.reason == "the local service went away"
            # What was not read is dropped: the reader learns of the reset, not of stale data.
            with pytest.raises(ChannelReset):
                await outgoing.read()
            await asyncio.wait_for(outgoing.wait_reset(), 5)
            assert outgoing.stream_id not in agent.streams and incoming.stream_id not in relay.streams
            # The end that reset sees the same: it can neither read nor write.
            with pytest.raises(ChannelReset):
                await incoming.read()
            with pytest.raises(ChannelReset):
                await incoming.write(b"late")

    run(scenario)


def test_a_reset_frees_the_unread_bytes_of_the_tunnel() -> None:
    async def scenario() -> None:
        async with tunnel(relay_limits=SMALL) as (relay, agent):
            outgoing = agent.open_stream("svc")
            incoming = await relay.next_stream()
            await outgoing.write(b"u" * SMALL_WINDOW)
            await until(lambda: relay.conn.unread_bytes >= SMALL_WINDOW, "the window at the relay")
            assert relay.conn.unread_bytes == SMALL_WINDOW
            incoming.reset(ErrorCode.CANCEL, "not interested")
            await until(lambda: relay.conn.unread_bytes == 0, "the reset's bytes freed")

    run(scenario)


def test_ending_after_a_reset_is_harmless() -> None:
    async def scenario() -> None:
        async with tunnel() as (relay, agent):
            outgoing = agent.open_stream("svc")
            incoming = await relay.next_stream()
            outgoing.reset(ErrorCode.CANCEL, "changed my mind")
            await outgoing.end()  # nothing to end: no error, nothing sent
            outgoing.reset()  # a second reset is a no-op
            with pytest.raises(ChannelReset) as at_peer:
                await incoming.read()
            assert at_peer.value.reason == "changed my mind"
            assert not agent.conn.closed and not relay.conn.closed

    run(scenario)


def test_when_the_tunnel_closes_every_stream_fails_at_once() -> None:
    async def scenario() -> None:
        async with tunnel(relay_limits=SMALL) as (relay, agent):
            reading = agent.open_stream("a")
            writing = agent.open_stream("b")
            await relay.next_stream()
            await relay.next_stream()
            reader = asyncio.ensure_future(reading.read())
            writer = asyncio.ensure_future(writing.write(b"c" * (2 * SMALL_WINDOW)))
            await settle()
            assert not reader.done() and not writer.done()

            await relay.close(ErrorCode.NO_ERROR, "relay shutting down")
            for task in (reader, writer):
                with pytest.raises(ChannelReset) as closed:
                    await asyncio.wait_for(task, 5)
                assert closed.value.code is ErrorCode.CANCEL
            await asyncio.wait_for(agent.closed.wait(), 5)
            assert agent.streams == {}
            with pytest.raises(ChannelReset):
                await reading.write(b"after the tunnel")

    run(scenario)


def test_a_reset_by_this_end_wakes_its_own_waiting_reader_writer_and_opener() -> None:
    async def scenario() -> None:
        async with tunnel(relay_limits=SMALL) as (relay, agent):
            outgoing = agent.open_stream("svc")
            await relay.next_stream()
            reader = asyncio.ensure_future(outgoing.read())
            writer = asyncio.ensure_future(outgoing.write(b"w" * (2 * SMALL_WINDOW)))  # waits for credit
            unanswered = agent.open_stream("svc")  # the relay end accepts it, but not before the reset
            opener = asyncio.ensure_future(unanswered.wait_accepted())
            await asyncio.sleep(0)
            assert not opener.done()
            unanswered.reset(ErrorCode.CANCEL, "gave up waiting")
            await settle()
            assert not reader.done() and not writer.done()

            outgoing.reset(ErrorCode.CANCEL, "the local side went away")
            for task in (reader, writer):
                with pytest.raises(ChannelReset) as woken:
                    await asyncio.wait_for(task, 5)
                assert woken.value.reason == "the local side went away"
            with pytest.raises(ChannelReset) as refused:
                await asyncio.wait_for(opener, 5)
            assert refused.value.reason == "gave up waiting"

    run(scenario)
