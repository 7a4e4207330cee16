"""One end of a tunnel as a pure state machine: bytes in, events out, bytes to send.

The caller feeds received bytes to ``receive_data``, sends whatever
``data_to_send`` returns, and calls ``handle_timer`` when ``get_timer`` says.
Frame dispatch for received bytes lives in ``receiver.py``.
"""

from __future__ import annotations

import base64
import collections
from typing import Any

from agent.tunnel.protocol.control import AUTH_RESERVED_KEYS
from agent.tunnel.protocol.errors import ErrorCode, LocalProtocolError, StreamClosedError
from agent.tunnel.protocol.events import ConnectionTerminated, Event
from agent.tunnel.protocol.frames import (
    FLAG_FIN,
    HEADER,
    HEADER_SIZE,
    PING_COUNTER,
    U32,
    FrameType,
    encode_code_reason,
    encode_frame,
    encode_json,
)
from agent.tunnel.protocol.limits import (
    INITIAL_WINDOW,
    MAX_STREAM_ID,
    NONCE_SIZE,
    PROTOCOL_VERSION,
    RESET_MEMORY,
    Liveness,
    ProtocolLimits,
)
from agent.tunnel.protocol.liveness import LivenessClock
from agent.tunnel.protocol.receiver import Receiver
from agent.tunnel.protocol.state import Handshake, Role
from agent.tunnel.protocol.streams import Stream, StreamInput, StreamState

AUTH_MESSAGE_PREFIX = b"outpost-tunnel-auth-v1\0"

_DATA = int(FrameType.DATA)


def auth_message(nonce: bytes, relay_cert_sha256: bytes) -> bytes:
    """What the agent's device key signs: it binds the nonce to the relay's certificate."""
    return AUTH_MESSAGE_PREFIX + bytes(nonce) + bytes(relay_cert_sha256)


