"""Every number the protocol depends on, with the reason it has its value."""

from __future__ import annotations

from dataclasses import dataclass

from shared.protocol.errors import InvalidLimits

PROTOCOL_VERSION = 1
# The WebSocket subprotocol both ends name in the upgrade; it carries the
# version, so a relay can refuse a client of another protocol before any frame.
SUBPROTOCOL = f"outpost.v{PROTOCOL_VERSION}"
# The TLS ALPN name of the tunnel carried directly on TLS (no WebSocket): a
# relay routes a connection by it before any byte of HTTP, and it carries the
# version for the same reason as SUBPROTOCOL.
TUNNEL_ALPN = f"outpost/{PROTOCOL_VERSION}"

# The largest frame payload we accept. Four times what we send, so a peer with
# a larger send size still interoperates; small enough that one pending frame
# per tunnel is cheap on a 1 GiB gateway.
MAX_FRAME_PAYLOAD = 256 * 1024
# DATA payload per frame we send: large enough that per-frame work (header,
# event, WebSocket message) is negligible next to the bytes, small enough that
# streams sharing a tunnel interleave within a few milliseconds at 20 Mbit/s.
MAX_SEND_PAYLOAD = 64 * 1024
# Per-stream receive window. It must cover the bandwidth-delay product of the
# slowest link we serve well: 20 Mbit/s x 600 ms (satellite) = 1.5 MB.
INITIAL_WINDOW = 2 * 1024 * 1024
# Windows are signed 31-bit quantities, as in HTTP/2, so a sum of increments
# never wraps in any implementation.
MAX_WINDOW = 2**31 - 1
# Concurrently open streams the peer may open on one tunnel; a gateway serves
# a handful of dials at once, and each stream may buffer a whole window (one
# closed both ways still counts while its reader has not caught up).
MAX_STREAMS = 256
# Bytes one tunnel holds for its streams' readers at most: received and not yet
# consumed, all streams together (closed ones whose reader lags included). A window bounds one stream; without this, 256
# streams of an 8 MiB satellite window let a peer (or services that stopped
# reading) park 2 GiB on a 1 GiB gateway. 64 MiB is eight full satellite
# windows or 32 default ones, a sixteenth of a small gateway's memory. Past it
# the stream holding the most unread bytes is reset: its reader is the one not
# keeping up, and the others keep flowing.
RECEIVE_BUDGET = 64 * 1024 * 1024
# JSON control frames carry a certificate chain at most (a few KiB).
MAX_CONTROL_PAYLOAD = 64 * 1024
# Service names one BIND may carry. A gateway hosts a handful of services
# (Modbus, SSH, a web UI); 64 is ten times the largest real one. The relay
# decides and audits every name, so this bounds the work one frame can ask
# for, and it keeps the answer (BIND_RESULT: every name with a reason) well
# inside MAX_CONTROL_PAYLOAD.
MAX_BIND_SERVICES = 64
# Characters of one service name in BIND: ``tenant/name``, two 63-character
# names and the slash. Longer is no service any controller can hold; with
# MAX_BIND_SERVICES it bounds the names echoed back in BIND_RESULT.
MAX_SERVICE_NAME_CHARS = 2 * 63 + 1
# Seconds an unauthenticated connection may live: a TPM signature plus a
# satellite round trip fit several times over; a scanner holding sockets does not.
AUTH_DEADLINE = 10.0
# Seconds of silence after which the agent sends a PING. Carrier NATs forget
# idle TCP mappings after 2-5 minutes; 25 s keeps the mapping and detects a
# dead link quickly, at about 3,500 PING/PONG exchanges a day on an idle tunnel.
KEEPALIVE_INTERVAL = 25.0
# Seconds to wait for anything after a PING before declaring the tunnel dead:
# many 600 ms satellite round trips plus a handover stall, so a slow link is
# not dropped; a dead one is found within KEEPALIVE_INTERVAL + PING_TIMEOUT.
PING_TIMEOUT = 10.0

