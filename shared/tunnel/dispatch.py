"""The core's events acted on, for ``TunnelSession`` (shared.tunnel.session): each stream's event goes to its
``StreamChannel``, the handshake's to the ``on_*`` hooks the two ends (agent and relay) override.

``receive_nowait`` handles a message of stream data alone in the transport's
callback; everything else is dispatched from the session's reading task.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from shared.protocol import (
    Authenticated,
    AuthReceived,
    BindCompleted,
    BindRequested,
    ChallengeReceived,
    Connection,
    ConnectionTerminated,
    DataReceived,
    ErrorCode,
    Event,
    PongReceived,
    RelayCertificateOffered,
    RemoteProtocolError,
    ReportReceived,
    StreamAccepted,
    StreamEnded,
    StreamOpened,
    StreamReset,
    WindowUpdated,
)
from shared.tunnel.channel import StreamChannel, StreamHost

log = logging.getLogger(__name__)

# Frames one tunnel handles before the event loop serves the others: a message
# may pack some 29,000 PINGs (18 bytes each), and parsing and answering them in
# one go held every other tunnel for tens of milliseconds (tests/bench/loop_stall.py,
# tiny_frames: a live stream's p50 56 ms; 9 ms at 1,000 frames a turn, 3 ms at
# 250). 250 frames take a few hundred microseconds; bulk DATA (up to 64 KiB a
# frame, 8 to a message) never comes near the limit.
FRAMES_PER_TURN = 250


class EventDispatch:
    """The hooks the two ends override, and the dispatch of the core's events onto them and the streams.

    The session (``TunnelSession``) provides the state and the methods below the hooks.
    """

    conn: Connection
    streams: dict[int, StreamChannel]
    ws_bytes_received: int

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

    def on_report(self, event: ReportReceived) -> None:
        """The agent's REPORT (relay side); the default ignores it."""

    def on_relay_certificate(self, event: RelayCertificateOffered) -> None:
        """The relay's renewed certificate (agent side); the default ignores it."""

    def on_closed(self, code: ErrorCode, reason: str, remote: bool) -> None:
        """The tunnel ended (once)."""

    # -- provided by the session (shared.tunnel.session) -------------------
    def now(self) -> float:
        raise NotImplementedError

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        raise NotImplementedError

    def _add_channel(self, stream_id: int, service: str, peer: str | None) -> StreamChannel:
        raise NotImplementedError

    def _rearm_timer_if_earlier(self) -> None:
        raise NotImplementedError

    def _peer_broke_protocol(self, exc: RemoteProtocolError) -> None:
        raise NotImplementedError

    def _terminate(self, code: ErrorCode, reason: str, remote: bool) -> None:
        raise NotImplementedError

    def can_flush_nowait(self) -> bool:
        raise NotImplementedError

    def flush_nowait(self) -> None:
        raise NotImplementedError

    def schedule_flush(self) -> None:
        raise NotImplementedError

    # -- dispatch --------------------------------------------------------------
    async def _dispatch(self, events: list[Event]) -> list[StreamHost]:
        """Act on ``events``; returns the other tunnels that spliced streams queued bytes on, to flush."""
        onward: list[StreamHost] = []
        for event in events:
            if not self._handle(event, onward):
                await self._handle_handshake(event)
        return onward

    def _handle(self, event: Event, onward: list[StreamHost]) -> bool:
        """Act on every kind of event but the handshake's (False: the caller awaits its hook)."""
        if type(event) is DataReceived:
            channel = self.streams.get(event.stream_id)
            if channel is not None:
                host = channel._on_data(event.data)
                if host is not None and host not in onward:
                    onward.append(host)
            else:
                self.conn.acknowledge_received(event.stream_id, len(event.data))
        elif type(event) is WindowUpdated:
            channel = self.streams.get(event.stream_id)
            if channel is not None:
                channel._on_window()
        elif type(event) is StreamEnded:
            channel = self.streams.get(event.stream_id)
            if channel is not None:
                channel._on_end()
        elif type(event) is StreamAccepted:
            channel = self.streams.get(event.stream_id)
            if channel is not None:
                channel._on_accepted()
        elif type(event) is StreamReset:
            channel = self.streams.pop(event.stream_id, None)
            if not event.remote:
                log.warning("stream %d (%s) reset: %s", event.stream_id,
                            channel.service if channel is not None else "?", event.reason)
            if channel is not None:
                channel._on_reset(event.code, event.reason)
        elif type(event) is StreamOpened:
            self.spawn(self.on_stream_opened(self._add_channel(event.stream_id, event.service, event.peer)))
        elif type(event) is PongReceived:
            self.on_pong(event.rtt)
        elif type(event) is ReportReceived:
            self.on_report(event)
        elif type(event) is RelayCertificateOffered:
            self.on_relay_certificate(event)
        elif type(event) is ConnectionTerminated:
            self._terminate(event.code, event.reason, event.remote)
        else:
            return False
        return True

    async def _handle_handshake(self, event: Event) -> None:
        if type(event) is ChallengeReceived:
            await self.on_challenge(event)
        elif type(event) is AuthReceived:
            await self.on_auth(event)
        elif type(event) is Authenticated:
            await self.on_authenticated(event)
        elif type(event) is BindRequested:
            await self.on_bind_requested(event)
        elif type(event) is BindCompleted:
            await self.on_bind_completed(event)

    def receive_nowait(self, data: bytes) -> bool:
        """Handle ``data`` now, in the transport's callback, while the reading task waits idle: only bytes
        that are stream data alone (``Connection.only_stream_data``), whose handling never waits. A task
        wake per message saved; False leaves ``data`` to the reading task, in order."""
        conn = self.conn
        if not conn.only_stream_data(data, FRAMES_PER_TURN):
            return False
        try:
            events = conn.receive_data(data, self.now(), max_frames=FRAMES_PER_TURN)
        except RemoteProtocolError as exc:
            # Closed now, its GOAWAY queued: the reading task gets the bytes too, finds the connection
            # closed and ends the tunnel as for any protocol error.
            self._peer_broke_protocol(exc)
            return False
        self.ws_bytes_received += len(data)
        onward: list[StreamHost] = []
        for event in events:
            self._handle(event, onward)
        self._rearm_timer_if_earlier()
        if conn.wants_to_send:
            if self.can_flush_nowait():
                self.flush_nowait()
            else:
                self.schedule_flush()
        for host in onward:
            if host.can_flush_nowait():
                host.flush_nowait()
            else:
                host.schedule_flush()
        return True
