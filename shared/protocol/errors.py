"""Error codes carried on the wire, and the two ways the protocol can fail.

``RemoteProtocolError``: the peer broke the protocol. ``LocalProtocolError``:
this process called the API wrongly (a bug in the caller, or a race it must
handle, such as writing to a stream the peer has just reset).
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

from shared.errors import OutpostError

if TYPE_CHECKING:  # events.py imports this module's ErrorCode
    from shared.protocol.events import Event


class ErrorCode(enum.IntEnum):
    """Codes in RESET and GOAWAY frames (docs/protocol.md, "Error codes")."""

    NO_ERROR = 0
    PROTOCOL_ERROR = 1
    INTERNAL_ERROR = 2
    FLOW_CONTROL_ERROR = 3
    STREAM_CLOSED = 4
    FRAME_SIZE_ERROR = 5
    REFUSED_STREAM = 6
    CANCEL = 7
    AUTH_FAILED = 8
    POLICY_DENIED = 9
    SERVICE_UNKNOWN = 10
    SERVICE_UNAVAILABLE = 11
    REVOKED = 12
    UNSUPPORTED_VERSION = 13
    TIMEOUT = 14
    CONNECT_FAILED = 15
    #: The identity is disabled (it may be enabled again): unlike REVOKED, the agent keeps asking, slowly.
    DISABLED = 16

    @classmethod
    def from_wire(cls, value: int) -> ErrorCode:
        """The code for a received integer; codes from a newer peer read as INTERNAL_ERROR."""
        try:
            return cls(value)
        except ValueError:
            return cls.INTERNAL_ERROR


class ProtocolError(OutpostError):
    """The tunnel protocol was broken; ``code`` says how, ``str()`` says in words."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class RemoteProtocolError(ProtocolError):
    """The peer misbehaved. GOAWAY is already queued and the connection is closed.

    ``events`` holds what the same ``receive_data`` call produced before the
    violation, in case the caller wants to act on it (it usually does not).
    """

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(code, message)
        self.events: list[Event] = []


class LocalProtocolError(ProtocolError):
    """The caller used the API wrongly; the connection's state is unchanged."""


class StreamClosedError(LocalProtocolError):
    """The stream is already closed (reset by either side, or ended both ways)."""

    def __init__(self, stream_id: int) -> None:
        super().__init__(ErrorCode.STREAM_CLOSED, f"stream {stream_id} is closed")
        self.stream_id = stream_id
