"""Spans of time as people read them: "0.4 s", "60 s", "4 min 10 s", "5 h 12 min", "400 days".

The one formatter for every duration Outpost shows a person (doctor, clock
reports, outpostctl): a number of seconds with a decimal point ("34560000.0
s", "0.0 hours") makes the reader do the arithmetic.
"""

from __future__ import annotations

import math

MINUTE = 60
HOUR = 3600
DAY = 86400
#: 365 days: a clock off by years is read in years, and leap days do not matter at that scale.
YEAR = 365 * DAY
#: Below this, tenths of a second still mean something (a clock offset of 0.4 s).
TENTHS_BELOW = 10
#: Each unit is used from twice the next larger one down: "119 s", then "2 min"; "47 h", then "2 days".
SECONDS_BELOW = 2 * MINUTE
MINUTES_BELOW = HOUR
HOURS_BELOW = 2 * DAY
#: Under this many days the hours still matter ("3 days 4 h"); past it, "400 days".
DAYS_WITH_HOURS_BELOW = 10
DAYS_BELOW = 2 * YEAR


def format_duration(seconds: float) -> str:
    """``seconds`` (its sign ignored) in at most two units, rounded to the smaller one."""
    span = abs(float(seconds))
    if not math.isfinite(span):
        return "forever"
    if round(span, 1) < TENTHS_BELOW:
        return f"{round(span, 1):g} s"
    whole = round(span)
    if whole < SECONDS_BELOW:
        return f"{whole} s"
    if whole < MINUTES_BELOW:
        return _two(whole, MINUTE, "min", 1, "s")
    whole_minutes = round(span / MINUTE) * MINUTE
    if whole_minutes < HOURS_BELOW:
        return _two(whole_minutes, HOUR, "h", MINUTE, "min")
    whole_hours = round(span / HOUR) * HOUR
    if whole_hours < DAYS_WITH_HOURS_BELOW * DAY:
        return _two(whole_hours, DAY, "days", HOUR, "h")
    whole_days = round(span / DAY) * DAY
    if whole_days < DAYS_BELOW:
        return f"{whole_days // DAY} days"
    years, days = divmod(whole_days // DAY, YEAR // DAY)
    return f"{years} years" + (f" {days} day{'s' if days != 1 else ''}" if days else "")


def format_relative(seconds: float) -> str:
    """A moment ``seconds`` from now: "in 60 s", or "5 min ago" for a negative span."""
    text = format_duration(seconds)
    return f"in {text}" if seconds >= 0 else f"{text} ago"


def _two(total: int, big: int, big_name: str, small: int, small_name: str) -> str:
    count, rest = divmod(total, big)
    return f"{count} {big_name}" + (f" {rest // small} {small_name}" if rest else "")
