"""Deadlines of one connection: authentication, keepalive PING, dead peer, idle peer; and PING/PONG.

Time is whatever the caller passes as ``now`` (a monotonic clock in seconds).
"""

from __future__ import annotations

from shared.protocol.endpoint import Endpoint
from shared.protocol.errors import ErrorCode, RemoteProtocolError
from shared.protocol.events import Event, PongReceived
from shared.protocol.frames import PING_COUNTER, FrameType
from shared.protocol.limits import PING_PAYLOAD_SIZE, Liveness
from shared.protocol.state import Role


class Keepalive:
    """When we last heard from the peer, the one PING in flight, and which deadline comes next."""

    def __init__(self, endpoint: Endpoint, settings: Liveness, now: float) -> None:
        self._endpoint = endpoint
        self.settings = settings
        #: runs from construction until the handshake is done
        self.auth_deadline = now + endpoint.limits.auth_deadline
        #: the ``now`` of the last receive_data call
        self.last_received = now
        self.ping_sent_at: float | None = None
        self.ping_payload: bytes | None = None
        self.last_rtt: float | None = None
        self._ping_counter = 0

    # -- deadlines -------------------------------------------------------------
    def _auth_pending(self) -> bool:
        return not self._endpoint.authenticated

    def ping_due(self) -> float | None:
        """When the next keepalive PING is due; None while one is in flight or pings are off."""
        interval = self.settings.keepalive_interval
        if interval is None or self.ping_sent_at is not None or self._auth_pending():
            return None
        return self.last_received + interval

    def dead_at(self) -> float | None:
        """When the peer counts as gone for silence after our PING."""
        if self.ping_sent_at is None:
            return None
        # Anything received after the PING is life too: the PONG may queue behind data.
        return max(self.ping_sent_at, self.last_received) + self.settings.ping_timeout

    def idle_at(self) -> float | None:
        idle = self.settings.idle_timeout
        return None if idle is None else self.last_received + idle

    def next_deadline(self) -> float | None:
        """The earliest of ``auth_deadline`` (while pending), ``ping_due``, ``dead_at`` and ``idle_at``.

        Asked after every message, so those four are folded in here rather
        than called: the same values, without four calls and a list each time.
        """
        settings = self.settings
        last = self.last_received
        idle = settings.idle_timeout
        earliest = None if idle is None else last + idle
        sent = self.ping_sent_at
        if not self._endpoint.authenticated:
            auth = self.auth_deadline
            earliest = auth if earliest is None or auth < earliest else earliest
        elif sent is None:
            interval = settings.keepalive_interval
            if interval is not None:
                due = last + interval
                earliest = due if earliest is None or due < earliest else earliest
        if sent is not None:
            dead = (sent if sent > last else last) + settings.ping_timeout
            earliest = dead if earliest is None or dead < earliest else earliest
        return earliest

    def expired(self, now: float) -> str | None:
        """Why the connection must end at ``now`` (the sentence for GOAWAY), or None."""
        if self._auth_pending() and now >= self.auth_deadline:
            waited = f"{self._endpoint.limits.auth_deadline:g} s"
            return f"no valid AUTH within {waited}" if self._endpoint.role is Role.RELAY else f"no AUTH_OK within {waited}"
        dead_at = self.dead_at()
        if dead_at is not None and now >= dead_at:
            return f"no answer to PING within {self.settings.ping_timeout:g} s"
        idle_at = self.idle_at()
        if idle_at is not None and now >= idle_at:
            return f"nothing received for {self.settings.idle_timeout:g} s"
        return None

    # -- PING and PONG -----------------------------------------------------------
    def ping_if_due(self, now: float) -> None:
        due = self.ping_due()
        if due is not None and now >= due:
            self.send_ping(now)

    def ping(self, now: float) -> None:
        """A PING now, unless one is already in flight."""
        self._endpoint.require_ready()
        if self.ping_sent_at is None:
            self.send_ping(now)

    def send_ping(self, now: float) -> None:
        self._ping_counter += 1
        payload = PING_COUNTER.pack(self._ping_counter)
        self.ping_sent_at = now
        self.ping_payload = payload
        self._endpoint.queue_frame(FrameType.PING, 0, 0, payload)

    def on_ping(self, flags: int, stream_id: int, payload: bytes, events: list[Event]) -> None:
        if len(payload) != PING_PAYLOAD_SIZE:
            raise RemoteProtocolError(ErrorCode.FRAME_SIZE_ERROR, f"PING of {len(payload)} bytes, not {PING_PAYLOAD_SIZE}")
        self._endpoint.queue_frame(FrameType.PONG, 0, 0, payload)

    def on_pong(self, flags: int, stream_id: int, payload: bytes, events: list[Event]) -> None:
        if len(payload) != PING_PAYLOAD_SIZE:
            raise RemoteProtocolError(ErrorCode.FRAME_SIZE_ERROR, f"PONG of {len(payload)} bytes, not {PING_PAYLOAD_SIZE}")
        if self.ping_sent_at is None or payload != self.ping_payload:
            return  # an answer to nothing we are waiting for: harmless
        # last_received is the `now` of the receive_data call this PONG came in.
        rtt = max(0.0, self.last_received - self.ping_sent_at)
        self.ping_sent_at = self.ping_payload = None
        self.last_rtt = rtt
        events.append(PongReceived(rtt))
