"""``identity list``'s filter values, checked before any request."""

from __future__ import annotations

import argparse

import pytest

from controller import fleet as controller_fleet
from outpostctl import fleet


def test_the_cli_knows_the_controllers_presence_states() -> None:
    assert fleet.PRESENCE_STATES == controller_fleet.PRESENCE_STATES


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("30m", 1800), ("24h", 86400), ("7d", 604800),
                                           ("2w", 1209600), ("45", 45), ("1.5h", 5400), (" 7d ", 604800)])
def test_durations(text: str, seconds: float) -> None:
    assert fleet.duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "7 days", "-1d", "1d2h", "1e3", "nan", "7D"])
def test_what_is_not_a_duration_says_how_to_write_one(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="is not a duration: write a number and a unit"):
        fleet.duration(text)


def test_ago() -> None:
    assert fleet.ago(1000.0, 988.0) == "12 s ago"
    assert fleet.ago(1000.0, 700.0) == "5 min ago"
    assert fleet.ago(20000.0, 9000.0) == "3 h ago"
    assert fleet.ago(1000.0, None) == "-"
    assert fleet.ago(1000.0, 1005.0) == "0 s ago"  # another process's clock a little ahead
