"""Reading a local TCP connection into a buffer of this process's own, for a splice.

asyncio's ``StreamReader`` receives into a fresh 256 KiB ``bytes`` per read,
extends its own ``bytearray`` with it and slices that again for the caller:
three copies and a large allocation per read, most of a bulk upload's cost in
the agent that feeds the tunnel. ``LocalReader`` takes the transport over as a
``BufferedProtocol``: the kernel copies into one reused buffer (``recv_into``),
and each read leaves it as one ``bytes`` for the core's DATA frames.

Writing stays with the connection's ``StreamWriter``: the reader passes the
transport's flow-control calls on to the protocol it replaced, so
``drain()`` and ``wait_closed()`` keep working.
"""

from __future__ import annotations

import asyncio
import collections
import collections.abc
from typing import cast

# What one read takes from the kernel: the core's largest DATA frame, so a busy
# connection's backlog leaves in one WebSocket message, and small enough to stay in cache.
READ_BUFFER_SIZE = 64 * 1024
# Unread bytes held before the socket is no longer read (TCP then slows the
# local sender): a few reads, so the pump always finds a whole write waiting.
MAX_UNREAD = 4 * READ_BUFFER_SIZE


class LocalReader(asyncio.BufferedProtocol):
    """The reading half of a local connection whose transport it took over; one task reads it."""

    def __init__(self, transport: asyncio.Transport, previous: asyncio.StreamReaderProtocol) -> None:
        self._transport = transport
        self._previous = previous
        self._buffer = bytearray(READ_BUFFER_SIZE)
        self._view = memoryview(self._buffer)
        self._chunks: collections.deque[bytes] = collections.deque()
        self._unread = 0
        self._eof = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        #: where a read goes at once while the pump waits idle with nothing queued (``set_direct``)
        self._direct: collections.abc.Callable[[bytes], bool] | None = None

    def set_direct(self, direct: collections.abc.Callable[[bytes], bool] | None) -> None:
        """Offer each read to ``direct`` first while the pump waits idle with nothing queued: True when it
        took the bytes, which then never wake the pump (a task step per message saved); False queues them."""
        self._direct = direct

    @property
    def unread(self) -> int:
        """Bytes read from the socket and not yet taken by the pump."""
        return self._unread

    # -- the transport's side ---------------------------------------------------
    def get_buffer(self, sizehint: int) -> memoryview:
        return self._view

    def buffer_updated(self, nbytes: int) -> None:
        chunk = bytes(self._view[:nbytes])
        direct = self._direct
        # Only while the pump waits with nothing in hand, so these bytes cannot overtake earlier ones; and
        # only a read that emptied the socket (a message, not a bulk transfer's full buffer, where the pump
        # gathers several reads into one write).
        if (direct is not None and nbytes < READ_BUFFER_SIZE and self._waiter is not None and not self._chunks
                and direct(chunk)):
            return
        self._chunks.append(chunk)
        self._unread += nbytes
        if self._unread >= MAX_UNREAD:
            self._transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        return True  # half-closed: the stream's bytes may still go to the local peer

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        self._error = exc
        self._wake()
        self._previous.connection_lost(exc)  # wakes the writer's drain() and wait_closed()

    def pause_writing(self) -> None:
        self._previous.pause_writing()

    def resume_writing(self) -> None:
        self._previous.resume_writing()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- the pump's side ---------------------------------------------------------
    async def read_chunks(self) -> list[bytes]:
        """Everything read so far (at least one chunk); [] at end of stream. Raises what broke the connection."""
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._eof:
                return []
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        chunks = list(self._chunks)
        self._chunks.clear()
        if self._unread >= MAX_UNREAD and not self._transport.is_closing():
            self._transport.resume_reading()
        self._unread = 0
        return chunks


def take_over(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> LocalReader | None:
    """Read the connection behind ``reader`` with a ``LocalReader`` from now on; None where that cannot be done.

    What ``reader`` already holds (bytes a client sent while its stream was
    being opened, its end) moves over first, in order. The buffer is
    ``StreamReader``'s private one, the same from Python 3.8 to 3.13; where
    it is not there, the caller goes on reading ``reader``.
    """
    # A TCP connection's transport reads too; uvloop's does not derive from asyncio.Transport.
    transport = cast(asyncio.Transport, writer.transport)
    previous = transport.get_protocol()
    held = getattr(reader, "_buffer", None)
    if (not isinstance(held, bytearray) or not isinstance(previous, asyncio.StreamReaderProtocol)
            or transport.is_closing() or reader.exception() is not None):
        return None
    local = LocalReader(transport, previous)
    if held:
        local._chunks.append(bytes(held))
        held.clear()
    if reader.at_eof():
        local._eof = True
    transport.set_protocol(local)
    if not transport.is_reading() and not local._eof:
        transport.resume_reading()  # StreamReader paused it while it held too much; that is gone now
    return local
