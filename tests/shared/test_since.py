"""shared/since.py: the one reader of an audit ``since`` both ``outpostctl`` and the controller use."""

from __future__ import annotations

import pytest

from shared.since import MAX_FUTURE_SKEW_SECONDS, InvalidSince, parse_since

NOW = 1_800_000_000.0


@pytest.mark.parametrize(("text", "expected"), [
    ("90s", NOW - 90), ("15m", NOW - 900), (" 2h ", NOW - 7200), ("7d", NOW - 7 * 86400), ("1w", NOW - 7 * 86400),
    ("2026-12-06T10:00:00Z", 1796551200.0), ("2026-12-06T10:00:00", 1796551200.0),
    ("2026-12-06T11:00:00+01:00", 1796551200.0), ("1700000000", 1_700_000_000.0),
    (str(NOW + MAX_FUTURE_SKEW_SECONDS), NOW + MAX_FUTURE_SKEW_SECONDS),
])
def test_a_duration_an_iso_time_or_a_unix_time(text: str, expected: float) -> None:
    assert parse_since(text, NOW) == expected


@pytest.mark.parametrize(("text", "code"), [
    ("15 minutes", "invalid_since"), ("-5m", "invalid_since"), ("", "invalid_since"), ("nan", "invalid_since"),
    ("inf", "invalid_since"), ("1e400x", "invalid_since"), ("9999999999m", "invalid_since"),
    ("2999-01-01T00:00:00Z", "since_in_future"), (str(NOW + MAX_FUTURE_SKEW_SECONDS + 1), "since_in_future"),
])
def test_a_bad_time_is_one_sentence_with_its_code(text: str, code: str) -> None:
    with pytest.raises(InvalidSince) as raised:
        parse_since(text, NOW)
    assert raised.value.code == code
    assert "\n" not in str(raised.value) and str(raised.value).endswith(".")


def test_the_quoted_value_is_bounded() -> None:
    with pytest.raises(InvalidSince) as raised:
        parse_since("x" * 10_000, NOW)
    assert len(str(raised.value)) < 200
