"""Reconnect delays: exponential backoff with full jitter.

After a relay restart every gateway of a fleet reconnects at once unless each
waits a random time; "full jitter" (a uniform draw between zero and the
exponential bound) spreads them best for the same mean delay.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

# First retry bound: long enough not to hammer a relay that just refused us.
INITIAL_DELAY = 1.0
# Upper bound of one wait: a gateway is back within minutes after an outage.
MAX_DELAY = 300.0
# A tunnel that stayed up this long was healthy: the next failure starts over.
STABLE_AFTER = 120.0


@dataclass
class Backoff:
    """The delay before each reconnect attempt."""

    initial: float = INITIAL_DELAY
    cap: float = MAX_DELAY
    factor: float = 2.0
    rng: random.Random = field(default_factory=random.Random)
    attempt: int = 0

    def next_delay(self) -> float:
        bound = min(self.cap, self.initial * (self.factor ** self.attempt))
        self.attempt += 1
        return self.rng.uniform(0.0, bound)

    def reset(self) -> None:
        self.attempt = 0
