"""The tunnel wire protocol (docs/protocol.md) as a sans-IO state machine.

No sockets, no clock, no randomness: bytes and ``now`` go in, events and bytes
to send come out. The agent and the relay both drive a ``Connection``.
"""

from shared.protocol.connection import Connection, auth_message
from shared.protocol.errors import (
    ErrorCode,
    InvalidLimits,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    StreamClosedError,
)
from shared.protocol.events import (
    Authenticated,
    AuthReceived,
    BindCompleted,
    BindRequested,
    ChallengeReceived,
    ConnectionTerminated,
    DataReceived,
    Event,
    PongReceived,
    RelayCertificateOffered,
    ReportReceived,
    StreamAccepted,
    StreamEnded,
    StreamOpened,
    StreamReset,
    WindowUpdated,
)
from shared.protocol.frames import goaway_frame
from shared.protocol.limits import (
    AUTH_DEADLINE,
    INITIAL_WINDOW,
    MAX_BIND_SERVICES,
    MAX_CONTROL_PAYLOAD,
    MAX_FRAME_PAYLOAD,
    MAX_SEND_PAYLOAD,
    MAX_SERVICE_NAME_CHARS,
    MAX_STREAMS,
    MAX_WINDOW,
    NONCE_SIZE,
    PROTOCOL_VERSION,
    SUBPROTOCOL,
    TUNNEL_ALPN,
    Liveness,
    ProtocolLimits,
)
from shared.protocol.relay_cert import MAX_RELAY_CERT_BYTES, RELAY_CERT_FEATURE, relay_cert_message
from shared.protocol.snapshot import ConnectionSnapshot, StreamSnapshot
from shared.protocol.state import Handshake, Role
from shared.protocol.streams import StreamState

__all__ = [
    "AUTH_DEADLINE", "INITIAL_WINDOW", "MAX_BIND_SERVICES", "MAX_CONTROL_PAYLOAD", "MAX_FRAME_PAYLOAD",
    "MAX_RELAY_CERT_BYTES", "MAX_SEND_PAYLOAD", "MAX_SERVICE_NAME_CHARS", "MAX_STREAMS", "MAX_WINDOW", "NONCE_SIZE",
    "PROTOCOL_VERSION", "RELAY_CERT_FEATURE",
    "SUBPROTOCOL", "TUNNEL_ALPN", "AuthReceived", "Authenticated", "BindCompleted", "BindRequested", "ChallengeReceived",
    "Connection", "ConnectionSnapshot", "ConnectionTerminated", "DataReceived", "ErrorCode", "Event", "Handshake",
    "InvalidLimits", "Liveness", "LocalProtocolError", "PongReceived", "ProtocolError", "ProtocolLimits",
    "RelayCertificateOffered", "RemoteProtocolError", "ReportReceived", "Role", "StreamAccepted", "StreamClosedError",
    "StreamEnded", "StreamOpened",
    "StreamReset", "StreamSnapshot", "StreamState", "WindowUpdated", "auth_message", "goaway_frame",
    "relay_cert_message",
]
