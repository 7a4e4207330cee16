"""Received bytes into frames: check each header, hand each frame to the part that handles it.

Parsing works on the caller's buffer through a memoryview and keeps at most
one incomplete frame of its own, whose header is checked before any of its
payload is kept: an oversized or unknown frame fails at its header.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from shared.protocol.endpoint import Endpoint
from shared.protocol.errors import ErrorCode, RemoteProtocolError
from shared.protocol.events import Event
from shared.protocol.frames import (
    FRAME_TYPES,
    HANDSHAKE_FRAME_TYPES,
    HEADER,
    HEADER_SIZE,
    STREAM_FRAME_TYPES,
    FrameType,
)

#: What handles one received frame: (flags, stream id, payload, events to append to).
FrameHandler = Callable[[int, int, bytes, list[Event]], None]
#: DATA's handler, which may be given a view (``VIEW_SHARE``).
DataHandler = Callable[[int, int, "bytes | memoryview", list[Event]], None]

_DATA = int(FrameType.DATA)
_WINDOW = int(FrameType.WINDOW)
_unpack_header = HEADER.unpack_from
#: ``feed``'s frame limit when the caller sets none: more frames than any buffer holds.
_NO_LIMIT = 1 << 62
#: A DATA payload is handed on as a view into the received chunk (not copied) when it is at least this
#: share of the chunk (1/4): a view keeps its whole chunk alive until passed on, so one kept somewhere
#: holds at most 4x its own size, while the 64 KiB frames of bulk data in 256 KiB reads are never copied.
VIEW_SHARE = 4


class FrameReader:
    """Cuts a byte stream into frames for ``handlers``, one per frame type."""

    def __init__(self, endpoint: Endpoint, handlers: dict[FrameType, FrameHandler]) -> None:
        missing = set(FrameType) - set(handlers)
        assert not missing, f"no handler for {sorted(missing)}"
        self._endpoint = endpoint
        self._handlers = handlers
        self._on_data = cast(DataHandler, handlers[FrameType.DATA])  # the hot path skips the dispatch below
        #: an incomplete frame, never more than one
        self.pending = bytearray()
        #: whole frames not handled yet because a call reached its frame limit, and what follows them
        self.backlog: memoryview | None = None

    def clear(self) -> None:
        self.pending = bytearray()
        self.backlog = None

    def feed(self, view: memoryview, events: list[Event], max_frames: int = _NO_LIMIT) -> None:
        """Handle the whole frames of ``view``, at most ``max_frames``; keep the incomplete rest.

        Bytes past the frame limit stay in ``backlog`` for the next call, not
        copied while ``view`` is over immutable bytes. Stops once the connection closed.
        """
        endpoint = self._endpoint
        end = len(view)
        pos = 0
        frames = 0
        pending = self.pending
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
            self.pending = bytearray()
            self._dispatch(frame_type, flags, stream_id, bytes(pending[HEADER_SIZE:]), events)
            if endpoint.closed:
                return
            frames = 1
        on_data = self._on_data
        # The checks of a DATA header inlined (``_check_header`` says why for any other): one call saved per frame.
        max_data = endpoint.limits.max_frame_payload
        # Views only into bytes nobody changes: the caller's chunk, never a buffer of ours.
        whole = len(view.obj) if type(view.obj) is bytes else _NO_LIMIT
        while end - pos >= HEADER_SIZE:
            if frames >= max_frames:
                self.backlog = view[pos:] if isinstance(view.obj, bytes) else memoryview(view[pos:].tobytes())
                return
            frames += 1
            frame_type, flags, stream_id, length = _unpack_header(view, pos)
            if frame_type != _DATA or length > max_data or stream_id == 0:
                frame_type, flags, stream_id, length = self._check_header(view, pos)
            start = pos + HEADER_SIZE
            stop = start + length
            if stop > end:
                break
            pos = stop
            if frame_type == _DATA and endpoint.authenticated:
                on_data(flags, stream_id, view[start:stop] if length * VIEW_SHARE >= whole else
                        view[start:stop].tobytes(), events)
            else:
                self._dispatch(frame_type, flags, stream_id, view[start:stop].tobytes(), events)
                if endpoint.closed:
                    return
        if pos < end:
            self.pending = bytearray(view[pos:])

    def only_stream_frames(self, data: bytes, max_frames: int) -> bool:
        """True when ``data`` holds nothing but DATA and WINDOW frames (the last may be incomplete), at most
        ``max_frames``, and nothing is left from before: feeding it yields only stream data events."""
        if self.pending or self.backlog is not None:
            return False
        end = len(data)
        pos = 0
        frames = 0
        while end - pos >= HEADER_SIZE:
            frame_type, _, _, length = _unpack_header(data, pos)
            frames += 1
            if (frame_type != _DATA and frame_type != _WINDOW) or frames > max_frames:
                return False
            pos += HEADER_SIZE + length
        return True

    def _check_header(self, buffer: Any, offset: int) -> tuple[int, int, int, int]:
        frame_type, flags, stream_id, length = _unpack_header(buffer, offset)
        limits = self._endpoint.limits
        if frame_type == _DATA:
            if length > limits.max_frame_payload:
                raise RemoteProtocolError(ErrorCode.FRAME_SIZE_ERROR,
                                          f"DATA frame of {length} bytes exceeds {limits.max_frame_payload}")
            if stream_id == 0:
                raise RemoteProtocolError(ErrorCode.PROTOCOL_ERROR, "DATA frame on stream 0")
            return frame_type, flags, stream_id, length
        kind = FRAME_TYPES.get(frame_type)
        if kind is None:
            raise RemoteProtocolError(ErrorCode.PROTOCOL_ERROR, f"unknown frame type 0x{frame_type:02x}")
        if length > limits.max_control_payload:
            raise RemoteProtocolError(ErrorCode.FRAME_SIZE_ERROR,
                                      f"{kind.name} frame of {length} bytes exceeds {limits.max_control_payload}")
        if (kind in STREAM_FRAME_TYPES) != (stream_id != 0):
            where = "stream 0" if stream_id == 0 else f"stream {stream_id}"
            raise RemoteProtocolError(ErrorCode.PROTOCOL_ERROR, f"{kind.name} frame on {where}")
        return frame_type, flags, stream_id, length

    def _dispatch(self, frame_type: int, flags: int, stream_id: int, payload: bytes, events: list[Event]) -> None:
        kind = FrameType(frame_type)
        if not self._endpoint.authenticated and kind not in HANDSHAKE_FRAME_TYPES:
            raise RemoteProtocolError(ErrorCode.PROTOCOL_ERROR, f"{kind.name} frame before authentication")
        self._handlers[kind](flags, stream_id, payload, events)
