"""What ``Connection.receive_data`` and ``handle_timer`` report: things that happened."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shared.protocol.codes import ErrorCode


@dataclass(frozen=True)
class ChallengeReceived:
    """Agent side: the relay's CHALLENGE; sign ``auth_message(nonce, ...)``."""

    version: int
    nonce: bytes


@dataclass(frozen=True)
class AuthReceived:
    """Relay side: the agent's AUTH. ``info`` is the AUTH JSON without chain and signature."""

    chain: tuple[str, ...]
    signature: bytes
    info: dict[str, Any]


@dataclass(frozen=True)
class Authenticated:
    """Agent side: the relay accepted us; ``info`` is the AUTH_OK JSON."""

    info: dict[str, Any]


@dataclass(frozen=True)
class BindRequested:
    """Relay side: the agent asks to host these services."""

    services: tuple[str, ...]


@dataclass(frozen=True)
class BindCompleted:
    """Agent side: the relay's answer to BIND."""

    bound: tuple[str, ...]
    refused: dict[str, str]


@dataclass(frozen=True)
class StreamOpened:
    """The peer opened a stream to ``service``; ``peer`` is the dialer (relay to binder only)."""

    stream_id: int
    service: str
    peer: str | None


@dataclass(frozen=True)
class StreamAccepted:
    """The far end connected a stream this end opened."""

    stream_id: int


@dataclass(frozen=True)
class DataReceived:
    """Bytes on a stream; pass their count to ``acknowledge_received`` once consumed.

    A large payload is a read-only view into the received chunk (no copy):
    pass it on at once, or take ``bytes(data)`` to keep it, so that a kept
    payload never holds a chunk many times its size.
    """

    stream_id: int
    data: bytes | memoryview


@dataclass(frozen=True)
class StreamEnded:
    """The peer half-closed the stream: no more data will come from it."""

    stream_id: int


@dataclass(frozen=True)
class StreamReset:
    """The stream is gone: reset by the peer (``remote``) or by this end for the peer's fault."""

    stream_id: int
    code: ErrorCode
    reason: str
    remote: bool


@dataclass(frozen=True)
class WindowUpdated:
    """The peer granted credit; ``window`` is the stream's send window now."""

    stream_id: int
    window: int


@dataclass(frozen=True)
class PongReceived:
    """The answer to our PING came back after ``rtt`` seconds."""

    rtt: float


@dataclass(frozen=True)
class ReportReceived:
    """Relay side: the agent's REPORT. ``report`` is the checked fields, or None and ``refused`` says why.

    A refused report harms nothing else: the tunnel and its streams carry on.
    """

    report: dict[str, Any] | None
    refused: str | None
    size: int


@dataclass(frozen=True)
class RelayCertificateOffered:
    """Agent side: the relay's RELAY_CERT, its renewed certificate (DER) and the signature binding it to
    this tunnel; the glue judges both. ``refused`` says why a push could not be read (the rest is then empty).

    A refused push harms nothing else: the tunnel carries on to the old certificate's end.
    """

    certificate: bytes
    signature: bytes
    refused: str | None


@dataclass(frozen=True)
class ConnectionTerminated:
    """The tunnel is over: GOAWAY from the peer (``remote``) or a local timeout."""

    code: ErrorCode
    reason: str
    remote: bool
    #: Seconds after which the peer (a relay) said to come back (GOAWAY's FLAG_RETRY_AFTER), else None.
    retry_after: float | None = None


Event = (
    ChallengeReceived | AuthReceived | Authenticated | BindRequested | BindCompleted | StreamOpened
    | StreamAccepted | DataReceived | StreamEnded | StreamReset | WindowUpdated | PongReceived | ReportReceived
    | RelayCertificateOffered | ConnectionTerminated
)
