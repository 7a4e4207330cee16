"""What every part of one tunnel end shares: its role and limits, the bytes it queued, and how far it got.

The handshake (``handshake.py``), the streams (``stream_table.py``) and the
timers (``liveness.py``) each keep their own state and read or write only
this much of the connection's; ``Connection`` (``connection.py``) builds one
``Endpoint`` and hands it to each of them.
"""

from __future__ import annotations

from typing import Any

from shared.protocol.errors import ErrorCode, LocalProtocolError
from shared.protocol.frames import FrameType, encode_frame, encode_json
from shared.protocol.limits import INITIAL_WINDOW, ProtocolLimits
from shared.protocol.state import Role


def require(condition: bool, message: str) -> None:
    """Refuse the caller's misuse (never the peer's: that is RemoteProtocolError)."""
    if not condition:
        raise LocalProtocolError(ErrorCode.PROTOCOL_ERROR, message)


class Endpoint:
    """One end of a tunnel as each of its parts sees it."""

    __slots__ = ("role", "limits", "out", "bytes_sent", "bytes_taken", "closed", "authenticated", "peer_window",
                 "relay_link")

    def __init__(self, role: Role, limits: ProtocolLimits) -> None:
        self.role = role
        self.limits = limits
        #: what ``take`` returns next: whole frames, or a DATA header and its payload, in order
        self.out: list[Any] = []
        self.bytes_sent = 0
        #: of bytes_sent, those ``take`` handed on: the rest is still in ``out``
        self.bytes_taken = 0
        self.closed = False
        self.authenticated = False
        #: the window every new stream may send into, as the peer's AUTH/AUTH_OK advertised it
        self.peer_window = INITIAL_WINDOW
        #: a link between two relays: the dialing relay names each stream's dialer in OPEN
        self.relay_link = False

    def queue_frame(self, frame_type: FrameType, flags: int, stream_id: int, payload: bytes) -> None:
        frame = encode_frame(frame_type, flags, stream_id, payload)
        self.out.append(frame)
        self.bytes_sent += len(frame)

    def control_payload(self, frame: str, body: Any) -> bytes:
        """``body`` as the JSON payload of ``frame``, within the control payload limit."""
        try:
            payload = encode_json(body)
        except (TypeError, ValueError) as exc:
            raise LocalProtocolError(ErrorCode.INTERNAL_ERROR, f"{frame} payload is not JSON: {exc}") from None
        require(len(payload) <= self.limits.max_control_payload,
                f"{frame} payload of {len(payload)} bytes exceeds {self.limits.max_control_payload}")
        return payload

    def take(self) -> bytes:
        """Everything queued since the last call, in order."""
        if not self.out:
            return b""
        data = b"".join(self.out)
        self.out.clear()
        self.bytes_taken = self.bytes_sent
        return data

    def require_open(self) -> None:
        require(not self.closed, "the tunnel is closed")

    def require_ready(self) -> None:
        self.require_open()
        require(self.authenticated, "the tunnel is not authenticated yet")
