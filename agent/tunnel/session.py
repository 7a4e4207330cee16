"""The asyncio glue around one protocol ``Connection`` on one WebSocket.

Both ends use it: the agent (``agent.tunnel.client``) and the relay
(``controller.relay``). It moves bytes between the WebSocket and the sans-IO
core, runs the core's timer, and turns streams into ``StreamChannel`` objects
with an awaitable read/write interface and flow control. Role-specific
behaviour (authentication, bind, dial) lives in subclasses' ``on_*`` hooks.
"""

from __future__ import annotations

import asyncio
import collections
import collections.abc
import logging
from typing import Any

from aiohttp import WSMsgType

from agent.tunnel.protocol import (
    AuthReceived,
    Authenticated,
    BindCompleted,
    BindRequested,
    ChallengeReceived,
    Connection,
    ConnectionTerminated,
    DataReceived,
    ErrorCode,
    LocalProtocolError,
    PongReceived,
    RemoteProtocolError,
    StreamAccepted,
    StreamEnded,
    StreamOpened,
    StreamReset,
    WindowUpdated,
)

log = logging.getLogger(__name__)

# WebSocket messages are cut at this size: the receiver's aiohttp message limit
# must be above it, and smaller messages interleave streams more fairly. Frames
# may straddle messages (the core parses a byte stream).
WS_MESSAGE_MAX = 512 * 1024
# The receiver's limit: one full message plus slack for a frame header.
WS_RECEIVE_MAX = WS_MESSAGE_MAX + 4096
# How long closing the WebSocket may take before the transport is dropped.
CLOSE_TIMEOUT = 2.0
# Read size from local TCP sockets feeding a stream: what asyncio's socket
# transport receives at once, so a busy connection's backlog leaves in one
# WebSocket message (the core cuts it into DATA frames).
SOCKET_READ_SIZE = 64 * 1024


class StreamClosed(Exception):
    """The stream was reset (by either side) or the tunnel went away."""

    def __init__(self, code: ErrorCode, reason: str) -> None:
        super().__init__(reason or code.name)
        self.code = code
        self.reason = reason


class StreamChannel:
    """One stream, seen from asyncio: read, write, end, reset."""

    def __init__(self, session: "TunnelSession", stream_id: int, service: str, peer: str | None) -> None:
        self.session = session
        self.stream_id = stream_id
        self.service = service
        self.peer = peer
        self._chunks: collections.deque[bytes] = collections.deque()
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._accepted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._owed = 0  # bytes handed to the reader, not yet acknowledged
        self.eof = False
        self.error: StreamClosed | None = None

    # -- called by the session on events --------------------------------
    def _on_data(self, data: bytes) -> None:
        self._chunks.append(data)
        self._readable.set()

    def _on_end(self) -> None:
        self.eof = True
        self._readable.set()

    def _on_reset(self, code: ErrorCode, reason: str) -> None:
        self.error = StreamClosed(code, reason)
        self._readable.set()
        self._writable.set()
        if not self._accepted.done():
            self._accepted.set_exception(self.error)
            self._accepted.exception()  # retrieved: nobody may be waiting

    def _on_accepted(self) -> None:
        if not self._accepted.done():
            self._accepted.set_result(None)

    def _on_window(self) -> None:
        self._writable.set()

    # -- the application's side ----------------------------------------
    async def wait_accepted(self) -> None:
        """Return once the far end accepted the stream; raise StreamClosed if refused."""
        await self._accepted

    async def read(self) -> bytes:
        """The next chunk of data; b"" at end of stream. Raises StreamClosed on reset.

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
        """Every chunk received so far (at least one); [] at end of stream. Raises StreamClosed on reset.

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
            await self._readable.wait()

    def _acknowledge(self) -> None:
        if self._owed and self.error is None:
            self.session.conn.acknowledge_received(self.stream_id, self._owed)
            self.session.schedule_flush()
        self._owed = 0

    async def write(self, data: bytes) -> None:
        """Send ``data``, waiting for window credit as needed."""
        await self.write_chunks((data,))

    async def write_chunks(self, chunks: "collections.abc.Iterable[bytes]") -> None:
        """Send ``chunks`` in order, waiting for window credit as needed.

        Everything the window allows goes into one flush, so a backlog leaves
        as one WebSocket message instead of one per chunk (each message costs
        a TLS record and a system call per hop).
        """
        conn = self.session.conn
        stream_id = self.stream_id
        queued = False
        for data in chunks:
            size = len(data)
            sent = 0
            while sent < size:
                if self.error is not None:
                    raise self.error
                if conn.closed:
                    raise StreamClosed(ErrorCode.CANCEL, "the tunnel closed")
                window = conn.send_window(stream_id)
                if window <= 0:
                    if queued:
                        queued = False
                        await self.session.flush()
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
            await self.session.flush()

    async def end(self) -> None:
        """Half-close: no more data from this side."""
        if self.error is None and not self.session.conn.closed:
            try:
                self.session.conn.end_stream(self.stream_id)
            except LocalProtocolError:
                return
            await self.session.flush()

    def reset(self, code: ErrorCode = ErrorCode.CANCEL, reason: str = "") -> None:
        """Abort the stream in both directions."""
        if self.error is None:
            self.error = StreamClosed(code, reason)
            if not self.session.conn.closed:
                try:
                    self.session.conn.reset_stream(self.stream_id, code, reason)
                except LocalProtocolError:
                    pass
                self.session.schedule_flush()
        self.session.streams.pop(self.stream_id, None)


