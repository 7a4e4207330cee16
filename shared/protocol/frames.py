"""The frame layout of docs/protocol.md: a 10-byte header, then the payload.

Only encoding helpers and fixed-layout payload codecs live here; which frame
is legal when is the connection's business.
"""

from __future__ import annotations

import enum
import json
import struct
from typing import Any

from shared.protocol.errors import ErrorCode
from shared.protocol.limits import MAX_REASON_BYTES

# type u8, flags u8, stream id u32, payload length u32; big-endian.
HEADER = struct.Struct(">BBII")
HEADER_SIZE = HEADER.size
U32 = struct.Struct(">I")
PING_COUNTER = struct.Struct(">Q")

FLAG_FIN = 0x01
#: On GOAWAY: a u32 come-back time in milliseconds follows the error code (docs/protocol.md, "Coming back").
FLAG_RETRY_AFTER = 0x02
#: The longest come-back time the wire carries: u32 milliseconds (49 days); the agent clamps far below.
MAX_RETRY_AFTER_MS = 2**32 - 1


class FrameType(enum.IntEnum):
    CHALLENGE = 0x01
    AUTH = 0x02
    AUTH_OK = 0x03
    OPEN = 0x04
    ACCEPT = 0x05
    DATA = 0x06
    RESET = 0x07
    WINDOW = 0x08
    PING = 0x09
    PONG = 0x0A
    GOAWAY = 0x0B
    BIND = 0x0C
    BIND_RESULT = 0x0D
    #: the agent's report of itself (agent -> relay); refused alone, never the tunnel, when bad
    REPORT = 0x0E
    #: the relay's renewed certificate, bound to this tunnel (relay -> agent); refused alone when unreadable
    RELAY_CERT = 0x0F


# Frames that belong to a stream (stream id > 0); all others use stream 0.
STREAM_FRAME_TYPES = frozenset({FrameType.OPEN, FrameType.ACCEPT, FrameType.DATA, FrameType.RESET, FrameType.WINDOW})
# Frames allowed before authentication completes.
HANDSHAKE_FRAME_TYPES = frozenset({FrameType.CHALLENGE, FrameType.AUTH, FrameType.AUTH_OK, FrameType.GOAWAY})
# A plain dict lookup on the hot path; IntEnum construction is slower and raises.
FRAME_TYPES: dict[int, FrameType] = {int(t): t for t in FrameType}


def encode_frame(frame_type: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    """One whole frame."""
    return HEADER.pack(frame_type, flags, stream_id, len(payload)) + payload


def encode_json(obj: Any) -> bytes:
    """Compact UTF-8 JSON; raises TypeError/ValueError for what JSON cannot hold."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def truncate_reason(reason: str) -> bytes:
    """UTF-8 of ``reason``, cut to MAX_REASON_BYTES on a character boundary."""
    raw = reason.encode("utf-8", "replace")
    if len(raw) <= MAX_REASON_BYTES:
        return raw
    return raw[:MAX_REASON_BYTES].decode("utf-8", "ignore").encode("utf-8")


def encode_code_reason(code: ErrorCode, reason: str) -> bytes:
    """RESET and GOAWAY payload: u32 code, UTF-8 reason."""
    return U32.pack(int(code)) + truncate_reason(reason)


def encode_goaway(code: ErrorCode, reason: str, retry_after: float | None = None) -> tuple[int, bytes]:
    """(flags, payload) of a GOAWAY; ``retry_after`` (seconds, finite, >= 0) sets FLAG_RETRY_AFTER."""
    if retry_after is None:
        return 0, encode_code_reason(code, reason)
    if not 0.0 <= retry_after < float("inf"):  # also false for NaN
        raise ValueError(f"a come-back time must be a finite number of seconds >= 0, not {retry_after!r}")
    millis = min(MAX_RETRY_AFTER_MS, round(retry_after * 1000))
    return FLAG_RETRY_AFTER, U32.pack(int(code)) + U32.pack(millis) + truncate_reason(reason)


def goaway_frame(code: ErrorCode, reason: str, retry_after: float | None = None) -> bytes:
    """One whole GOAWAY frame: what a relay sends instead of CHALLENGE when it refuses a tunnel unread."""
    flags, payload = encode_goaway(code, reason, retry_after)
    return encode_frame(FrameType.GOAWAY, flags, 0, payload)


def decode_goaway(flags: int, payload: bytes) -> tuple[ErrorCode, str, float | None] | None:
    """(code, reason, retry_after seconds or None) of a GOAWAY; None when the payload is too short for its flags."""
    if not flags & FLAG_RETRY_AFTER:
        return (*decode_code_reason(payload), None) if len(payload) >= U32.size else None
    if len(payload) < 2 * U32.size:
        return None
    (code,) = U32.unpack_from(payload, 0)
    (millis,) = U32.unpack_from(payload, U32.size)
    reason = payload[2 * U32.size:].decode("utf-8", "replace")
    return ErrorCode.from_wire(code), reason, millis / 1000


def decode_code_reason(payload: bytes) -> tuple[ErrorCode, str]:
    """Inverse of encode_code_reason; the caller checked len(payload) >= 4."""
    (code,) = U32.unpack_from(payload, 0)
    return ErrorCode.from_wire(code), payload[U32.size:].decode("utf-8", "replace")