class Connection(Receiver):
    """One tunnel end. Not thread-safe; drive it from one task."""

    def __init__(self, role: Role, now: float, *, limits: ProtocolLimits = ProtocolLimits(),
                 liveness: Liveness = Liveness()) -> None:
        self.role = role
        self.limits = limits
        self.liveness = liveness
        self.authenticated = False
        self.closed = False
        #: the peer's AUTH (relay side, minus chain and signature) or AUTH_OK (agent side)
        self.peer_info: dict[str, Any] | None = None
        self.last_rtt: float | None = None
        self.bytes_received = 0
        self.bytes_sent = 0
        self.handshake = Handshake.START
        self._clock = LivenessClock(liveness, now, limits.auth_deadline)
        self._out: list[bytes] = []
        self._pending = bytearray()  # an incomplete frame, never more than one
        self._streams: dict[int, Stream] = {}
        self._next_local_id = 1 if role is Role.AGENT else 2
        self._peer_parity = 0 if role is Role.AGENT else 1  # relay opens even ids, agent odd
        self._highest_peer_id = 0
        self._peer_streams = 0  # live streams the peer opened, against limits.max_streams
        self._unread = 0  # the streams' unacknowledged bytes, against limits.receive_budget
        self._peer_window = INITIAL_WINDOW  # until the peer's AUTH/AUTH_OK says otherwise
        self._recently_reset: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._binds_pending = 0
        self._ping_counter = 0
        self._now = now  # the `now` of the receive_data call in progress

    # -- state --------------------------------------------------------------
    @property
    def open_stream_ids(self) -> set[int]:
        return set(self._streams)

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete received frame held until the rest arrives."""
        return len(self._pending)

    @property
    def unread_bytes(self) -> int:
        """Bytes received on live streams and not yet acknowledged by their readers (at most the receive budget)."""
        return self._unread

    def stream_state(self, stream_id: int) -> StreamState:
        """The stream's state; CLOSED for any id not live (forgotten or never opened)."""
        stream = self._streams.get(stream_id)
        return StreamState.CLOSED if stream is None else stream.state

    # -- handshake -------------------------------------------------------------
    def send_challenge(self, nonce: bytes) -> None:
        """Relay: queue CHALLENGE. The auth deadline runs from construction."""
        self._require(self.role is Role.RELAY, "only the relay sends CHALLENGE")
        self._require(self.handshake is Handshake.START, "CHALLENGE was already sent")
        self._require(len(nonce) == NONCE_SIZE, f"the nonce must be {NONCE_SIZE} bytes")
        self._require_open()
        self._queue_frame(FrameType.CHALLENGE, 0, 0, bytes([PROTOCOL_VERSION]) + bytes(nonce))
        self.handshake = Handshake.CHALLENGED

    def send_auth(self, chain_pem: list[str], signature: bytes, extra: dict[str, Any] | None = None) -> None:
        """Agent: answer the CHALLENGE with our chain (leaf first) and signature."""
        self._require(self.role is Role.AGENT, "only the agent sends AUTH")
        self._require(self.handshake is Handshake.CHALLENGED, "AUTH answers a CHALLENGE; none is pending")
        self._require_open()
        self._require(bool(chain_pem) and all(isinstance(p, str) for p in chain_pem),
                      "the certificate chain must be a non-empty list of PEM strings")
        extra = dict(extra or {})
        clash = AUTH_RESERVED_KEYS & set(extra)
        self._require(not clash, f"AUTH fields {sorted(clash)} are set by the protocol itself")
        body = {
            "version": PROTOCOL_VERSION,
            "chain": list(chain_pem),
            "signature": base64.b64encode(bytes(signature)).decode("ascii"),
            "window": self.limits.initial_window,
            **extra,
        }
        self._queue_frame(FrameType.AUTH, 0, 0, self._control_payload("AUTH", body))
        self.handshake = Handshake.AUTH_EXCHANGED

    def accept_auth(self, info: dict[str, Any]) -> None:
        """Relay: the AUTH checked out; queue AUTH_OK and open the tunnel for streams."""
        self._require(self.role is Role.RELAY, "only the relay sends AUTH_OK")
        self._require(self.handshake is Handshake.AUTH_EXCHANGED, "AUTH_OK answers an AUTH; none is pending")
        self._require_open()
        body = {**info, "window": self.limits.initial_window}
        self._queue_frame(FrameType.AUTH_OK, 0, 0, self._control_payload("AUTH_OK", body))
        self._become_authenticated()

    def _become_authenticated(self) -> None:
        self.handshake = Handshake.DONE
        self.authenticated = True
        self._clock.auth_deadline = None

    def send_bind(self, services: list[str]) -> None:
        """Agent: ask the relay to route dials for these services to us."""
        self._require(self.role is Role.AGENT, "only the agent sends BIND")
        self._require_ready()
        self._require(all(isinstance(s, str) and s for s in services), "service names must be non-empty strings")
        self._queue_frame(FrameType.BIND, 0, 0, self._control_payload("BIND", {"services": list(services)}))
        self._binds_pending += 1

    def send_bind_result(self, bound: list[str], refused: dict[str, str]) -> None:
        """Relay: answer one BIND."""
        self._require(self.role is Role.RELAY, "only the relay sends BIND_RESULT")
        self._require_ready()
        self._require(self._binds_pending > 0, "BIND_RESULT answers a BIND; none is pending")
        body = {"bound": list(bound), "refused": dict(refused)}
        self._queue_frame(FrameType.BIND_RESULT, 0, 0, self._control_payload("BIND_RESULT", body))
        self._binds_pending -= 1

    # -- streams -----------------------------------------------------------------
    def open_stream(self, service: str, *, peer: str | None = None) -> int:
        """Open a stream to ``service``; returns its id. Data may be sent at once."""
        self._require_ready()
        self._require(isinstance(service, str) and bool(service), "the service name must be a non-empty string")
        self._require(peer is None or self.role is Role.RELAY, "only the relay names the dialing peer")
        stream_id = self._next_local_id
        self._require(stream_id <= MAX_STREAM_ID, "this tunnel has used up its stream ids; reconnect")
        body: dict[str, Any] = {"service": service}
        if peer is not None:
            body["peer"] = peer
        payload = self._control_payload("OPEN", body)
        stream = Stream(stream_id, local=True, send_window=self._peer_window, recv_window=self.limits.initial_window)
        stream.state = stream.next_state(StreamInput.SEND_OPEN)
        self._streams[stream_id] = stream
        self._next_local_id += 2
        self._queue_frame(FrameType.OPEN, 0, stream_id, payload)
        return stream_id

    def accept_stream(self, stream_id: int) -> None:
        """Tell the opener that this end connected the stream."""
        stream = self._live_stream(stream_id)
        self._require(not stream.local, f"stream {stream_id} was opened by this end; the peer accepts it")
        self._require(not stream.accepted, f"stream {stream_id} was already accepted")
        new_state = self._local_transition(stream, StreamInput.SEND_ACCEPT)
        stream.accepted = True
        stream.state = new_state
        self._queue_frame(FrameType.ACCEPT, 0, stream_id, b"")

    def send_data(self, stream_id: int, data: bytes, *, end_stream: bool = False) -> None:
        """Queue ``data`` (at most ``send_window(stream_id)`` bytes), then FIN if ``end_stream``."""
        stream = self._live_stream(stream_id)
        size = len(data)
        if size > stream.send_window:
            raise LocalProtocolError(
                ErrorCode.FLOW_CONTROL_ERROR,
                f"{size} bytes exceed stream {stream_id}'s send window of {stream.send_window}; "
                "wait for WindowUpdated",
            )
        new_state = self._local_transition(stream, StreamInput.SEND_DATA)
        if end_stream:
            new_state = self._local_transition(stream, StreamInput.SEND_FIN, new_state)
        if not size and not end_stream:
            return
        if type(data) is not bytes:
            data = bytes(data)  # the caller may reuse its buffer before we are flushed
        out = self._out
        chunk = self.limits.max_send_payload
        pack = HEADER.pack
        if size <= chunk:
            out.append(pack(_DATA, FLAG_FIN if end_stream else 0, stream_id, size))
            if size:
                out.append(data)
            frames = 1
        else:
            view = memoryview(data)
            frames = 0
            for start in range(0, size, chunk):
                piece = view[start:start + chunk]
                last = start + chunk >= size
                out.append(pack(_DATA, FLAG_FIN if (last and end_stream) else 0, stream_id, len(piece)))
                out.append(piece)
                frames += 1
        self.bytes_sent += size + frames * HEADER_SIZE
        stream.send_window -= size
        stream.state = new_state
        if new_state is StreamState.CLOSED:
            self._forget(stream)

    def end_stream(self, stream_id: int) -> None:
        """Half-close: this end sends no more data on the stream."""
        self.send_data(stream_id, b"", end_stream=True)

    def reset_stream(self, stream_id: int, code: ErrorCode, reason: str = "") -> None:
        """Abort the stream both ways. Data the peer already sent is dropped quietly."""
        stream = self._live_stream(stream_id)
        self._local_transition(stream, StreamInput.SEND_RESET)
        self._forget(stream)
        self._send_reset(stream_id, code, reason)

    def send_window(self, stream_id: int) -> int:
        """Bytes ``send_data`` may send now; 0 for a stream that is closed."""
        stream = self._streams.get(stream_id)
        if stream is not None:
            return stream.send_window
        self._require(self._was_opened(stream_id), f"stream {stream_id} was never opened")
        return 0

    def acknowledge_received(self, stream_id: int, n: int) -> None:
        """The application consumed ``n`` received bytes; return credit in batches."""
        self._require(_is_count(n), "the acknowledged byte count must be a non-negative integer")
        stream = self._streams.get(stream_id)
        if stream is None or self.closed:
            return  # closed streams need no credit; their data is accounted for
        self._require(n <= stream.unacknowledged,
                      f"stream {stream_id} has only {stream.unacknowledged} unacknowledged bytes, not {n}")
        stream.unacknowledged -= n
        self._unread -= n
        stream.owed += n
        # Batching halves the WINDOW frames at the cost of half a window of
        # slack; a window covers the bandwidth-delay product twice over.
        if stream.owed >= self.limits.initial_window // 2 and stream.next_state(StreamInput.SEND_WINDOW):
            increment, stream.owed = stream.owed, 0
            stream.recv_window += increment
            self._queue_frame(FrameType.WINDOW, 0, stream_id, U32.pack(increment))

    # -- liveness ---------------------------------------------------------------
    def set_liveness(self, liveness: Liveness) -> None:
        """Adopt new timers from now on (the relay learns the agent's keepalive at AUTH)."""
        self.liveness = liveness
        self._clock.settings = liveness

    def ping(self, now: float) -> None:
        """Send a PING now, unless one is already in flight."""
        self._require_ready()
        if self._clock.ping_sent_at is None:
            self._send_ping(now)

    def _send_ping(self, now: float) -> None:
        self._ping_counter += 1
        payload = PING_COUNTER.pack(self._ping_counter)
        self._clock.ping_sent_at = now
        self._clock.ping_payload = payload
        self._queue_frame(FrameType.PING, 0, 0, payload)

    def get_timer(self) -> float | None:
        """When ``handle_timer`` must next be called; None when closed."""
        return None if self.closed else self._clock.next_deadline()

    def handle_timer(self, now: float) -> list[Event]:
        """Act on deadlines that passed by ``now``: PING, or end the connection."""
        if self.closed:
            return []
        why = self._clock.expired(now)
        if why == "auth":
            waited = f"{self.limits.auth_deadline:g} s"
            reason = f"no valid AUTH within {waited}" if self.role is Role.RELAY else f"no AUTH_OK within {waited}"
            return [self._time_out(reason)]
        if why == "ping":
            return [self._time_out(f"no answer to PING within {self.liveness.ping_timeout:g} s")]
        if why == "idle":
            return [self._time_out(f"nothing received for {self.liveness.idle_timeout:g} s")]
        due = self._clock.ping_due()
        if due is not None and now >= due:
            self._send_ping(now)
        return []

    def _time_out(self, reason: str) -> ConnectionTerminated:
        self._close(ErrorCode.TIMEOUT, reason)
        return ConnectionTerminated(ErrorCode.TIMEOUT, reason, remote=False)

    # -- closing and output -----------------------------------------------------------
    def close(self, code: ErrorCode = ErrorCode.NO_ERROR, reason: str = "") -> None:
        """Queue GOAWAY and end the connection; later calls do nothing."""
        if not self.closed:
            self._close(code, reason)

    def _close(self, code: ErrorCode, reason: str) -> None:
        self._queue_frame(FrameType.GOAWAY, 0, 0, encode_code_reason(code, reason))
        self._mark_closed()

    def _mark_closed(self) -> None:
        """Closed for good: drop every table so a dead connection holds no memory."""
        self.closed = True
        self._streams.clear()
        self._unread = 0
        self._recently_reset.clear()
        self._pending = bytearray()

    def data_to_send(self) -> bytes:
        """Everything queued since the last call, in order."""
        if not self._out:
            return b""
        data = b"".join(self._out)
        self._out.clear()
        return data

    # -- internals ------------------------------------------------------------------
    def _queue_frame(self, frame_type: FrameType, flags: int, stream_id: int, payload: bytes) -> None:
        frame = encode_frame(frame_type, flags, stream_id, payload)
        self._out.append(frame)
        self.bytes_sent += len(frame)

    def _control_payload(self, frame: str, body: Any) -> bytes:
        try:
            payload = encode_json(body)
        except (TypeError, ValueError) as exc:
            raise LocalProtocolError(ErrorCode.INTERNAL_ERROR, f"{frame} payload is not JSON: {exc}") from None
        self._require(len(payload) <= self.limits.max_control_payload,
                      f"{frame} payload of {len(payload)} bytes exceeds {self.limits.max_control_payload}")
        return payload

    @staticmethod
    def _require(condition: bool, message: str) -> None:
        if not condition:
            raise LocalProtocolError(ErrorCode.PROTOCOL_ERROR, message)

    def _require_open(self) -> None:
        self._require(not self.closed, "the tunnel is closed")

    def _require_ready(self) -> None:
        self._require_open()
        self._require(self.authenticated, "the tunnel is not authenticated yet")

    def _was_opened(self, stream_id: int) -> bool:
        """True for an id either end has used (live or closed since)."""
        if stream_id <= 0:
            return False
        if stream_id % 2 == self._peer_parity:
            return stream_id <= self._highest_peer_id
        return stream_id < self._next_local_id

    def _live_stream(self, stream_id: int) -> Stream:
        self._require_ready()
        stream = self._streams.get(stream_id)
        if stream is None:
            if self._was_opened(stream_id):
                raise StreamClosedError(stream_id)
            raise LocalProtocolError(ErrorCode.PROTOCOL_ERROR, f"stream {stream_id} was never opened")
        return stream

    @staticmethod
    def _local_transition(stream: Stream, stream_input: StreamInput,
                          state: StreamState | None = None) -> StreamState:
        current = stream.state if state is None else state
        new_state = Stream.next_state_from(current, stream_input)
        if new_state is None:
            raise LocalProtocolError(
                ErrorCode.STREAM_CLOSED,
                f"cannot {stream_input.value} on stream {stream.stream_id}: it is {current.value}",
            )
        return new_state

    def _send_reset(self, stream_id: int, code: ErrorCode, reason: str) -> None:
        """Queue RESET and drop quietly whatever the peer still had in flight."""
        self._queue_frame(FrameType.RESET, 0, stream_id, encode_code_reason(code, reason))
        self._remember_reset(stream_id)

    def _remember_reset(self, stream_id: int) -> None:
        self._recently_reset[stream_id] = None
        if len(self._recently_reset) > RESET_MEMORY:
            self._recently_reset.popitem(last=False)

    def _forget(self, stream: Stream) -> None:
        stream.state = StreamState.CLOSED
        del self._streams[stream.stream_id]
        self._unread -= stream.unacknowledged
        if not stream.local:
            self._peer_streams -= 1


def _is_count(n: Any) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 0