class TunnelSession:
    """Runs one Connection over one aiohttp WebSocket (client or server side)."""

    def __init__(self, conn: Connection, ws: Any) -> None:
        self.conn = conn
        self.ws = ws
        self.loop = asyncio.get_running_loop()
        self.streams: dict[int, StreamChannel] = {}
        self._send_lock = asyncio.Lock()
        self._timer_changed = asyncio.Event()
        self._flush_scheduled = False
        self._tasks: set[asyncio.Task] = set()
        self.closed = asyncio.Event()
        self.close_reason: tuple[ErrorCode, str, bool] | None = None
        self.ws_bytes_received = 0

    def now(self) -> float:
        return self.loop.time()

    # -- hooks for the two ends ------------------------------------------
    async def on_challenge(self, event: ChallengeReceived) -> None:
        raise RemoteProtocolError(ErrorCode.PROTOCOL_ERROR, "unexpected CHALLENGE")

    async def on_auth(self, event: AuthReceived) -> None:
        raise RemoteProtocolError(ErrorCode.PROTOCOL_ERROR, "unexpected AUTH")

    async def on_authenticated(self, event: Authenticated) -> None:
        """The relay accepted us (agent side)."""

    async def on_bind_requested(self, event: BindRequested) -> None:
        raise RemoteProtocolError(ErrorCode.PROTOCOL_ERROR, "unexpected BIND")

    async def on_bind_completed(self, event: BindCompleted) -> None:
        """The relay answered our BIND (agent side)."""

    async def on_stream_opened(self, channel: StreamChannel) -> None:
        """The peer opened a stream; the default refuses it."""
        channel.reset(ErrorCode.SERVICE_UNKNOWN, "this end hosts no services")

    def on_pong(self, rtt: float) -> None:
        """A keepalive round trip completed."""

    def on_closed(self, code: ErrorCode, reason: str, remote: bool) -> None:
        """The tunnel ended (once)."""

    # -- driving -----------------------------------------------------------
    def spawn(self, coro: Any) -> asyncio.Task:
        """Run a task that belongs to this tunnel and dies with it."""
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("tunnel task failed: %r", task.exception(), exc_info=task.exception())

    async def run(self) -> None:
        """Pump until the tunnel ends; always leaves it closed."""
        timer = self.spawn(self._run_timer())
        try:
            await self.flush()
            while not self.conn.closed:
                msg = await self.ws.receive()
                if msg.type == WSMsgType.BINARY:
                    self.ws_bytes_received += len(msg.data)
                    await self._receive(msg.data)
                elif msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
                    self._terminate(ErrorCode.CANCEL, "the connection closed", True)
                    break
                else:
                    self.conn.close(ErrorCode.PROTOCOL_ERROR, "text WebSocket messages are not part of the protocol")
                    self._terminate(ErrorCode.PROTOCOL_ERROR, "peer sent a text message", True)
                    break
        except RemoteProtocolError as exc:
            log.warning("tunnel closed: the peer broke the protocol (%s: %s)", exc.code.name, exc)
            self._terminate(exc.code, str(exc), True)
        except (ConnectionError, asyncio.TimeoutError) as exc:
            self._terminate(ErrorCode.CANCEL, f"connection lost: {exc}", True)
        finally:
            timer.cancel()
            await self._shutdown()

    async def _receive(self, data: bytes) -> None:
        events = self.conn.receive_data(data, self.now())
        await self._dispatch(events)
        self._timer_changed.set()
        await self.flush()

    async def _dispatch(self, events: list) -> None:
        for event in events:
            kind = type(event)
            if kind is DataReceived:
                channel = self.streams.get(event.stream_id)
                if channel is not None:
                    channel._on_data(event.data)
                else:
                    self.conn.acknowledge_received(event.stream_id, len(event.data))
            elif kind is WindowUpdated:
                channel = self.streams.get(event.stream_id)
                if channel is not None:
                    channel._on_window()
            elif kind is StreamEnded:
                channel = self.streams.get(event.stream_id)
                if channel is not None:
                    channel._on_end()
            elif kind is StreamAccepted:
                channel = self.streams.get(event.stream_id)
                if channel is not None:
                    channel._on_accepted()
            elif kind is StreamReset:
                channel = self.streams.pop(event.stream_id, None)
                if channel is not None:
                    channel._on_reset(event.code, event.reason)
            elif kind is StreamOpened:
                channel = StreamChannel(self, event.stream_id, event.service, event.peer)
                self.streams[event.stream_id] = channel
                self.spawn(self.on_stream_opened(channel))
            elif kind is PongReceived:
                self.on_pong(event.rtt)
            elif kind is ConnectionTerminated:
                self._terminate(event.code, event.reason, event.remote)
            elif kind is ChallengeReceived:
                await self.on_challenge(event)
            elif kind is AuthReceived:
                await self.on_auth(event)
            elif kind is Authenticated:
                await self.on_authenticated(event)
            elif kind is BindRequested:
                await self.on_bind_requested(event)
            elif kind is BindCompleted:
                await self.on_bind_completed(event)

    async def _run_timer(self) -> None:
        while not self.conn.closed:
            deadline = self.conn.get_timer()
            delay = None if deadline is None else max(0.0, deadline - self.now())
            self._timer_changed.clear()
            try:
                await asyncio.wait_for(self._timer_changed.wait(), delay)
                continue
            except asyncio.TimeoutError:
                pass
            events = self.conn.handle_timer(self.now())
            await self._dispatch(events)
            await self.flush()
            if self.conn.closed:
                await self._close_ws()

    def schedule_flush(self) -> None:
        """Flush soon, from a context that cannot await."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.spawn(self.flush())

    async def flush(self) -> None:
        """Send whatever the core has queued, in order."""
        async with self._send_lock:
            self._flush_scheduled = False
            data = self.conn.data_to_send()
            if not data:
                return
            try:
                if len(data) <= WS_MESSAGE_MAX:
                    await self.ws.send_bytes(data)
                else:
                    view = memoryview(data)
                    for start in range(0, len(data), WS_MESSAGE_MAX):
                        await self.ws.send_bytes(view[start:start + WS_MESSAGE_MAX])
            except (ConnectionError, RuntimeError) as exc:
                self._terminate(ErrorCode.CANCEL, f"connection lost: {exc}", True)
                return
        self._timer_changed.set()

    def open_stream(self, service: str, peer: str | None = None) -> StreamChannel:
        """Open a stream to ``service``; await ``wait_accepted()`` on the result."""
        stream_id = self.conn.open_stream(service, peer=peer)
        channel = StreamChannel(self, stream_id, service, peer)
        self.streams[stream_id] = channel
        self.schedule_flush()
        return channel

    async def close(self, code: ErrorCode = ErrorCode.NO_ERROR, reason: str = "") -> None:
        """Close the tunnel: GOAWAY, then the WebSocket."""
        if not self.conn.closed:
            self.conn.close(code, reason)
            await self.flush()
        self._terminate(code, reason, False)
        await self._close_ws()

    def _terminate(self, code: ErrorCode, reason: str, remote: bool) -> None:
        if self.close_reason is not None:
            return
        self.close_reason = (code, reason, remote)
        for channel in list(self.streams.values()):
            channel._on_reset(ErrorCode.CANCEL, "the tunnel closed")
        self.streams.clear()
        self.on_closed(code, reason, remote)
        self.closed.set()

    async def _close_ws(self) -> None:
        try:
            await asyncio.wait_for(self.ws.close(), CLOSE_TIMEOUT)
        except (asyncio.TimeoutError, ConnectionError, RuntimeError):
            pass

    async def _shutdown(self) -> None:
        if self.close_reason is None:
            self._terminate(ErrorCode.NO_ERROR, "closed", False)
        await self._close_ws()
        for task in list(self._tasks):
            task.cancel()


async def pump_socket_to_stream(reader: asyncio.StreamReader, channel: StreamChannel) -> None:
    """Copy a local socket's bytes into a stream until EOF, then half-close."""
    while True:
        data = await reader.read(SOCKET_READ_SIZE)
        if not data:
            await channel.end()
            return
        await channel.write(data)


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
    """Carry a stream over a local TCP connection in both directions, then close both."""
    try:
        outbound = asyncio.ensure_future(pump_socket_to_stream(reader, channel))
        inbound = asyncio.ensure_future(pump_stream_to_socket(channel, writer))
        done, pending = await asyncio.wait({outbound, inbound}, return_when=asyncio.FIRST_EXCEPTION)
        if any(t.exception() for t in done if not t.cancelled()):
            for t in pending:
                t.cancel()
            failed = next(t.exception() for t in done if not t.cancelled() and t.exception())
            if isinstance(failed, StreamClosed):
                log.info("stream %d (%s) closed: %s", channel.stream_id, channel.service, failed.reason or failed.code.name)
            else:
                channel.reset(ErrorCode.CONNECT_FAILED, "the local connection failed")
        elif pending:
            await asyncio.wait(pending)
    finally:
        writer.close()
        channel.session.streams.pop(channel.stream_id, None)
