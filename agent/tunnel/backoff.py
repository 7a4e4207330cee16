"""Reconnect delays: exponential backoff with full jitter, reset after a stable tunnel.

After a relay restart every gateway of a fleet reconnects at once unless each
waits a random time; "full jitter" (a uniform draw between zero and the
exponential bound) spreads them best for the same mean delay.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from shared.protocol.limits import COME_BACK_SPREAD

# First retry bound: long enough not to hammer a relay that just refused us.
INITIAL_DELAY = 1.0
# Upper bound of one wait: a gateway is back within minutes after an outage.
MAX_DELAY = 300.0
# A tunnel that stayed up this long was healthy, so its end is a new outage and
# the waits start again from the initial bound. Two minutes outlasts the
# flapping of a link that drops right after each reconnect (a NAT that forgets
# us, a relay that accepts and then fails) by several reconnect cycles, yet is
# short next to a day's normal operation. [link] stable_after overrides it.
STABLE_AFTER = 120.0
# A relay that is busy admitting (or stopping) says when to come back; agents
# told the same moment spread over this many seconds after it (the relay counts on it).
TOLD_SPREAD = COME_BACK_SPREAD
# The shortest come-back time followed: a relay saying 0 (or less) gets the
# first backoff's bound, never a tight loop.
MIN_COME_BACK = INITIAL_DELAY
# The longest come-back time followed: a relay restarting under 10,000 tunnels
# spreads them over tens of seconds; anything above a few minutes (days, by a
# typo or a hostile relay) must not park the gateway for longer than the
# backoff's own cap would.
MAX_COME_BACK = MAX_DELAY


def come_back_after(value: object) -> float | None:
    """The come-back time a relay gave, held within [MIN_COME_BACK, MAX_COME_BACK]; None when it is no number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return None
    return min(MAX_COME_BACK, max(MIN_COME_BACK, float(value)))


@dataclass
class Backoff:
    """The delay before each reconnect attempt."""

    initial: float = INITIAL_DELAY
    cap: float = MAX_DELAY
    factor: float = 2.0
    #: uptime (s) after which a dropped tunnel counts as a fresh outage
    stable_after: float = STABLE_AFTER
    rng: random.Random = field(default_factory=random.Random)
    #: waits since the last reset whose bound was still below the cap
    attempt: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.initial <= self.cap:
            raise ValueError(f"the initial delay ({self.initial}) must be above 0 and at most the cap ({self.cap})")
        if self.factor <= 1:
            raise ValueError(f"the backoff factor must be above 1, not {self.factor}")

    def bound(self) -> float:
        """The bound the next wait is drawn below."""
        return min(self.cap, self.initial * self.factor ** self.attempt)

    def next_delay(self) -> float:
        bound = self.bound()
        if bound < self.cap:
            # Once at the cap the exponent stops growing: a gateway failing for
            # weeks must not overflow a float (2.0 ** 1024 does).
            self.attempt += 1
        return self.rng.uniform(0.0, bound)

    def told_delay(self, retry_after: float) -> float:
        """The wait when the relay said when to come back: its time (clamped) plus up to TOLD_SPREAD.

        The relay spreads its fleet by the times it tells; the draw spreads
        those told the same moment. It is never shorter than the backoff's own
        draw, whose bound grows with each told wait as with each failure: a
        relay that says "busy, come back in a second" forever is asked no
        more often than one that fails.
        """
        told = come_back_after(retry_after)
        backoff = self.next_delay()
        if told is None:
            return backoff
        return max(told + self.rng.uniform(0.0, TOLD_SPREAD), backoff)

    def reset(self) -> None:
        self.attempt = 0

    def tunnel_ended(self, uptime: float) -> None:
        """An established tunnel ended after ``uptime`` seconds: start over if it had been stable."""
        if uptime >= self.stable_after:
            self.reset()
