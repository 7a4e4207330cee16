"""Carrying a stream onward: into a local TCP connection (agent), or into another stream (relay)."""

from __future__ import annotations

import asyncio
import logging
import socket
import struct

from shared.protocol import ErrorCode
from shared.tunnel.channel import ChannelReset, Sink, StreamChannel
from shared.tunnel.local_reader import LocalReader, take_over

log = logging.getLogger(__name__)

# Read size from local TCP sockets feeding a stream: what asyncio's socket
# transport receives at once, so a busy connection's backlog leaves in one
# WebSocket message (the core cuts it into DATA frames).
SOCKET_READ_SIZE = 64 * 1024


def reset_connection(transport: asyncio.WriteTransport) -> None:
    """End a TCP connection now with an RST, dropping what the kernel still holds for it.

    A plain close queues FIN behind unsent bytes; to a peer that stopped
    reading (or a dead path) those never leave, and the socket would linger.
    """
    try:
        sock = transport.get_extra_info("socket")
    except AttributeError:
        # CPython's TLS transport lets go of its SSL layer when closed twice
        # (asyncio/sslproto.py), and then neither answers this nor aborts: the
        # connection is closing already, and the TLS shutdown's own timeout
        # (30 s) ends it if the peer never answers.
        return
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    transport.abort()


def socket_sink(transport: asyncio.WriteTransport) -> Sink:
    """A local TCP connection as a stream's sink: bytes go straight to its transport while its buffer is low."""

    def sink(data: bytes | memoryview) -> bool:
        if transport.is_closing() or transport.get_write_buffer_size() >= transport.get_write_buffer_limits()[1]:
            return False  # the pump writes it and waits for the socket to drain
        transport.write(data)
        return True

    return sink


async def pump_socket_to_stream(reader: asyncio.StreamReader, channel: StreamChannel) -> None:
    """Copy a local socket's bytes into a stream until EOF, then half-close."""
    while True:
        data = await reader.read(SOCKET_READ_SIZE)
        if not data:
            await channel.end()
            return
        await channel.write(data)


async def pump_local_to_stream(local: LocalReader, channel: StreamChannel) -> None:
    """Copy what ``local`` reads into a stream until EOF, then half-close; a backlog leaves as one write."""
    while True:
        chunks = await local.read_chunks()
        if not chunks:
            await channel.end()
            return
        await channel.write_chunks(chunks)


async def pump_stream_to_socket(channel: StreamChannel, writer: asyncio.StreamWriter) -> None:
    """Copy a stream's bytes into a local socket until the stream ends."""
    while True:
        chunks = await channel.read_chunks()
        if not chunks:
            if writer.can_write_eof():
                writer.write_eof()
            return
        writer.writelines(chunks)  # one system call for the backlog
        await writer.drain()


async def splice_socket(channel: StreamChannel, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Carry a stream over a local TCP connection in both directions, then close both.

    A reset ends the local connection at once (RST), even while a pump waits
    on a local peer that stopped reading: what it had not taken is dropped.
    """
    channel.set_sink(socket_sink(writer.transport))
    local = take_over(reader, writer)
    if local is not None:
        local.set_direct(channel.send_nowait)
    reading = pump_socket_to_stream(reader, channel) if local is None else pump_local_to_stream(local, channel)
    pending = {asyncio.ensure_future(reading),
               asyncio.ensure_future(pump_stream_to_socket(channel, writer))}
    reset = asyncio.ensure_future(channel.wait_reset())
    failure: BaseException | None = None
    try:
        while pending and failure is None and not reset.done():
            done, _ = await asyncio.wait(pending | {reset}, return_when=asyncio.FIRST_COMPLETED)
            for task in done & pending:
                pending.discard(task)
                if not task.cancelled() and task.exception() is not None:
                    failure = task.exception()
        if failure is None and reset.done() and channel.error is not None:
            failure = channel.error
        if isinstance(failure, ChannelReset):
            log.info("stream %d (%s) closed: %s", channel.stream_id, channel.service, failure.reason or failure.code.name)
        elif failure is not None:
            channel.reset(ErrorCode.CONNECT_FAILED, "the local connection failed")
        if failure is not None:
            reset_connection(writer.transport)
    finally:
        channel.set_sink(None)
        if local is not None:
            local.set_direct(None)
        for task in pending | {reset}:
            task.cancel()
        writer.close()
        channel.detach()


async def _pump_streams(source: StreamChannel, sink: StreamChannel) -> None:
    while True:
        chunks = await source.read_chunks()
        if not chunks:
            await sink.end()
            return
        await sink.write_chunks(chunks)  # the backlog leaves as one message


async def splice_streams(a: StreamChannel, b: StreamChannel) -> None:
    """Carry two streams into each other until both end or one is reset (the relay's splice)."""
    a.set_sink(b.as_sink())
    b.set_sink(a.as_sink())
    forward = asyncio.ensure_future(_pump_streams(a, b))
    backward = asyncio.ensure_future(_pump_streams(b, a))
    try:
        done, pending = await asyncio.wait({forward, backward}, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            exc = task.exception()
            if isinstance(exc, ChannelReset):
                # Pass the reset on to the other side with its code and reason.
                for channel in (a, b):
                    channel.reset(exc.code, exc.reason)
        for task in pending:
            task.cancel()
    finally:
        a.set_sink(None)
        b.set_sink(None)
        a.detach()
        b.detach()
