"""One stream seen from asyncio: an awaitable read/write interface with flow control.

A ``StreamChannel`` drives its own stream of the core's ``Connection`` and
asks the tunnel that carries it (a ``StreamHost``: ``TunnelSession`` in
shared.tunnel.session) for no more than to send what it queued and to forget
it once it ends. The tunnel feeds it the core's events.
"""

from __future__ import annotations

import asyncio
import collections
import collections.abc
from typing import Protocol

from shared.protocol import Connection, ErrorCode, LocalProtocolError


class StreamHost(Protocol):
    """What a channel needs of the tunnel that carries it."""

    async def flush(self) -> None:
        """Send what the core has queued; return once it is handed to the transport."""

    def schedule_flush(self) -> None:
        """Send what the core has queued soon, from a context that cannot wait."""

    def forget(self, stream_id: int) -> None:
        """The stream is over for this end: deliver no more of its events."""

    async def flush_for_peer(self) -> None:
        """Send what the core has queued, from another tunnel's task: at once while this tunnel's
        writing is free, else soon from its own (a slow tunnel must not hold up the one forwarding to it)."""

    def can_flush_nowait(self) -> bool:
        """True when ``flush_nowait`` would send at once."""

    def flush_nowait(self) -> None:
        """Send what the core has queued now, from a callback that cannot await."""

    def backlog(self) -> int:
        """Bytes queued for the peer that the network has not taken yet (queued, or in the transport's buffer)."""


#: Where a spliced stream's received bytes go on at once, from the task that received them:
#: False when it cannot take them now (the reader's pump carries them later, in order), True
#: when it took them, or the tunnel that queued them and must flush.
Sink = collections.abc.Callable[[bytes | memoryview], bool | StreamHost]


#: A spliced stream's bytes go on at once (``as_sink``) only while the tunnel they go onto holds less than
#: this unsent: more than a fast link's TCP buffers hold in flight (a few MiB on loopback), so bulk
#: transfers keep the shortcut, while a peer that stopped reading pins at most this per tunnel.
MAX_SINK_BACKLOG = 4 * 1024 * 1024


class ChannelReset(Exception):
    """The stream was reset (by either side) or the tunnel went away: what a channel's reader, writer or opener gets.

    Not the core's ``StreamClosedError``, a caller's misuse of a stream id
    that is no longer open; this is the stream's end as the application sees it.
    """

    def __init__(self, code: ErrorCode, reason: str) -> None:
        super().__init__(reason or code.name)
        self.code = code
        self.reason = reason


