"""A clock a test sets by hand, for the books the store keeps by time (presence, the relay directory)."""

from __future__ import annotations

#: Where every test's clock starts: a fixed instant, far from any real one.
T0 = 1_800_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now
