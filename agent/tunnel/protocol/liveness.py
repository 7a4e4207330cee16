"""Deadlines of one connection: authentication, keepalive PING, dead peer, idle peer.

Time is whatever the caller passes as ``now`` (a monotonic clock in seconds).
"""

from __future__ import annotations

from agent.tunnel.protocol.limits import Liveness


class LivenessClock:
    """Tracks when we last heard from the peer and the one PING in flight."""

    __slots__ = ("settings", "auth_deadline", "last_received", "ping_sent_at", "ping_payload")

    def __init__(self, settings: Liveness, now: float, auth_deadline: float) -> None:
        self.settings = settings
        #: None once authenticated
        self.auth_deadline: float | None = now + auth_deadline
        self.last_received = now
        self.ping_sent_at: float | None = None
        self.ping_payload: bytes | None = None

    def ping_due(self) -> float | None:
        """When the next keepalive PING is due; None while one is in flight or pings are off."""
        interval = self.settings.keepalive_interval
        if interval is None or self.ping_sent_at is not None or self.auth_deadline is not None:
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
        deadlines = [d for d in (self.auth_deadline, self.ping_due(), self.dead_at(), self.idle_at()) if d is not None]
        return min(deadlines) if deadlines else None

    def expired(self, now: float) -> str | None:
        """Why the connection must end at ``now``, or None."""
        if self.auth_deadline is not None and now >= self.auth_deadline:
            return "auth"
        dead_at = self.dead_at()
        if dead_at is not None and now >= dead_at:
            return "ping"
        idle_at = self.idle_at()
        if idle_at is not None and now >= idle_at:
            return "idle"
        return None