class StreamChannel:
    """One stream, seen from asyncio: read, write, end, reset."""

    def __init__(self, host: StreamHost, conn: Connection, stream_id: int, service: str, peer: str | None) -> None:
        self._host = host
        self._conn = conn
        self.stream_id = stream_id
        self.service = service
        self.peer = peer
        self._chunks: collections.deque[bytes] = collections.deque()
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._accepted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._owed = 0  # bytes handed to the reader, not yet acknowledged
        self._closed = asyncio.Event()  # reset by either side, or the tunnel went away
        self.eof = False
        self.error: ChannelReset | None = None
        #: Bytes the far end sent on this stream (the relay's connection records).
        self.received = 0
        #: The loop's time at which the far end ended or reset the stream (or its tunnel went away), if it did.
        self.peer_finished_at: float | None = None
        self._sink: Sink | None = None
        #: writes in progress (waiting for credit or a flush): bytes passed on must queue behind them
        self._writers = 0
        #: the reader waits for data with nothing of its own in hand: bytes may bypass it
        self._reader_idle = False

    def set_sink(self, sink: Sink | None) -> None:
        """Let received bytes go on through ``sink`` while the reader is idle (a splice's shortcut)."""
        self._sink = sink

    # -- called by the tunnel on events --------------------------------
    def _on_data(self, data: bytes | memoryview) -> StreamHost | None:
        """Hand ``data`` on: to the sink at once where it can take it, else to the reader.

        Returns the tunnel the sink queued the data on, which the caller flushes.
        The shortcut is taken only while the reader waits idle, so that bytes
        never overtake those the reader still carries; their credit returns at
        once, as it would when the reader came back for more.
        """
        self.received += len(data)
        sink = self._sink
        if sink is not None and self._reader_idle and not self._chunks and self.error is None:
            taken = sink(data)
            if taken is not False:
                self._owed += len(data)
                self._acknowledge()
                return None if taken is True else taken
        # Kept for the reader: a view would hold the whole received chunk for as long (DataReceived).
        self._chunks.append(data if type(data) is bytes else bytes(data))
        self._readable.set()
        return None

    def _on_end(self) -> None:
        self._peer_finished()
        self.eof = True
        self._readable.set()

    def _on_reset(self, code: ErrorCode, reason: str) -> None:
        self._peer_finished()
        self._fail(ChannelReset(code, reason))

    def _peer_finished(self) -> None:
        if self.peer_finished_at is None:
            self.peer_finished_at = self._accepted.get_loop().time()

    def _fail(self, error: ChannelReset) -> None:
        """The stream is over, whichever end said so: wake everyone waiting on it with ``error``."""
        self.error = error
        self._chunks.clear()  # nobody will read them: free the memory now
        self._closed.set()
        self._readable.set()
        self._writable.set()
        if not self._accepted.done():
            self._accepted.set_exception(error)
            self._accepted.exception()  # retrieved: nobody may be waiting

    def _on_accepted(self) -> None:
        if not self._accepted.done():
            self._accepted.set_result(None)

    def _on_window(self) -> None:
        self._writable.set()

    # -- the application's side ----------------------------------------
    async def wait_accepted(self) -> None:
        """Return once the far end accepted the stream; raise ChannelReset if refused."""
        await self._accepted

    async def wait_reset(self) -> None:
        """Return once the stream is reset by either side or its tunnel went away."""
        await self._closed.wait()

    async def read(self) -> bytes:
        """The next chunk of data; b"" at end of stream. Raises ChannelReset on reset.

        Flow-control credit for the previous chunk is returned here, when the
        caller comes back for more: by then it has written that chunk onward.
        """
        await self._wait_readable()
        if not self._chunks:
            return b""
        data = self._chunks.popleft()
        self._owed += len(data)
        return data

    async def read_chunks(self) -> list[bytes]:
        """Every chunk received so far (at least one); [] at end of stream. Raises ChannelReset on reset.

        Taking the whole backlog at once lets the caller pass it on in one
        write; credit for it is returned on the next call, as with ``read``.
        """
        await self._wait_readable()
        chunks = list(self._chunks)
        self._chunks.clear()
        for chunk in chunks:
            self._owed += len(chunk)
        return chunks

    async def _wait_readable(self) -> None:
        self._acknowledge()
        while not self._chunks:
            if self.error is not None:
                raise self.error
            if self.eof:
                return
            self._readable.clear()
            self._reader_idle = True
            try:
                await self._readable.wait()
            finally:
                self._reader_idle = False

    def _acknowledge(self) -> None:
        if self._owed and self.error is None:
            conn = self._conn
            conn.acknowledge_received(self.stream_id, self._owed)
            if conn.wants_to_send:  # a WINDOW, once half a window is owed: not a flush per read
                self._host.schedule_flush()
        self._owed = 0

    async def write(self, data: bytes) -> None:
        """Send ``data``, waiting for window credit as needed."""
        await self.write_chunks((data,))

    async def write_chunks(self, chunks: collections.abc.Iterable[bytes]) -> None:
        """Send ``chunks`` in order, waiting for window credit as needed.

        Everything the window allows goes into one flush, so a backlog leaves
        as one WebSocket message instead of one per chunk (each message costs
        a TLS record and a system call per hop).
        """
        conn = self._conn
        stream_id = self.stream_id
        self._writers += 1
        try:
            await self._write_all(conn, stream_id, chunks)
        finally:
            self._writers -= 1

    async def _write_all(self, conn: Connection, stream_id: int, chunks: collections.abc.Iterable[bytes]) -> None:
        queued = False
        for data in chunks:
            size = len(data)
            sent = 0
            while sent < size:
                if self.error is not None:
                    raise self.error
                if conn.closed:
                    raise ChannelReset(ErrorCode.CANCEL, "the tunnel closed")
                window = conn.send_window(stream_id)
                if window <= 0:
                    if queued:
                        queued = False
                        await self._host.flush()
                    self._writable.clear()
                    await self._writable.wait()
                    continue
                if sent == 0 and size <= window:
                    conn.send_data(stream_id, data)  # whole: no copy
                    sent = size
                else:
                    piece = memoryview(data)[sent:sent + window]
                    conn.send_data(stream_id, piece)
                    sent += len(piece)
                queued = True
        if queued:
            await self._host.flush()

    def pass_on(self, data: bytes | memoryview) -> bool:
        """Queue ``data`` on this stream now if its window takes all of it and no write of its own is waiting.

        The caller flushes this stream's tunnel afterwards; False leaves ``data`` with the caller.
        """
        conn = self._conn
        if self.error is not None or self._writers or conn.closed or conn.send_window(self.stream_id) < len(data):
            return False
        try:
            conn.send_data(self.stream_id, data)
        except LocalProtocolError:
            return False  # ended or closed in between: the reader's pump meets it and says so
        return True

    def send_nowait(self, data: bytes) -> bool:
        """Send ``data`` now from a callback that cannot await (a local connection's reader), when that
        can be done in order and whole: no write of this stream's waits, the window takes it, and the
        tunnel writes at once. False leaves ``data`` with the caller (its pump sends it)."""
        host = self._host
        if not host.can_flush_nowait() or not self.pass_on(data):
            return False
        host.flush_nowait()
        return True

    def as_sink(self) -> Sink:
        """This stream as another stream's sink: bytes it takes are queued here and this tunnel flushes them."""
        host = self._host

        def sink(data: bytes | memoryview) -> bool | StreamHost:
            # Not onto a tunnel whose peer is not reading: the window this stream was granted is the far
            # end's to choose (a relay link may grant a GiB), so bytes queued here would be held unsent
            # and credited back at once to the sender, without bound. Left with the reader, they wait
            # under the sender's own window (and its tunnel's receive budget) until this tunnel drains.
            if host.backlog() >= MAX_SINK_BACKLOG:
                return False
            return host if self.pass_on(data) else False

        return sink

    async def end(self) -> None:
        """Half-close: no more data from this side."""
        if self.error is None and not self._conn.closed:
            try:
                self._conn.end_stream(self.stream_id)
            except LocalProtocolError:
                return
            await self._host.flush()

    def reset(self, code: ErrorCode = ErrorCode.CANCEL, reason: str = "") -> None:
        """Abort the stream in both directions."""
        if self.error is None:
            # A reader, writer or opener of this end waiting on the stream must not wait for a peer that forgot it.
            self._fail(ChannelReset(code, reason))
            if not self._conn.closed:
                try:
                    self._conn.reset_stream(self.stream_id, code, reason)
                except LocalProtocolError:
                    pass
                self._host.schedule_flush()
        self._host.forget(self.stream_id)

    def detach(self) -> None:
        """Whoever carried the stream is done with it: the tunnel forgets it (a splice's last step)."""
        self._host.forget(self.stream_id)
