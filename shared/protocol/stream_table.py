"""The streams of one tunnel: ids, states, windows, and the unread bytes of them all.

Each stream moves through the transition table of ``streams.py``; this
part keeps the table of live streams, allocates ids, charges and returns
flow-control credit, holds the tunnel's receive budget, and handles the
stream frames (OPEN, ACCEPT, DATA, RESET, WINDOW) in both directions.

A stream closed both ways (FIN each way) while its reader still holds bytes
it has not acknowledged is closed on the wire but not yet gone: it stays in
``draining`` until the reader acknowledges the rest (or resets it), and
until then its bytes count against the receive budget and, when the peer
opened it, against the peer's open streams, because the application still
holds both the bytes and the stream.
"""

from __future__ import annotations

import collections
import itertools
from typing import Any

from shared.protocol.control import decode_open
from shared.protocol.endpoint import Endpoint, require
from shared.protocol.errors import ErrorCode, LocalProtocolError, RemoteProtocolError, StreamClosedError
from shared.protocol.events import (
    DataReceived,
    Event,
    StreamAccepted,
    StreamEnded,
    StreamOpened,
    StreamReset,
    WindowUpdated,
)
from shared.protocol.frames import FLAG_FIN, HEADER, HEADER_SIZE, U32, FrameType, decode_code_reason, encode_code_reason
from shared.protocol.limits import MAX_STREAM_ID, MAX_WINDOW, RESET_MEMORY
from shared.protocol.state import Role
from shared.protocol.streams import STREAM_TABLE, Stream, StreamInput, StreamState

_DATA = int(FrameType.DATA)
_RECV_DATA = StreamInput.RECV_DATA
_SEND_DATA = StreamInput.SEND_DATA
_RECV_FIN = StreamInput.RECV_FIN
_SEND_WINDOW = StreamInput.SEND_WINDOW
_CLOSED = StreamState.CLOSED
_STREAM_ROWS = STREAM_TABLE.rows


def _is_count(n: Any) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 0


