"""One end of a tunnel as a pure state machine: bytes in, events out, bytes to send.

The caller feeds received bytes to ``receive_data``, sends whatever
``data_to_send`` returns, and calls ``handle_timer`` when ``get_timer`` says.

``Connection`` is the one face of four parts, each with its own state, that
share an ``Endpoint`` (role, limits, queued output, open/authenticated):
``AuthExchange`` (handshake.py: CHALLENGE, AUTH, AUTH_OK, BIND),
``StreamTable`` (stream_table.py: streams, windows, the receive budget),
``Keepalive`` (liveness.py: deadlines, PING and PONG) and ``FrameReader``
(reader.py: bytes into frames, each frame to the part that handles it).
Closing the connection (GOAWAY either way) is this module's own.
"""

from __future__ import annotations

from typing import Any

from shared.protocol.endpoint import Endpoint
from shared.protocol.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from shared.protocol.events import ConnectionTerminated, Event
from shared.protocol.frames import FrameType, decode_goaway, encode_goaway
from shared.protocol.handshake import AUTH_MESSAGE_PREFIX, AuthExchange, auth_message
from shared.protocol.limits import Liveness, ProtocolLimits
from shared.protocol.liveness import Keepalive
from shared.protocol.reader import FrameReader
from shared.protocol.relay_cert import RelayCertificates
from shared.protocol.report import Reports
from shared.protocol.snapshot import ConnectionSnapshot, StreamSnapshot
from shared.protocol.state import Handshake, Role
from shared.protocol.stream_table import StreamTable
from shared.protocol.streams import Stream, StreamState

__all__ = ["AUTH_MESSAGE_PREFIX", "Connection", "ConnectionSnapshot", "StreamSnapshot", "auth_message"]


def _stream_snapshot(stream: Stream) -> StreamSnapshot:
    return StreamSnapshot(stream.stream_id, stream.state, stream.local, stream.send_window, stream.recv_window,
                          stream.unacknowledged, stream.owed)


