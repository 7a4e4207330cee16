"""The asyncio glue around one protocol ``Connection`` on one transport (TLS directly, or a WebSocket).

Both ends use it: the agent (``agent.tunnel.client``) and the relay
(``controller.relay``). It moves bytes between the WebSocket and the sans-IO
core, runs the core's timer, and turns streams into ``StreamChannel`` objects
(shared.tunnel.channel). Role-specific behaviour (authentication, bind, dial)
lives in subclasses' ``on_*`` hooks (shared.tunnel.dispatch). What carries the bytes is a
``Transport`` (shared.tunnel.transport); an aiohttp WebSocket given instead is
wrapped in one, importing aiohttp only then.

The timer never waits for the network. On a path that black-holed, a write
waits for a socket buffer that never drains; the liveness check must still
run, and when it finds the path dead the connection is dropped at once (an
RST), which also ends the stuck write. Closing is bounded the same way.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from shared.protocol import Connection, ErrorCode, RemoteProtocolError
from shared.tunnel.channel import ChannelReset, StreamChannel
from shared.tunnel.dispatch import FRAMES_PER_TURN, EventDispatch
from shared.tunnel.splice import splice_socket, splice_streams
from shared.tunnel.transport import WS_MESSAGE_MAX, WS_RECEIVE_MAX, Transport, abort_transport

# The names other modules take from here (the relay may import this module and
# the protocol only): a session hands out channels, and they are spliced onward.
__all__ = ["CLOSE_TIMEOUT", "FRAMES_PER_TURN", "WS_MESSAGE_MAX", "WS_RECEIVE_MAX", "ChannelReset", "StreamChannel", "TunnelSession",
           "abort_transport", "splice_socket", "splice_streams"]

log = logging.getLogger(__name__)

# How long an orderly close (GOAWAY, then the WebSocket closing handshake) may
# take before the connection is dropped: a GEO round trip (600 ms) twice over
# with room to spare, short enough that stopping the agent on a dead path is
# prompt (systemd waits 90 s before it kills).
CLOSE_TIMEOUT = 2.0
#: A dropped tunnel's backlog: more than any bound on one, so nothing more is queued onto it.
DROPPED_BACKLOG = 2**62


class TunnelSession(EventDispatch):
    """Runs one Connection over one Transport (or an aiohttp WebSocket, client or server side)."""

    def __init__(self, conn: Connection, link: Transport | Any) -> None:
        self.conn = conn
        if isinstance(link, Transport):
            self.transport = link
            #: The aiohttp WebSocket when the tunnel runs over one (None on TLS directly).
            self.ws: Any = getattr(link, "ws", None)
        else:
            from shared.tunnel.ws_transport import WebSocketTransport  # aiohttp only for a WebSocket tunnel
            self.transport = WebSocketTransport(link)
            self.ws = link
        self.loop = asyncio.get_running_loop()
        if self.transport.writes_nowait:
            self.transport.set_receiver(self.receive_nowait)
        self.streams: dict[int, StreamChannel] = {}
        self._send_lock = asyncio.Lock()
        self._timer_changed = asyncio.Event()
        #: the deadline the timer task sleeps toward (None: none, it sleeps until woken)
        self._timer_armed_for: float | None = None
        self._timer_due = False
        self._flush_scheduled = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._aborted = False
        self.closed = asyncio.Event()
        self.close_reason: tuple[ErrorCode, str, bool] | None = None
        self.ws_bytes_received = 0
        #: loop time when the WebSocket write in progress began; None when none is
        self.write_pending_since: float | None = None

    def now(self) -> float:
        return self.loop.time()

    # -- driving -----------------------------------------------------------
    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        """Run a task that belongs to this tunnel and dies with it."""
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("tunnel task failed: %r", task.exception(), exc_info=task.exception())

    async def run(self) -> None:
        """Pump until the tunnel ends; always leaves it closed."""
        timer = self.spawn(self._run_timer())
        try:
            await self.flush()
            transport = self.transport
            while not self.conn.closed:
                try:
                    data = await transport.receive()
                except ValueError as exc:  # ws_transport.NotBinary: a text message
                    self.conn.close(ErrorCode.PROTOCOL_ERROR, str(exc))
                    self._terminate(ErrorCode.PROTOCOL_ERROR, "peer sent a text message", True)
                    break
                if data is None:
                    self._terminate(ErrorCode.CANCEL, "the connection closed", True)
                    break
                self.ws_bytes_received += len(data)
                await self._receive(data)
        except RemoteProtocolError as exc:
            self._peer_broke_protocol(exc)
        except (TimeoutError, ConnectionError) as exc:
            self._terminate(ErrorCode.CANCEL, f"connection lost: {exc}", True)
        finally:
            timer.cancel()
            await self._shutdown()

    def _peer_broke_protocol(self, exc: RemoteProtocolError) -> None:
        log.warning("tunnel closed: the peer broke the protocol (%s: %s)", exc.code.name, exc)
        self._terminate(exc.code, str(exc), True)

    async def _receive(self, data: bytes) -> None:
        conn = self.conn
        events = conn.receive_data(data, self.loop.time(), max_frames=FRAMES_PER_TURN)
        while True:
            onward = await self._dispatch(events)
            self._rearm_timer_if_earlier()
            if conn.wants_to_send:  # most messages queue nothing here: no flush, no lock
                if self.can_flush_nowait():
                    self.flush_nowait()
                else:
                    await self.flush()
            for host in onward:
                await host.flush_for_peer()
            if not conn.input_pending or conn.closed:
                return
            # A message packed with tiny frames: the other tunnels' turn before the next slice.
            await asyncio.sleep(0)
            events = conn.receive_data(b"", self.now(), max_frames=FRAMES_PER_TURN)

    async def flush_for_peer(self) -> None:
        """Flush from another tunnel's task: inline while this tunnel's writing is free and uncongested,
        else from a task of its own, so that a slow tunnel never holds up the one forwarding to it."""
        if self.can_flush_nowait():
            self.flush_nowait()  # no lock or drain to wait for: the common case
        elif self._send_lock.locked() or self._aborted or self._write_congested():
            self.schedule_flush()
        else:
            await self.flush()

    def can_flush_nowait(self) -> bool:
        """True when ``flush_nowait`` sends at once: nothing of this tunnel's is being written, the
        connection takes more, and its transport writes without awaiting (TLS, not a WebSocket)."""
        return (self.transport.writes_nowait and not self._send_lock.locked() and not self._aborted
                and not self._write_congested())

    def flush_nowait(self) -> None:
        """Send what the core queued now, from a callback that cannot await; only after ``can_flush_nowait``."""
        data = self.conn.data_to_send()
        if data:
            try:
                self.transport.write_nowait(data)
            except (ConnectionError, RuntimeError) as exc:
                self._terminate(ErrorCode.CANCEL, f"connection lost: {exc}", True)
                return
        self._rearm_timer_if_earlier()

    def _write_congested(self) -> bool:
        return self.transport.congested()

    def backlog(self) -> int:
        """Bytes queued for the peer that the network has not taken yet (queued, or in the transport's buffer)."""
        if self._aborted:
            return DROPPED_BACKLOG
        return self.conn.unsent_bytes + self.transport.unsent()

    def _rearm_timer_if_earlier(self) -> None:
        """Wake the timer only when the core's next deadline came earlier than the one it sleeps toward.

        Received bytes only push the keepalive and idle deadlines later, so a
        busy tunnel wakes its timer once per deadline, not once per message.
        """
        deadline = self.conn.get_timer()
        armed = self._timer_armed_for
        if (deadline is not None) if armed is None else (deadline is None or deadline < armed):
            self._timer_changed.set()

    def _timer_fired(self) -> None:
        self._timer_due = True
        self._timer_changed.set()

    async def _run_timer(self) -> None:
        """Act on the core's deadlines; never waits for a write, so a stuck one cannot hide a dead path.

        One loop callback per armed deadline and one Event, rather than a
        ``wait_for`` task each time: the deadline passing and an earlier
        deadline (``_rearm_timer_if_earlier``) both wake it.
        """
        changed = self._timer_changed
        while not self.conn.closed:
            deadline = self.conn.get_timer()
            self._timer_armed_for = deadline
            self._timer_due = False
            changed.clear()
            alarm = None if deadline is None else self.loop.call_at(deadline, self._timer_fired)
            try:
                await changed.wait()
            finally:
                if alarm is not None:
                    alarm.cancel()
            if not self._timer_due or deadline is None:
                continue  # an earlier deadline: sleep toward that one instead
            # The loop judged the deadline passed; its clock may read a hair below it.
            events = self.conn.handle_timer(max(self.now(), deadline))
            await self._dispatch(events)  # a timer only ever ends the connection: no hook runs
            if self.conn.closed:
                # A deadline passed: the path is presumed dead, so nothing queued
                # for it (not even GOAWAY) can be expected to leave.
                self.abort()
                return
            self.schedule_flush()  # the PING, behind whatever write is in progress

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
            if not data or self._aborted:
                return
            self.write_pending_since = self.now()
            try:
                await self.transport.send(data)
            except (ConnectionError, RuntimeError) as exc:
                self._terminate(ErrorCode.CANCEL, f"connection lost: {exc}", True)
                return
            finally:
                self.write_pending_since = None
        self._rearm_timer_if_earlier()

    def open_stream(self, service: str, peer: str | None = None) -> StreamChannel:
        """Open a stream to ``service``; await ``wait_accepted()`` on the result."""
        channel = self._add_channel(self.conn.open_stream(service, peer=peer), service, peer)
        self.schedule_flush()
        return channel

    def _add_channel(self, stream_id: int, service: str, peer: str | None) -> StreamChannel:
        channel = StreamChannel(self, self.conn, stream_id, service, peer)
        self.streams[stream_id] = channel
        return channel

    def forget(self, stream_id: int) -> None:
        """The stream's channel is done: later events for it are acknowledged and dropped."""
        self.streams.pop(stream_id, None)

    async def close(self, code: ErrorCode = ErrorCode.NO_ERROR, reason: str = "") -> None:
        """Close the tunnel: GOAWAY, then the WebSocket; dropped instead if that takes past CLOSE_TIMEOUT."""
        if not self.conn.closed:
            self.conn.close(code, reason)
        self._terminate(code, reason, False)
        try:
            await asyncio.wait_for(self._close_in_order(), CLOSE_TIMEOUT)
        except (TimeoutError, ConnectionError, RuntimeError):
            self.abort()

    async def _close_in_order(self) -> None:
        await self.flush()
        if not self._aborted:
            await self.transport.close()

    def abort(self) -> None:
        """Drop the connection now, without a closing handshake (the path is dead or stuck)."""
        self._terminate(ErrorCode.CANCEL, "the connection was dropped", False)
        if not self._aborted:
            self._aborted = True
            self.transport.abort()

    def _terminate(self, code: ErrorCode, reason: str, remote: bool) -> None:
        if self.close_reason is not None:
            return
        self.close_reason = (code, reason, remote)
        for channel in list(self.streams.values()):
            channel._on_reset(ErrorCode.CANCEL, "the tunnel closed")
        self.streams.clear()
        self.on_closed(code, reason, remote)
        self.closed.set()

    async def _shutdown(self) -> None:
        self._terminate(ErrorCode.NO_ERROR, "closed", False)
        if not self._aborted and not self.transport.closed:  # close() may have finished it already
            try:
                # The core may have queued a GOAWAY saying why (a peer that broke the protocol).
                await asyncio.wait_for(self._close_in_order(), CLOSE_TIMEOUT)
            except (TimeoutError, ConnectionError, RuntimeError):
                self.abort()
        for task in list(self._tasks):
            task.cancel()
