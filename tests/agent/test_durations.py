"""The one formatter for spans of time shown to people."""

from __future__ import annotations

import pytest

from agent.durations import DAY, YEAR, format_duration, format_relative


@pytest.mark.parametrize(("seconds", "text"), [
    (0.0, "0 s"),
    (0.4, "0.4 s"),
    (4.25, "4.2 s"),
    (9.96, "10 s"),
    (60.0, "60 s"),
    (119.4, "119 s"),
    (119.6, "2 min"),
    (250.0, "4 min 10 s"),
    (3599.6, "1 h"),
    (7260.0, "2 h 1 min"),
    (DAY - 1, "24 h"),
    (3 * DAY + 7200, "3 days 2 h"),
    (34_560_000.0, "400 days"),
    (-34_560_000.0, "400 days"),
    (2 * YEAR + DAY, "2 years 1 day"),
    (56 * YEAR + 339 * DAY, "56 years 339 days"),
    (float("inf"), "forever"),
])
def test_a_span_reads_in_at_most_two_units_without_a_decimal_point_past_ten_seconds(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_a_moment_is_in_the_future_or_ago() -> None:
    assert format_relative(60.0) == "in 60 s"
    assert format_relative(-300.0) == "5 min ago"