class Connection:
    """One tunnel end. Not thread-safe; drive it from one task."""

    def __init__(self, role: Role, now: float, *, limits: ProtocolLimits = ProtocolLimits(),
                 liveness: Liveness = Liveness()) -> None:
        self._endpoint = endpoint = Endpoint(role, limits)
        self._auth = auth = AuthExchange(endpoint)
        self._table = table = StreamTable(endpoint)
        self._keepalive = keepalive = Keepalive(endpoint, liveness, now)
        self._reports = reports = Reports(endpoint)
        self._relay_certs = relay_certs = RelayCertificates(endpoint)
        self._reader = FrameReader(endpoint, {
            FrameType.CHALLENGE: auth.on_challenge,
            FrameType.AUTH: auth.on_auth,
            FrameType.AUTH_OK: auth.on_auth_ok,
            FrameType.BIND: auth.on_bind,
            FrameType.BIND_RESULT: auth.on_bind_result,
            FrameType.OPEN: table.on_open,
            FrameType.ACCEPT: table.on_accept,
            FrameType.DATA: table.on_data,
            FrameType.RESET: table.on_reset,
            FrameType.WINDOW: table.on_window,
            FrameType.PING: keepalive.on_ping,
            FrameType.PONG: keepalive.on_pong,
            FrameType.GOAWAY: self._on_goaway,
            FrameType.REPORT: reports.on_report,
            FrameType.RELAY_CERT: relay_certs.on_relay_cert,
        })
        self.bytes_received = 0
        #: Seconds after which the peer's GOAWAY said to come back (FLAG_RETRY_AFTER), else None.
        self.retry_after: float | None = None

    # -- state --------------------------------------------------------------
    @property
    def role(self) -> Role:
        return self._endpoint.role

    @property
    def limits(self) -> ProtocolLimits:
        return self._endpoint.limits

    @property
    def liveness(self) -> Liveness:
        return self._keepalive.settings

    @property
    def closed(self) -> bool:
        return self._endpoint.closed

    @property
    def authenticated(self) -> bool:
        return self._endpoint.authenticated

    @property
    def handshake(self) -> Handshake:
        return self._auth.state

    @property
    def peer_info(self) -> dict[str, Any] | None:
        """The peer's AUTH (relay side, minus chain and signature) or AUTH_OK (agent side)."""
        return self._auth.peer_info

    @property
    def last_rtt(self) -> float | None:
        return self._keepalive.last_rtt

    @property
    def last_received(self) -> float:
        """The ``now`` of the last ``receive_data`` with bytes in it (construction before any)."""
        return self._keepalive.last_received

    @property
    def reports(self) -> int:
        """REPORT frames sent (agent) or received (relay)."""
        return self._reports.count

    @property
    def bytes_sent(self) -> int:
        return self._endpoint.bytes_sent

    @property
    def unsent_bytes(self) -> int:
        """Bytes queued and not yet taken by ``data_to_send``."""
        endpoint = self._endpoint
        return endpoint.bytes_sent - endpoint.bytes_taken

    @property
    def open_stream_ids(self) -> set[int]:
        return set(self._table.streams)

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete received frame held until the rest arrives."""
        return len(self._reader.pending)

    @property
    def unread_bytes(self) -> int:
        """Bytes received and not yet acknowledged by their readers (at most the receive budget).

        Streams closed both ways whose reader still lags count too, until it acknowledges or resets them.
        """
        return self._table.unread

    def snapshot(self) -> ConnectionSnapshot:
        """What this end holds now, as frozen values; two snapshots compare equal when nothing changed."""
        table = self._table
        return ConnectionSnapshot(
            role=self.role,
            handshake=self._auth.state,
            authenticated=self.authenticated,
            closed=self.closed,
            streams={sid: _stream_snapshot(s) for sid, s in table.streams.items()},
            draining={sid: _stream_snapshot(s) for sid, s in table.draining.items()},
            recently_reset=tuple(table.recently_reset),
            next_stream_id=table.next_local_id,
            peer_streams=table.peer_streams,
            binds_pending=self._auth.binds_pending,
            unread_bytes=table.unread,
            receive_budget=self.limits.receive_budget,
            queued=b"".join(bytes(part) for part in self._endpoint.out),
            buffered=self.buffered,
            bytes_sent=self.bytes_sent,
            bytes_received=self.bytes_received,
        )

    def stream_state(self, stream_id: int) -> StreamState:
        """The stream's state; CLOSED for any id not live (forgotten or never opened)."""
        return self._table.state(stream_id)

    # -- handshake -------------------------------------------------------------
    def send_challenge(self, nonce: bytes) -> None:
        """Relay: queue CHALLENGE. The auth deadline runs from construction."""
        self._auth.send_challenge(nonce)

    def send_auth(self, chain_pem: list[str], signature: bytes, extra: dict[str, Any] | None = None) -> None:
        """Agent: answer the CHALLENGE with our chain (leaf first) and signature."""
        self._auth.send_auth(chain_pem, signature, extra)

    def accept_auth(self, info: dict[str, Any]) -> None:
        """Relay: the AUTH checked out; queue AUTH_OK and open the tunnel for streams."""
        self._auth.accept_auth(info)

    def send_bind(self, services: list[str]) -> None:
        """Agent: ask the relay to route dials for these services to us."""
        self._auth.send_bind(services)

    def send_bind_result(self, bound: list[str], refused: dict[str, str]) -> None:
        """Relay: answer one BIND."""
        self._auth.send_bind_result(bound, refused)

    def send_report(self, report: dict[str, Any]) -> int:
        """Agent: queue a REPORT of itself (docs/protocol.md); returns the payload's size."""
        return self._reports.send(report)

    def send_relay_certificate(self, certificate_der: bytes, signature: bytes) -> int:
        """Relay: queue RELAY_CERT, the renewed certificate and its key's signature over
        ``relay_cert_message(nonce, sha256(certificate_der))``; returns the payload's size."""
        return self._relay_certs.send(certificate_der, signature)

    @property
    def relay_certificates(self) -> int:
        """RELAY_CERT frames sent (relay) or received (agent)."""
        return self._relay_certs.count

    # -- streams -----------------------------------------------------------------
    def open_stream(self, service: str, *, peer: str | None = None) -> int:
        """Open a stream to ``service``; returns its id. Data may be sent at once."""
        return self._table.open(service, peer)

    def accept_stream(self, stream_id: int) -> None:
        """Tell the opener that this end connected the stream."""
        self._table.accept(stream_id)

    def send_data(self, stream_id: int, data: bytes | bytearray | memoryview, *, end_stream: bool = False) -> None:
        """Queue ``data`` (at most ``send_window(stream_id)`` bytes), then FIN if ``end_stream``."""
        self._table.send_data(stream_id, data, end_stream)

    def end_stream(self, stream_id: int) -> None:
        """Half-close: this end sends no more data on the stream."""
        self._table.send_data(stream_id, b"", True)

    def reset_stream(self, stream_id: int, code: ErrorCode, reason: str = "") -> None:
        """Abort the stream both ways. Data the peer already sent is dropped quietly."""
        self._table.reset(stream_id, code, reason)

    def send_window(self, stream_id: int) -> int:
        """Bytes ``send_data`` may send now; 0 for a stream that is closed."""
        return self._table.send_window(stream_id)

    def acknowledge_received(self, stream_id: int, n: int) -> None:
        """The application consumed ``n`` received bytes; return credit in batches."""
        self._table.acknowledge(stream_id, n)

    # -- liveness ---------------------------------------------------------------
    def mark_relay_link(self) -> None:
        """This tunnel links two relays: the dialing relay names each stream's dialer in OPEN.

        The dialing relay marks its end before opening streams; the other marks
        its end only once AUTH proved the peer a relay, so a gateway never may.
        """
        self._endpoint.relay_link = True

    def set_liveness(self, liveness: Liveness) -> None:
        """Adopt new timers from now on (the relay learns the agent's keepalive at AUTH)."""
        self._keepalive.settings = liveness

    def ping(self, now: float) -> None:
        """Send a PING now, unless one is already in flight."""
        self._keepalive.ping(now)

    def get_timer(self) -> float | None:
        """When ``handle_timer`` must next be called; None when closed."""
        # The endpoint's flag, not the ``closed`` property: asked after every message, a call saved.
        return None if self._endpoint.closed else self._keepalive.next_deadline()

    def handle_timer(self, now: float) -> list[Event]:
        """Act on deadlines that passed by ``now``: PING, or end the connection."""
        if self.closed:
            return []
        reason = self._keepalive.expired(now)
        if reason is not None:
            self._close(ErrorCode.TIMEOUT, reason)
            return [ConnectionTerminated(ErrorCode.TIMEOUT, reason, remote=False)]
        self._keepalive.ping_if_due(now)
        return []

    # -- receiving ------------------------------------------------------------------
    def receive_data(self, data: bytes, now: float, *, max_frames: int | None = None) -> list[Event]:
        """Parse ``data`` (any chunking) and return the events it completes.

        With ``max_frames``, at most that many frames are handled; the rest
        waits in ``input_pending`` for the next call, which may pass ``b""``
        (new bytes go after it), so a caller can let other work run between
        slices of a message packed with tiny frames.

        Raises RemoteProtocolError when the peer broke the protocol; GOAWAY is
        queued by then and the connection is closed. Bytes after the
        connection closed are ignored.
        """
        if self._endpoint.closed:
            return []
        events: list[Event] = []
        reader = self._reader
        backlog = reader.backlog
        if not data and backlog is None:
            return events
        if data:
            self.bytes_received += len(data)
            self._keepalive.last_received = now
        if backlog is None:
            view = memoryview(data)
        else:
            reader.backlog = None
            view = backlog if not data else memoryview(backlog.tobytes() + bytes(data))
        try:
            if max_frames is None:
                reader.feed(view, events)
            else:
                reader.feed(view, events, max(1, max_frames))
        except RemoteProtocolError as exc:
            if not self.closed:
                self._close(exc.code, str(exc))
            exc.events = events
            raise
        return events

    def only_stream_data(self, data: bytes, max_frames: int) -> bool:
        """True when ``receive_data(data, max_frames=max_frames)`` can yield only ``DataReceived``,
        ``WindowUpdated``, ``StreamEnded`` and ``StreamReset`` events (or raise), and handles all of it:
        the connection is open and authenticated, ``data`` holds only DATA and WINDOW frames, at most
        ``max_frames``, and nothing is pending from before. Lets a caller handle such bytes where it
        cannot wait for anything (the frames of a request or a response)."""
        endpoint = self._endpoint
        return (not endpoint.closed and endpoint.authenticated
                and self._reader.only_stream_frames(data, max_frames))

    @property
    def input_pending(self) -> bool:
        """True when ``receive_data`` stopped at its frame limit with whole frames still to handle."""
        return self._reader.backlog is not None

    def _on_goaway(self, flags: int, stream_id: int, payload: bytes, events: list[Event]) -> None:
        decoded = decode_goaway(flags, payload)
        if decoded is None:
            raise RemoteProtocolError(ErrorCode.FRAME_SIZE_ERROR, "GOAWAY frame too short for its error code")
        code, reason, self.retry_after = decoded
        self._mark_closed()
        events.append(ConnectionTerminated(code, reason, remote=True, retry_after=self.retry_after))

    # -- closing and output -----------------------------------------------------------
    def close(self, code: ErrorCode = ErrorCode.NO_ERROR, reason: str = "", *,
              retry_after: float | None = None) -> None:
        """Queue GOAWAY and end the connection; later calls do nothing.

        ``retry_after`` (seconds, >= 0) tells the peer when to come back (a
        relay busy admitting, or stopping); LocalProtocolError for a value
        the wire cannot carry.
        """
        if not self.closed:
            try:
                flags, payload = encode_goaway(code, reason, retry_after)
            except ValueError as exc:
                raise LocalProtocolError(code, str(exc)) from None
            self._endpoint.queue_frame(FrameType.GOAWAY, flags, 0, payload)
            self._mark_closed()

    def _close(self, code: ErrorCode, reason: str) -> None:
        self.close(code, reason)

    def _mark_closed(self) -> None:
        """Closed for good: drop every table so a dead connection holds no memory."""
        self._endpoint.closed = True
        self._table.clear()
        self._reader.clear()

    @property
    def wants_to_send(self) -> bool:
        """True when ``data_to_send`` has something: a caller may skip a flush otherwise."""
        return bool(self._endpoint.out)

    def data_to_send(self) -> bytes:
        """Everything queued since the last call, in order."""
        return self._endpoint.take()
