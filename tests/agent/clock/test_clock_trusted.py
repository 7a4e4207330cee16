"""Which time the agent trusts, and how it says so: the pure rules, on numbers alone."""

from __future__ import annotations

from agent.clock.settings import ClockSettings
from agent.clock.trusted import (
    NTP_CONTROLLER_TOLERANCE,
    ClockEstimate,
    OffsetSample,
    TrustedClock,
    combine,
    describe_offset,
    format_duration,
)

YEAR = 365 * 86400
REAL_NOW = 1_795_386_600.0  # 2026-11-22 22:30 UTC
BOOTED_IN_1970 = 86_400.0  # 1970-01-02 00:00 UTC


def ntp(offset: float, delay: float = 0.02) -> OffsetSample:
    return OffsetSample("ntp", offset, delay, local_time=1000.0, origin="127.0.0.1:123")


def controller(offset: float, delay: float = 0.1) -> OffsetSample:
    return OffsetSample("controller", offset, delay, local_time=1001.0, origin="https://ctl:8443")


def test_ntp_wins_when_the_controller_agrees_with_it() -> None:
    estimate = combine(ntp(12.5), controller(13.0))
    assert (estimate.source, estimate.offset, estimate.note) == ("ntp", 12.5, None)


def test_the_controller_wins_when_ntp_disagrees_beyond_the_tolerance_and_says_why() -> None:
    estimate = combine(ntp(0.0), controller(-YEAR))
    assert estimate.source == "controller" and estimate.offset == -YEAR
    assert "disagree by 365 days" in estimate.note and "pinned TLS channel" in estimate.note


def test_the_tolerance_allows_for_both_round_trips() -> None:
    gap = NTP_CONTROLLER_TOLERANCE + 1.0
    assert combine(ntp(0.0, delay=1.0), controller(gap, delay=1.5)).source == "ntp"
    assert combine(ntp(0.0, delay=0.0), controller(gap, delay=0.0)).source == "controller"


def test_either_source_alone_is_used_and_nothing_measured_means_the_local_clock() -> None:
    assert combine(ntp(5.0), None).source == "ntp"
    assert combine(None, controller(7.0)).offset == 7.0
    nothing = combine(None, None)
    assert (nothing.source, nothing.offset, nothing.measured_at) == ("local", 0.0, None)


class Clocks:
    """A settable wall clock and monotonic clock."""

    def __init__(self, wall: float) -> None:
        self.wall = wall
        self.mono = 5000.0

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds


def test_trusted_time_is_the_local_clock_plus_the_adopted_offset() -> None:
    clocks = Clocks(BOOTED_IN_1970)
    clock = TrustedClock(ClockSettings(), local=lambda: clocks.wall, monotonic=lambda: clocks.mono)
    assert clock.now() == BOOTED_IN_1970 and clock.source == "local" and not clock.measured

    clock.adopt(ClockEstimate(REAL_NOW - BOOTED_IN_1970, "controller", measured_at=BOOTED_IN_1970))
    clocks.advance(60.0)

    assert clock.now() == REAL_NOW + 60.0
    assert clock.offset == REAL_NOW - BOOTED_IN_1970 and clock.source == "controller" and clock.measured


def test_a_later_step_of_the_system_clock_does_not_move_trusted_time() -> None:
    clocks = Clocks(BOOTED_IN_1970)
    clock = TrustedClock(local=lambda: clocks.wall, monotonic=lambda: clocks.mono)
    clock.adopt(ClockEstimate(REAL_NOW - BOOTED_IN_1970, "ntp", measured_at=BOOTED_IN_1970))

    clocks.wall = REAL_NOW + 3.0  # the NTP daemon finally sets the system clock
    clocks.mono += 3.0

    assert clock.now() == REAL_NOW + 3.0
    assert clock.offset == 0.0


def test_a_failed_measurement_keeps_the_last_good_one() -> None:
    clocks = Clocks(BOOTED_IN_1970)
    clock = TrustedClock(local=lambda: clocks.wall, monotonic=lambda: clocks.mono)
    clock.adopt(ClockEstimate(REAL_NOW - BOOTED_IN_1970, "controller", measured_at=BOOTED_IN_1970))
    clock.adopt(combine(None, None))
    assert clock.source == "controller" and clock.now() == REAL_NOW


def test_the_report_says_how_far_off_which_way_and_whose_time_is_used() -> None:
    sentence = describe_offset(REAL_NOW - BOOTED_IN_1970, BOOTED_IN_1970, "controller")
    assert sentence == ("the clock is off by 56 years 339 days (behind: local 1970-01-02 00:00 UTC, "
                        "controller 2026-11-22 22:30 UTC); using the controller's time")
    ahead = describe_offset(-YEAR, REAL_NOW + YEAR, "ntp")
    assert ahead.startswith("the clock is off by 365 days (ahead: local 2027-11-22 22:30 UTC, NTP 2026-11-22")
    assert ahead.endswith("using NTP time")


def test_a_small_offset_is_called_right_and_an_unchecked_clock_says_so() -> None:
    assert describe_offset(0.4, REAL_NOW, "ntp") == "the clock is right (within 0.4 s of NTP time)"
    local = describe_offset(0.0, BOOTED_IN_1970, "local")
    assert "could not be checked" in local and "reads 1970-01-02 00:00 UTC" in local


def test_the_report_carries_the_reason_a_source_was_passed_over() -> None:
    clock = TrustedClock(local=lambda: REAL_NOW, monotonic=lambda: 0.0)
    clock.adopt(combine(ntp(0.0), controller(-YEAR)))
    assert clock.report().endswith("trusting the controller, whose time came over the pinned TLS channel")


def test_durations_read_in_two_units() -> None:
    assert format_duration(4.25) == "4.2 s"
    assert format_duration(250) == "4 min 10 s"
    assert format_duration(3 * 86400 + 7200) == "3 days 2 h"
    assert format_duration(-(2 * YEAR + 86400)) == "2 years 1 day"


def test_durations_round_to_the_smaller_unit() -> None:
    assert format_duration(YEAR - 0.1) == "365 days"
    assert format_duration(86400 - 1) == "24 h"
    assert format_duration(59.96) == "60 s"
    assert format_duration(119.6) == "2 min"
