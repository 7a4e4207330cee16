"""The two ways the protocol can fail, and a limit that cannot work.

``RemoteProtocolError``: the peer broke the protocol. ``LocalProtocolError``:
this process called the API wrongly (a bug in the caller, or a race it must
handle, such as writing to a stream the peer has just reset).
"""

from __future__ import annotations

from shared.protocol.codes import ErrorCode
from shared.protocol.events import Event

__all__ = ["ErrorCode", "InvalidLimits", "LocalProtocolError", "ProtocolError", "RemoteProtocolError",
           "StreamClosedError"]


class ProtocolError(Exception):
    """The tunnel protocol was broken; ``code`` says how, ``str()`` says in words.

    Not an ``OutpostError``: the core is a library of its own, and the glue
    that runs it decides which of the application's errors a user reads.
    """

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return self.message


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


class InvalidLimits(ValueError):
    """A ``ProtocolLimits`` or ``Liveness`` value that cannot work; ``str()`` says which and why."""