# Fixed sizes on the wire.
NONCE_SIZE = 32
PING_PAYLOAD_SIZE = 8
# Stream ids are u32 on the wire.
MAX_STREAM_ID = 2**32 - 1
# Reasons in RESET/GOAWAY are for a log line, not a document; truncated to this.
MAX_REASON_BYTES = 1024
# How many locally reset stream ids we remember, so that DATA the peer sent
# before it saw our RESET is dropped quietly instead of answered. Several
# times MAX_STREAMS: a burst of resets cannot push out ids still in flight.
RESET_MEMORY = 4 * MAX_STREAMS
#: Agents told the same come-back time (a GOAWAY's or a refusal's retry_after) return spread over
#: this many seconds after it, each by its own draw; a relay counts on it when it says how long the
#: agents it told keep arriving. The told times already spread a fleet at the relay's pace; one second
#: only keeps the agents told the same moment from arriving in the same instant.
COME_BACK_SPREAD = 1.0


@dataclass(frozen=True)
class ProtocolLimits:
    """Sizes this end enforces and advertises (built at the edge, e.g. from config)."""

    max_frame_payload: int = MAX_FRAME_PAYLOAD
    max_send_payload: int = MAX_SEND_PAYLOAD
    initial_window: int = INITIAL_WINDOW
    max_streams: int = MAX_STREAMS
    max_control_payload: int = MAX_CONTROL_PAYLOAD
    auth_deadline: float = AUTH_DEADLINE
    #: unread bytes across all streams of the tunnel, at most
    receive_budget: int = RECEIVE_BUDGET

    def __post_init__(self) -> None:
        if not 1 <= self.initial_window <= MAX_WINDOW:
            raise InvalidLimits(f"the tunnel window must be between 1 and {MAX_WINDOW} bytes, not {self.initial_window}")
        if self.receive_budget < self.initial_window:
            raise InvalidLimits(
                f"the tunnel window ({self.initial_window} bytes) must not exceed the tunnel's receive budget "
                f"({self.receive_budget} bytes): one stream could not fill its own window"
            )
        if not 1 <= self.max_send_payload <= MAX_FRAME_PAYLOAD:
            raise InvalidLimits(
                f"the tunnel send chunk must be between 1 and {MAX_FRAME_PAYLOAD} bytes (what every peer "
                f"accepts), not {self.max_send_payload}"
            )
        if self.max_frame_payload < MAX_SEND_PAYLOAD or self.max_frame_payload > MAX_WINDOW:
            raise InvalidLimits(
                f"the tunnel frame limit must be at least {MAX_SEND_PAYLOAD} bytes (what peers send), "
                f"not {self.max_frame_payload}"
            )
        if not 1 <= self.max_control_payload <= self.max_frame_payload:
            raise InvalidLimits(f"the tunnel control frame limit must be between 1 and {self.max_frame_payload} bytes")
        if self.max_streams < 1:
            raise InvalidLimits(f"a tunnel must allow at least one stream, not {self.max_streams}")
        if self.auth_deadline <= 0:
            raise InvalidLimits(f"the tunnel authentication deadline must be positive, not {self.auth_deadline}")


@dataclass(frozen=True)
class Liveness:
    """When to ping and when to give up on a silent peer."""

    #: send PING after this long with nothing received; None = never ping (relay)
    keepalive_interval: float | None = KEEPALIVE_INTERVAL
    #: after a PING, dead if nothing at all is received within this
    ping_timeout: float = PING_TIMEOUT
    #: dead if nothing is received for this long (the relay, which does not ping)
    idle_timeout: float | None = None

    def __post_init__(self) -> None:
        if self.keepalive_interval is not None and self.keepalive_interval <= 0:
            raise InvalidLimits(f"the keepalive interval must be positive, not {self.keepalive_interval}")
        if self.ping_timeout <= 0:
            raise InvalidLimits(f"the ping timeout must be positive, not {self.ping_timeout}")
        if self.idle_timeout is not None and self.idle_timeout <= 0:
            raise InvalidLimits(f"the idle timeout must be positive, not {self.idle_timeout}")
