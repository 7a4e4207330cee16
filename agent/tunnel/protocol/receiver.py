"""The receiving half of ``Connection``: parse frames, check them, turn them into events.

Parsing works on the caller's buffer through a memoryview and keeps at most
one incomplete frame of its own, whose header is checked before any of its
payload is kept: an oversized or unknown frame fails at its header.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from agent.tunnel.protocol.control import decode_auth, decode_auth_ok, decode_bind, decode_bind_result, decode_open
from agent.tunnel.protocol.errors import ErrorCode, RemoteProtocolError
from agent.tunnel.protocol.events import (
    Authenticated,
    AuthReceived,
    BindCompleted,
    BindRequested,
    ChallengeReceived,
    ConnectionTerminated,
    DataReceived,
    Event,
    PongReceived,
    StreamAccepted,
    StreamEnded,
    StreamOpened,
    StreamReset,
    WindowUpdated,
)
from agent.tunnel.protocol.frames import (
    FLAG_FIN,
    FRAME_TYPES,
    HANDSHAKE_FRAME_TYPES,
    HEADER,
    HEADER_SIZE,
    STREAM_FRAME_TYPES,
    U32,
    FrameType,
    decode_code_reason,
)
from agent.tunnel.protocol.limits import MAX_WINDOW, NONCE_SIZE, PING_PAYLOAD_SIZE, PROTOCOL_VERSION
from agent.tunnel.protocol.state import Handshake, Role
from agent.tunnel.protocol.streams import TRANSITIONS, Stream, StreamInput, StreamState

if TYPE_CHECKING:
    from agent.tunnel.protocol.connection import Connection

_DATA = int(FrameType.DATA)
_RECV_DATA = StreamInput.RECV_DATA
_RECV_FIN = StreamInput.RECV_FIN
_CLOSED = StreamState.CLOSED
_unpack_header = HEADER.unpack_from


def _violation(code: ErrorCode, message: str) -> RemoteProtocolError:
    return RemoteProtocolError(code, message)


class Receiver:
    """Mixed into Connection; every attribute used here is set up there."""

    def receive_data(self: "Connection", data: bytes, now: float) -> list[Event]:
        """Parse ``data`` (any chunking) and return the events it completes.

        Raises RemoteProtocolError when the peer broke the protocol; GOAWAY is
        queued by then and the connection is closed. Bytes after the
        connection closed are ignored.
        """
        if self.closed:
            return []
        events: list = []
        if not data:
            return events
        self.bytes_received += len(data)
        self._clock.last_received = now
        self._now = now
        try:
            self._parse(memoryview(data), events)
        except RemoteProtocolError as exc:
            if not self.closed:
                self._close(exc.code, str(exc))
            exc.events = events
            raise
        return events

    def _parse(self: "Connection", view: memoryview, events: list) -> None:
        end = len(view)
        pos = 0
        pending = self._pending
        if pending:
            # Finish the frame left incomplete by the previous call first.
            if len(pending) < HEADER_SIZE:
                pos = min(HEADER_SIZE - len(pending), end)
                pending += view[:pos]
                if len(pending) < HEADER_SIZE:
                    return
            frame_type, flags, stream_id, length = self._check_header(pending, 0)
            need = HEADER_SIZE + length - len(pending)
            take = min(need, end - pos)
            pending += view[pos:pos + take]
            pos += take
            if take < need:
                return
            self._pending = bytearray()
            self._dispatch(frame_type, flags, stream_id, bytes(pending[HEADER_SIZE:]), events)
            if self.closed:
                return
        while end - pos >= HEADER_SIZE:
            frame_type, flags, stream_id, length = self._check_header(view, pos)
            start = pos + HEADER_SIZE
            stop = start + length
            if stop > end:
                break
            pos = stop
            payload = view[start:stop].tobytes()
            if frame_type == _DATA and self.authenticated:
                self._on_data(flags, stream_id, payload, events)
            else:
                self._dispatch(frame_type, flags, stream_id, payload, events)
                if self.closed:
                    return
        if pos < end:
            self._pending = bytearray(view[pos:])

    def _check_header(self: "Connection", buffer: Any, offset: int) -> tuple[int, int, int, int]:
        frame_type, flags, stream_id, length = _unpack_header(buffer, offset)
        if frame_type == _DATA:
            if length > self.limits.max_frame_payload:
                raise _violation(ErrorCode.FRAME_SIZE_ERROR,
                                 f"DATA frame of {length} bytes exceeds {self.limits.max_frame_payload}")
            if stream_id == 0:
                raise _violation(ErrorCode.PROTOCOL_ERROR, "DATA frame on stream 0")
            return frame_type, flags, stream_id, length
        kind = FRAME_TYPES.get(frame_type)
        if kind is None:
            raise _violation(ErrorCode.PROTOCOL_ERROR, f"unknown frame type 0x{frame_type:02x}")
        if length > self.limits.max_control_payload:
            raise _violation(ErrorCode.FRAME_SIZE_ERROR,
                             f"{kind.name} frame of {length} bytes exceeds {self.limits.max_control_payload}")
        if (kind in STREAM_FRAME_TYPES) != (stream_id != 0):
            where = "stream 0" if stream_id == 0 else f"stream {stream_id}"
            raise _violation(ErrorCode.PROTOCOL_ERROR, f"{kind.name} frame on {where}")
        return frame_type, flags, stream_id, length

    def _dispatch(self: "Connection", frame_type: int, flags: int, stream_id: int, payload: bytes,
                  events: list) -> None:
        kind = FrameType(frame_type)
        if not self.authenticated and kind not in HANDSHAKE_FRAME_TYPES:
            raise _violation(ErrorCode.PROTOCOL_ERROR, f"{kind.name} frame before authentication")
        _HANDLERS[kind](self, flags, stream_id, payload, events)

    # -- streams ---------------------------------------------------------------
    def _on_data(self: "Connection", flags: int, stream_id: int, payload: bytes, events: list) -> None:
        stream = self._streams.get(stream_id)
        if stream is None:
            self._data_without_stream(stream_id)
            return
        new_state = TRANSITIONS.get((stream.state, _RECV_DATA))
        if new_state is None:
            self._stream_error(stream, ErrorCode.STREAM_CLOSED, "DATA after the sender ended the stream", events)
            return
        size = len(payload)
        if size > stream.recv_window:
            raise _violation(ErrorCode.FLOW_CONTROL_ERROR,
                             f"{size} bytes of DATA exceed stream {stream_id}'s window of {stream.recv_window}")
        if size:
            stream.recv_window -= size
            stream.unacknowledged += size
            self._unread += size
            events.append(DataReceived(stream_id, payload))
            if self._unread > self.limits.receive_budget:
                self._shed_slowest_reader(events)
                if stream.state is _CLOSED:
                    return  # this very stream was the slowest
        if flags & FLAG_FIN:
            new_state = TRANSITIONS[(new_state, _RECV_FIN)]
            events.append(StreamEnded(stream_id))
            stream.state = new_state
            if new_state is _CLOSED:
                self._forget(stream)
        else:
            stream.state = new_state

    def _shed_slowest_reader(self: "Connection", events: list) -> None:
        """Over the receive budget: reset the stream whose reader is furthest behind."""
        slowest = max(self._streams.values(), key=lambda s: s.unacknowledged)
        reason = (f"its reader fell {slowest.unacknowledged} bytes behind; this end holds at most "
                  f"{self.limits.receive_budget} unread bytes for all streams of the tunnel")
        self._stream_error(slowest, ErrorCode.CANCEL, reason, events)

    def _data_without_stream(self: "Connection", stream_id: int) -> None:
        if not self._was_opened(stream_id):
            raise _violation(ErrorCode.PROTOCOL_ERROR, f"DATA on stream {stream_id}, which was never opened")
        if stream_id in self._recently_reset:
            return  # sent before the peer saw our RESET
        # The peer writes on a stream it ended or reset: tell it once, then drop.
        self._send_reset(stream_id, ErrorCode.STREAM_CLOSED, "DATA on a closed stream")

    def _stream_error(self: "Connection", stream: Stream, code: ErrorCode, reason: str, events: list) -> None:
        self._forget(stream)
        self._send_reset(stream.stream_id, code, reason)
        events.append(StreamReset(stream.stream_id, code, reason, remote=False))

    def _known_stream(self: "Connection", kind: str, stream_id: int) -> Stream | None:
        """The live stream, or None for a closed one (frames in flight are ignored)."""
        stream = self._streams.get(stream_id)
        if stream is None and not self._was_opened(stream_id):
            raise _violation(ErrorCode.PROTOCOL_ERROR, f"{kind} on stream {stream_id}, which was never opened")
        return stream

    def _on_open(self: "Connection", flags: int, stream_id: int, payload: bytes, events: list) -> None:
        if stream_id % 2 != self._peer_parity:
            raise _violation(ErrorCode.PROTOCOL_ERROR, f"the peer opened stream {stream_id}, an id of this end's parity")
        if stream_id <= self._highest_peer_id:
            raise _violation(ErrorCode.PROTOCOL_ERROR,
                             f"the peer opened stream {stream_id} after {self._highest_peer_id}; ids must increase")
        service, peer = decode_open(payload, peer_allowed=self.role is Role.AGENT)
        self._highest_peer_id = stream_id
        if self._peer_streams >= self.limits.max_streams:
            self._send_reset(stream_id, ErrorCode.REFUSED_STREAM,
                             f"this end allows {self.limits.max_streams} open streams")
            return
        stream = Stream(stream_id, local=False, send_window=self._peer_window, recv_window=self.limits.initial_window)
        stream.state = TRANSITIONS[(stream.state, StreamInput.RECV_OPEN)]
        self._streams[stream_id] = stream
        self._peer_streams += 1
        events.append(StreamOpened(stream_id, service, peer))

    def _on_accept(self: "Connection", flags: int, stream_id: int, payload: bytes, events: list) -> None:
        if payload:
            raise _violation(ErrorCode.FRAME_SIZE_ERROR, "ACCEPT frame with a payload")
        stream = self._known_stream("ACCEPT", stream_id)
        if stream is None:
            return
        if not stream.local or stream.accepted:
            why = "a stream it opened itself" if not stream.local else "a stream twice"
            self._stream_error(stream, ErrorCode.PROTOCOL_ERROR, f"the peer accepted {why}", events)
            return
        stream.state = TRANSITIONS[(stream.state, StreamInput.RECV_ACCEPT)]
        stream.accepted = True
        events.append(StreamAccepted(stream_id))

    def _on_reset(self: "Connection", flags: int, stream_id: int, payload: bytes, events: list) -> None:
        if len(payload) < U32.size:
            raise _violation(ErrorCode.FRAME_SIZE_ERROR, "RESET frame without an error code")
        stream = self._known_stream("RESET", stream_id)
        if stream is None:
            return
        code, reason = decode_code_reason(payload)
        self._forget(stream)
        events.append(StreamReset(stream_id, code, reason, remote=True))

    def _on_window(self: "Connection", flags: int, stream_id: int, payload: bytes, events: list) -> None:
        if len(payload) != U32.size:
            raise _violation(ErrorCode.FRAME_SIZE_ERROR, f"WINDOW frame of {len(payload)} bytes, not 4")
        (increment,) = U32.unpack(payload)
        if increment == 0:
            raise _violation(ErrorCode.PROTOCOL_ERROR, f"WINDOW of 0 on stream {stream_id}")
        stream = self._known_stream("WINDOW", stream_id)
        if stream is None:
            return
        window = stream.send_window + increment
        if window > MAX_WINDOW:
            raise _violation(ErrorCode.FLOW_CONTROL_ERROR, f"WINDOW grows stream {stream_id} past {MAX_WINDOW}")
        stream.state = TRANSITIONS[(stream.state, StreamInput.RECV_WINDOW)]
        stream.send_window = window
        events.append(WindowUpdated(stream_id, window))

    # -- handshake and control -----------------------------------------------------
    def _unexpected(self: "Connection", kind: str) -> RemoteProtocolError:
        return _violation(ErrorCode.PROTOCOL_ERROR,
                          f"unexpected {kind} (this end is the {self.role.value}, handshake {self.handshake.value})")

    def _on_challenge(self: "Connection", flags: int, stream_id: int, payload: bytes, events: list) -> None:
        if self.role is not Role.AGENT or self.handshake is not Handshake.START:
            raise self._unexpected("CHALLENGE")
        if not payload:
            raise _violation(ErrorCode.FRAME_SIZE_ERROR, "empty CHALLENGE")
        version, nonce = payload[0], payload[1:]
        if version == PROTOCOL_VERSION and len(nonce) != NONCE_SIZE:
            raise _violation(ErrorCode.FRAME_SIZE_ERROR, f"CHALLENGE nonce of {len(nonce)} bytes, not {NONCE_SIZE}")
        self.handshake = Handshake.CHALLENGED
        events.append(ChallengeReceived(version, nonce))

    def _on_auth(self: "Connection", flags: int, stream_id: int, payload: bytes, events: list) -> None:
        if self.role is not Role.RELAY or self.handshake is not Handshake.CHALLENGED:
            raise self._unexpected("AUTH")
        chain, signature, info, window = decode_auth(payload)
        self._peer_window = window
        self.peer_info = info
        self.handshake = Handshake.AUTH_EXCHANGED
        events.append(AuthReceived(chain, signature, info))

    def _on_auth_ok(self: "Connection", flags: int, stream_id: int, payload: bytes, events: list) -> None:
        if self.role is not Role.AGENT or self.handshake is not Handshake.AUTH_EXCHANGED:
            raise self._unexpected("AUTH_OK")
        info, window = decode_auth_ok(payload)
        self._peer_window = window
        self.peer_info = info
        self._become_authenticated()
        events.append(Authenticated(info))

    def _on_bind(self: "Connection", flags: int, stream_id: int, payload: bytes, events: list) -> None:
        if self.role is not Role.RELAY:
            raise self._unexpected("BIND")
        services = decode_bind(payload)
        self._binds_pending += 1
        events.append(BindRequested(services))

    def _on_bind_result(self: "Connection", flags: int, stream_id: int, payload: bytes, events: list) -> None:
        if self.role is not Role.AGENT or self._binds_pending == 0:
            raise self._unexpected("BIND_RESULT")
        bound, refused = decode_bind_result(payload)
        self._binds_pending -= 1
        events.append(BindCompleted(bound, refused))

    def _on_ping(self: "Connection", flags: int, stream_id: int, payload: bytes, events: list) -> None:
        if len(payload) != PING_PAYLOAD_SIZE:
            raise _violation(ErrorCode.FRAME_SIZE_ERROR, f"PING of {len(payload)} bytes, not {PING_PAYLOAD_SIZE}")
        self._queue_frame(FrameType.PONG, 0, 0, payload)

    def _on_pong(self: "Connection", flags: int, stream_id: int, payload: bytes, events: list) -> None:
        if len(payload) != PING_PAYLOAD_SIZE:
            raise _violation(ErrorCode.FRAME_SIZE_ERROR, f"PONG of {len(payload)} bytes, not {PING_PAYLOAD_SIZE}")
        clock = self._clock
        if clock.ping_sent_at is None or payload != clock.ping_payload:
            return  # an answer to nothing we are waiting for: harmless
        rtt = max(0.0, self._now - clock.ping_sent_at)
        clock.ping_sent_at = clock.ping_payload = None
        self.last_rtt = rtt
        events.append(PongReceived(rtt))

    def _on_goaway(self: "Connection", flags: int, stream_id: int, payload: bytes, events: list) -> None:
        if len(payload) < U32.size:
            raise _violation(ErrorCode.FRAME_SIZE_ERROR, "GOAWAY frame without an error code")
        code, reason = decode_code_reason(payload)
        self._mark_closed()
        events.append(ConnectionTerminated(code, reason, remote=True))


_Handler = Callable[[Any, int, int, bytes, list], None]
_HANDLERS: dict[FrameType, _Handler] = {
    FrameType.CHALLENGE: Receiver._on_challenge,
    FrameType.AUTH: Receiver._on_auth,
    FrameType.AUTH_OK: Receiver._on_auth_ok,
    FrameType.OPEN: Receiver._on_open,
    FrameType.ACCEPT: Receiver._on_accept,
    FrameType.DATA: Receiver._on_data,
    FrameType.RESET: Receiver._on_reset,
    FrameType.WINDOW: Receiver._on_window,
    FrameType.PING: Receiver._on_ping,
    FrameType.PONG: Receiver._on_pong,
    FrameType.GOAWAY: Receiver._on_goaway,
    FrameType.BIND: Receiver._on_bind,
    FrameType.BIND_RESULT: Receiver._on_bind_result,
}