class StreamTable:
    """Every live stream of one tunnel end, by id."""

    def __init__(self, endpoint: Endpoint) -> None:
        self._endpoint = endpoint
        self.streams: dict[int, Stream] = {}
        self.next_local_id = 1 if endpoint.role is Role.AGENT else 2
        self._peer_parity = 0 if endpoint.role is Role.AGENT else 1  # relay opens even ids, agent odd
        self._highest_peer_id = 0
        #: streams the peer opened, live or draining, against limits.max_streams
        self.peer_streams = 0
        #: streams closed both ways whose reader has not acknowledged all it got, by id
        self.draining: dict[int, Stream] = {}
        #: unacknowledged bytes of live and draining streams, against limits.receive_budget
        self.unread = 0
        self.recently_reset: collections.OrderedDict[int, None] = collections.OrderedDict()

    def state(self, stream_id: int) -> StreamState:
        stream = self.streams.get(stream_id)
        return StreamState.CLOSED if stream is None else stream.state

    def clear(self) -> None:
        """The tunnel closed: a dead connection holds no memory."""
        self.streams.clear()
        self.draining.clear()
        self.unread = 0
        self.recently_reset.clear()

    # -- sent ----------------------------------------------------------------
    def open(self, service: str, peer: str | None) -> int:
        endpoint = self._endpoint
        endpoint.require_ready()
        require(isinstance(service, str) and bool(service), "the service name must be a non-empty string")
        require(peer is None or endpoint.role is Role.RELAY or endpoint.relay_link, "only the relay names the dialing peer")
        stream_id = self.next_local_id
        require(stream_id <= MAX_STREAM_ID, "this tunnel has used up its stream ids; reconnect")
        body: dict[str, Any] = {"service": service}
        if peer is not None:
            body["peer"] = peer
        payload = endpoint.control_payload("OPEN", body)
        stream = Stream(stream_id, local=True, send_window=endpoint.peer_window,
                        recv_window=endpoint.limits.initial_window)
        stream.state = stream.take(StreamInput.SEND_OPEN)
        self.streams[stream_id] = stream
        self.next_local_id += 2
        endpoint.queue_frame(FrameType.OPEN, 0, stream_id, payload)
        return stream_id

    def accept(self, stream_id: int) -> None:
        stream = self._live(stream_id)
        require(not stream.local, f"stream {stream_id} was opened by this end; the peer accepts it")
        stream.state = stream.take(StreamInput.SEND_ACCEPT)
        self._endpoint.queue_frame(FrameType.ACCEPT, 0, stream_id, b"")

    def send_data(self, stream_id: int, data: bytes | bytearray | memoryview, end_stream: bool) -> None:
        # ``_live`` and ``Stream.take`` inlined for the case that passes; each refusal still goes through
        # them for its sentence. Two calls saved on every message sent.
        endpoint = self._endpoint
        stream = self.streams.get(stream_id) if endpoint.authenticated and not endpoint.closed else None
        if stream is None:
            stream = self._live(stream_id)
        size = len(data)
        if size > stream.send_window:
            raise LocalProtocolError(
                ErrorCode.FLOW_CONTROL_ERROR,
                f"{size} bytes exceed stream {stream_id}'s send window of {stream.send_window}; "
                "wait for WindowUpdated",
            )
        new_state = _STREAM_ROWS.get((stream.state, _SEND_DATA))
        if new_state is None:
            new_state = stream.take(_SEND_DATA)
        if end_stream:
            new_state = stream.take(StreamInput.SEND_FIN, new_state)
        if not size and not end_stream:
            return
        if type(data) is not bytes and not (type(data) is memoryview and type(data.obj) is bytes):
            data = bytes(data)  # the caller may reuse its buffer before we are flushed; a view of bytes is fixed
        out = endpoint.out
        chunk = endpoint.limits.max_send_payload
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
        endpoint.bytes_sent += size + frames * HEADER_SIZE
        stream.send_window -= size
        stream.state = new_state
        if new_state is StreamState.CLOSED:
            self._ended_both_ways(stream)

    def reset(self, stream_id: int, code: ErrorCode, reason: str) -> None:
        draining = self.draining.get(stream_id)
        if draining is not None:
            # Closed on the wire already: nothing to send, only the bytes its reader drops to release.
            self._release(draining)
            return
        stream = self._live(stream_id)
        stream.take(StreamInput.SEND_RESET)
        self._forget(stream)
        self._send_reset(stream_id, code, reason)

    def send_window(self, stream_id: int) -> int:
        stream = self.streams.get(stream_id)
        if stream is not None:
            return stream.send_window
        require(self._was_opened(stream_id), f"stream {stream_id} was never opened")
        return 0

    def acknowledge(self, stream_id: int, n: int) -> None:
        # Checked inline, the sentences formatted only for a refusal: this runs for every message read.
        if not (type(n) is int and n >= 0) and not _is_count(n):
            raise LocalProtocolError(ErrorCode.PROTOCOL_ERROR, "the acknowledged byte count must be a non-negative integer")
        stream = self.streams.get(stream_id) or self.draining.get(stream_id)
        if stream is None or self._endpoint.closed:
            return  # reset streams need no credit; their data is accounted for
        if n > stream.unacknowledged:
            raise LocalProtocolError(ErrorCode.PROTOCOL_ERROR,
                                     f"stream {stream_id} has only {stream.unacknowledged} unacknowledged bytes, not {n}")
        stream.unacknowledged -= n
        self.unread -= n
        if stream.state is _CLOSED:
            if not stream.unacknowledged:
                self._release(stream)
            return  # closed both ways: no credit to return
        stream.owed += n
        # Batching halves the WINDOW frames at the cost of half a window of
        # slack; a window covers the bandwidth-delay product twice over.
        if stream.owed >= self._endpoint.limits.initial_window // 2 and STREAM_TABLE.allows(stream.state, _SEND_WINDOW):
            increment, stream.owed = stream.owed, 0
            stream.recv_window += increment
            self._endpoint.queue_frame(FrameType.WINDOW, 0, stream_id, U32.pack(increment))

    # -- received (frame handlers: flags, stream id, payload, events) ----------------
    def on_data(self, flags: int, stream_id: int, payload: bytes | memoryview, events: list[Event]) -> None:
        stream = self.streams.get(stream_id)
        if stream is None:
            self._data_without_stream(stream_id)
            return
        # ``_take_received`` inlined for a DATA the stream's state allows: two calls saved per frame.
        new_state = _STREAM_ROWS.get((stream.state, _RECV_DATA))
        if new_state is None:
            new_state = self._take_received(stream, _RECV_DATA, events)
            if new_state is None:
                return
        size = len(payload)
        if size > stream.recv_window:
            raise RemoteProtocolError(
                ErrorCode.FLOW_CONTROL_ERROR,
                f"{size} bytes of DATA exceed stream {stream_id}'s window of {stream.recv_window}",
            )
        if size:
            stream.recv_window -= size
            stream.unacknowledged += size
            self.unread += size
            events.append(DataReceived(stream_id, payload))
            if self.unread > self._endpoint.limits.receive_budget:
                self._shed_slowest_reader(events)
                if stream.state is _CLOSED:
                    return  # this very stream was the slowest
        if flags & FLAG_FIN:
            new_state = self._take_received(stream, _RECV_FIN, events, new_state)
            if new_state is None:
                return
            events.append(StreamEnded(stream_id))
            stream.state = new_state
            if new_state is _CLOSED:
                self._ended_both_ways(stream)
        else:
            stream.state = new_state

    def on_open(self, flags: int, stream_id: int, payload: bytes, events: list[Event]) -> None:
        if stream_id % 2 != self._peer_parity:
            raise RemoteProtocolError(ErrorCode.PROTOCOL_ERROR,
                                      f"the peer opened stream {stream_id}, an id of this end's parity")
        if stream_id <= self._highest_peer_id:
            raise RemoteProtocolError(
                ErrorCode.PROTOCOL_ERROR,
                f"the peer opened stream {stream_id} after {self._highest_peer_id}; ids must increase",
            )
        endpoint = self._endpoint
        service, peer = decode_open(payload, peer_allowed=endpoint.role is Role.AGENT or endpoint.relay_link)
        self._highest_peer_id = stream_id
        limits = endpoint.limits
        if self.peer_streams >= limits.max_streams:
            self._send_reset(stream_id, ErrorCode.REFUSED_STREAM, f"this end allows {limits.max_streams} open streams")
            return
        stream = Stream(stream_id, local=False, send_window=endpoint.peer_window, recv_window=limits.initial_window)
        stream.state = stream.take(StreamInput.RECV_OPEN)
        self.streams[stream_id] = stream
        self.peer_streams += 1
        events.append(StreamOpened(stream_id, service, peer))

    def on_accept(self, flags: int, stream_id: int, payload: bytes, events: list[Event]) -> None:
        if payload:
            raise RemoteProtocolError(ErrorCode.FRAME_SIZE_ERROR, "ACCEPT frame with a payload")
        stream = self._known_stream("ACCEPT", stream_id)
        if stream is None:
            return
        if not stream.local:
            self._stream_error(stream, ErrorCode.PROTOCOL_ERROR, "the peer accepted a stream it opened itself", events)
            return
        new_state = self._take_received(stream, StreamInput.RECV_ACCEPT, events)
        if new_state is None:
            return
        stream.state = new_state
        events.append(StreamAccepted(stream_id))

    def on_reset(self, flags: int, stream_id: int, payload: bytes, events: list[Event]) -> None:
        if len(payload) < U32.size:
            raise RemoteProtocolError(ErrorCode.FRAME_SIZE_ERROR, "RESET frame without an error code")
        stream = self._known_stream("RESET", stream_id)
        if stream is None:
            return
        code, reason = decode_code_reason(payload)
        stream.take(StreamInput.RECV_RESET)  # legal in every live state: a broken table fails here, not quietly
        self._forget(stream)
        events.append(StreamReset(stream_id, code, reason, remote=True))

    def on_window(self, flags: int, stream_id: int, payload: bytes, events: list[Event]) -> None:
        if len(payload) != U32.size:
            raise RemoteProtocolError(ErrorCode.FRAME_SIZE_ERROR, f"WINDOW frame of {len(payload)} bytes, not 4")
        (increment,) = U32.unpack(payload)
        if increment == 0:
            raise RemoteProtocolError(ErrorCode.PROTOCOL_ERROR, f"WINDOW of 0 on stream {stream_id}")
        stream = self._known_stream("WINDOW", stream_id)
        if stream is None:
            return
        window = stream.send_window + increment
        if window > MAX_WINDOW:
            raise RemoteProtocolError(ErrorCode.FLOW_CONTROL_ERROR, f"WINDOW grows stream {stream_id} past {MAX_WINDOW}")
        new_state = self._take_received(stream, StreamInput.RECV_WINDOW, events)
        if new_state is None:
            return
        stream.state = new_state
        stream.send_window = window
        events.append(WindowUpdated(stream_id, window))

    # -- internals -------------------------------------------------------------------
    def _was_opened(self, stream_id: int) -> bool:
        """True for an id either end has used (live or closed since)."""
        if stream_id <= 0:
            return False
        if stream_id % 2 == self._peer_parity:
            return stream_id <= self._highest_peer_id
        return stream_id < self.next_local_id

    def _live(self, stream_id: int) -> Stream:
        endpoint = self._endpoint
        if endpoint.closed or not endpoint.authenticated:
            endpoint.require_ready()  # raises the sentence that says which; three calls saved per message
        stream = self.streams.get(stream_id)
        if stream is None:
            if self._was_opened(stream_id):
                raise StreamClosedError(stream_id)
            raise LocalProtocolError(ErrorCode.PROTOCOL_ERROR, f"stream {stream_id} was never opened")
        return stream

    def _take_received(self, stream: Stream, stream_input: StreamInput, events: list[Event],
                       state: StreamState | None = None) -> StreamState | None:
        """The peer's input through the table; an illegal one resets only this stream (None then)."""
        try:
            return stream.take(stream_input, state)
        except RemoteProtocolError as exc:
            self._stream_error(stream, exc.code, str(exc), events)
            return None

    def _known_stream(self, kind: str, stream_id: int) -> Stream | None:
        """The live stream, or None for a closed one (frames in flight are ignored)."""
        stream = self.streams.get(stream_id)
        if stream is None and not self._was_opened(stream_id):
            raise RemoteProtocolError(ErrorCode.PROTOCOL_ERROR, f"{kind} on stream {stream_id}, which was never opened")
        return stream

    def _data_without_stream(self, stream_id: int) -> None:
        if not self._was_opened(stream_id):
            raise RemoteProtocolError(ErrorCode.PROTOCOL_ERROR, f"DATA on stream {stream_id}, which was never opened")
        if stream_id in self.recently_reset:
            return  # sent before the peer saw our RESET
        # The peer writes on a stream it ended or reset: tell it once, then drop.
        self._send_reset(stream_id, ErrorCode.STREAM_CLOSED, "DATA on a closed stream")

    def _shed_slowest_reader(self, events: list[Event]) -> None:
        """Over the receive budget: reset the stream whose reader is furthest behind, live or draining."""
        slowest = max(itertools.chain(self.streams.values(), self.draining.values()), key=lambda s: s.unacknowledged)
        reason = (f"its reader fell {slowest.unacknowledged} bytes behind; this end holds at most "
                  f"{self._endpoint.limits.receive_budget} unread bytes for all streams of the tunnel")
        if slowest.state is _CLOSED:
            # The peer forgot it already: only this end's reader hears of it, and drops what it holds.
            self._release(slowest)
            events.append(StreamReset(slowest.stream_id, ErrorCode.CANCEL, reason, remote=False))
        else:
            self._stream_error(slowest, ErrorCode.CANCEL, reason, events)

    def _stream_error(self, stream: Stream, code: ErrorCode, reason: str, events: list[Event]) -> None:
        self._forget(stream)
        self._send_reset(stream.stream_id, code, reason)
        events.append(StreamReset(stream.stream_id, code, reason, remote=False))

    def _send_reset(self, stream_id: int, code: ErrorCode, reason: str) -> None:
        """Queue RESET and drop quietly whatever the peer still had in flight."""
        self._endpoint.queue_frame(FrameType.RESET, 0, stream_id, encode_code_reason(code, reason))
        self.recently_reset[stream_id] = None
        if len(self.recently_reset) > RESET_MEMORY:
            self.recently_reset.popitem(last=False)

    def _ended_both_ways(self, stream: Stream) -> None:
        """FIN each way: closed on the wire; held in ``draining`` while its reader lags."""
        if not stream.unacknowledged:
            self._forget(stream)
            return
        stream.state = StreamState.CLOSED
        del self.streams[stream.stream_id]
        self.draining[stream.stream_id] = stream

    def _forget(self, stream: Stream) -> None:
        stream.state = StreamState.CLOSED
        del self.streams[stream.stream_id]
        self._release(stream)

    def _release(self, stream: Stream) -> None:
        """The stream and its unread bytes leave this end for good."""
        self.draining.pop(stream.stream_id, None)
        self.unread -= stream.unacknowledged
        stream.unacknowledged = 0
        if not stream.local:
            self.peer_streams -= 1
