"""The error codes carried on the wire in RESET and GOAWAY frames."""

from __future__ import annotations

import enum


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
    #: The relay is admitting as many tunnels as it can: come back after the GOAWAY's retry_after.
    BUSY = 17

    @classmethod
    def from_wire(cls, value: int) -> ErrorCode:
        """The code for a received integer; codes from a newer peer read as INTERNAL_ERROR."""
        try:
            return cls(value)
        except ValueError:
            return cls.INTERNAL_ERROR
