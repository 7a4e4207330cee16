"""Trusted time: the local clock corrected by the best measured offset.

A gateway without a real-time clock can boot in 1970, and a wrong clock makes
tokens look expired and certificates look not yet valid. The agent therefore
measures how far its clock is off (NTP, and the controller's time over the
TLS channel pinned to the controller's CA) and makes its own decisions on
``TrustedClock.now()``. Everything here is pure: measurements come in as
numbers, and the clocks are callables so tests can set them.

Trust rules, in order:

1. NTP, when a server answers and the controller agrees with it (within
   ``NTP_CONTROLLER_TOLERANCE`` plus the two measurements' own uncertainty):
   NTP is the more precise of the two.
2. The controller's time, when NTP is silent, or when the two disagree: NTP
   is unauthenticated UDP that anyone on the path can forge, the controller's
   answer came over a channel whose certificate chains to the pinned CA, and
   the controller's clock is the one that issues our certificates and judges
   them at the relay.
3. The local clock, when nothing could be measured; then every decision says
   that the clock could not be checked.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from agent.clock.settings import ClockSettings
from agent.durations import format_duration
from shared.utc import format_utc

#: NTP and the controller normally agree to well under a second; 30 s of
#: disagreement beyond their measured round trips means one of them is wrong,
#: yet it stays far inside the 5 minutes certificates are backdated, so even
#: the loser of a close call would not break a certificate decision.
NTP_CONTROLLER_TOLERANCE = 30.0
#: Offsets below this are normal NTP jitter or one slow round trip; status
#: calls such a clock right instead of printing a sentence about it.
NOTABLE_OFFSET = 2.0
SOURCES = ("ntp", "controller", "local")
#: source -> (its name in "local ..., <name> ...", the time we then use)
_SOURCE_WORDS = {"ntp": ("NTP", "NTP time"), "controller": ("controller", "the controller's time")}


@dataclass(frozen=True)
class OffsetSample:
    """One measurement: how many seconds to add to the local clock."""

    source: str  # "ntp" or "controller"
    offset: float
    #: Round trip in seconds; the offset is uncertain by at most half of it.
    delay: float
    #: The local clock at the middle of the measurement.
    local_time: float
    #: Which server answered (an NTP host or the controller's URL).
    origin: str


@dataclass(frozen=True)
class ClockEstimate:
    """What the agent believes: the offset to use, where it came from, and why."""

    offset: float
    source: str
    #: Local clock when measured; None when nothing was measured.
    measured_at: float | None
    #: Why another source was passed over, in plain words; None if nothing was.
    note: str | None = None
    #: The time source named in reports (NTP server or controller URL).
    origin: str | None = None


def combine(ntp: OffsetSample | None, controller: OffsetSample | None,
            tolerance: float = NTP_CONTROLLER_TOLERANCE) -> ClockEstimate:
    """Apply the trust rules (module docstring) to what was measured."""
    if ntp is not None and controller is not None:
        disagreement = abs(ntp.offset - controller.offset)
        if disagreement > tolerance + (ntp.delay + controller.delay) / 2:
            note = (f"NTP ({ntp.origin}) and the controller disagree by {format_duration(disagreement)}; "
                    "trusting the controller, whose time came over the pinned TLS channel")
            return _estimate(controller, note)
        return _estimate(ntp)
    if ntp is not None:
        return _estimate(ntp)
    if controller is not None:
        return _estimate(controller)
    return ClockEstimate(offset=0.0, source="local", measured_at=None)


def _estimate(sample: OffsetSample, note: str | None = None) -> ClockEstimate:
    return ClockEstimate(offset=sample.offset, source=sample.source, measured_at=sample.local_time,
                         note=note, origin=sample.origin)


class TrustedClock:
    """The local clock plus the adopted offset; ``now()`` is what decisions use.

    After a measurement the trusted time advances with the monotonic clock, so
    a later step of the system clock (NTP daemon finally syncing, an operator
    running ``date``) does not silently shift trusted time; ``offset`` then
    shows the new difference. ``settings`` says where to measure
    (agent.clock.measure does the measuring).
    """

    def __init__(self, settings: ClockSettings | None = None, local: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings or ClockSettings()
        self._local = local
        self._monotonic = monotonic
        self.estimate = ClockEstimate(offset=0.0, source="local", measured_at=None)
        self._anchor: tuple[float, float] | None = None  # (trusted time, monotonic) at adoption

    def adopt(self, estimate: ClockEstimate) -> None:
        """Use ``estimate`` from now on (a local-only estimate keeps the last measured one)."""
        if estimate.source == "local" and self._anchor is not None:
            return
        self.estimate = estimate
        if estimate.source == "local":
            self._anchor = None
        else:
            self._anchor = (self._local() + estimate.offset, self._monotonic())

    def now(self) -> float:
        """Trusted unix time in seconds."""
        if self._anchor is None:
            return self._local()
        trusted_at, monotonic_at = self._anchor
        return trusted_at + (self._monotonic() - monotonic_at)

    def local_now(self) -> float:
        return self._local()

    @property
    def offset(self) -> float:
        """Seconds to add to the local clock to get trusted time."""
        return self.now() - self._local()

    @property
    def source(self) -> str:
        return self.estimate.source

    @property
    def measured_at(self) -> float | None:
        return self.estimate.measured_at

    @property
    def measured(self) -> bool:
        """True when trusted time comes from NTP or the controller, not the local clock alone."""
        return self.estimate.source != "local"

    def report(self) -> str:
        """One plain sentence about the clock, for logs and ``outpost-agent status``."""
        sentence = describe_offset(self.offset, self._local(), self.source)
        return f"{sentence}; {self.estimate.note}" if self.estimate.note else sentence


def describe_offset(offset: float, local_now: float, source: str) -> str:
    """The clock sentence for an offset measured from ``source`` at local time ``local_now``."""
    if source == "local":
        return (f"the clock could not be checked (no NTP server answered and the controller's time could "
                f"not be used); using the local clock, which reads {format_utc(local_now)}")
    name, using = _SOURCE_WORDS.get(source, (source, f"{source} time"))
    if abs(offset) < NOTABLE_OFFSET:
        return f"the clock is right (within {format_duration(offset)} of {using})"
    direction = "behind" if offset > 0 else "ahead"
    return (f"the clock is off by {format_duration(offset)} ({direction}: local {format_utc(local_now)}, "
            f"{name} {format_utc(local_now + offset)}); using {using}")


