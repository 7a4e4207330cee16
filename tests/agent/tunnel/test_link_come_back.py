"""A relay's come-back time (GOAWAY retry_after, a 503's Retry-After): clamped, jittered, never busier than the backoff."""

from __future__ import annotations

import math
import random

import pytest
from multidict import CIMultiDict

from agent.tunnel.backoff import MAX_COME_BACK, MIN_COME_BACK, TOLD_SPREAD, Backoff, come_back_after
from agent.tunnel.client import retry_after_of

#: Simulated time a relay answers "busy" to every attempt, for the bound on attempts.
HOSTILE_HOUR = 3600.0
#: Attempts today's backoff makes in that hour from a fresh start: its bound doubles from 1 s to
#: 300 s (about nine attempts), then one every 150 s on average (about 22); with room for the draw.
ATTEMPTS_PER_HOUR = 45


@pytest.mark.parametrize(("told", "followed"), [
    (0, MIN_COME_BACK), (-5, MIN_COME_BACK), (-math.inf, MIN_COME_BACK), (0.2, MIN_COME_BACK),
    (12.5, 12.5), (3 * 86400, MAX_COME_BACK), (math.inf, MAX_COME_BACK), (2**32 - 1, MAX_COME_BACK),
])
def test_a_come_back_time_is_held_within_its_bounds(told: float, followed: float) -> None:
    assert come_back_after(told) == followed


@pytest.mark.parametrize("junk", [None, "12", "soon", True, math.nan, [3], {"s": 3}])
def test_a_come_back_time_that_is_no_number_is_not_followed(junk: object) -> None:
    assert come_back_after(junk) is None


@pytest.mark.parametrize("told", [0.0, -1.0, 5.0, 3 * 86400.0, math.nan])
def test_the_wait_stays_within_the_bounds_plus_the_spread(told: float) -> None:
    for seed in range(50):
        backoff = Backoff(rng=random.Random(seed))
        wait = backoff.told_delay(told)
        followed = come_back_after(told)
        assert followed is None or followed <= wait <= max(followed + TOLD_SPREAD, backoff.bound() / 2)
        assert MIN_COME_BACK <= wait or followed is None
        assert wait <= MAX_COME_BACK + TOLD_SPREAD


def test_agents_told_the_same_time_spread_over_the_spread() -> None:
    rng = random.Random(3)
    waits = [Backoff(rng=rng).told_delay(10.0) for _ in range(2000)]
    assert min(waits) >= 10.0 and max(waits) <= 10.0 + TOLD_SPREAD
    assert max(waits) - min(waits) > 0.9 * TOLD_SPREAD  # spread, not bunched


def test_a_relay_that_says_busy_forever_is_asked_no_more_often_than_the_backoff_asks() -> None:
    for told in (0.0, 1.0, -3.0):
        backoff = Backoff(rng=random.Random(11))
        clock, attempts = 0.0, 0
        while clock < HOSTILE_HOUR:
            clock += backoff.told_delay(told)
            attempts += 1
        assert attempts <= ATTEMPTS_PER_HOUR, (told, attempts)


def test_each_told_wait_grows_the_backoff_bound_as_a_failure_does() -> None:
    told, failing = Backoff(rng=random.Random(5)), Backoff(rng=random.Random(5))
    for _ in range(12):
        told.told_delay(30.0)
        failing.next_delay()
    assert told.bound() == failing.bound() == min(failing.cap, 2.0 ** 12)


class _Refused:
    """What aiohttp raises for a refused upgrade: the status and the response headers."""

    def __init__(self, status: int, retry_after: str | None) -> None:
        self.status = status
        self.headers = CIMultiDict({"Retry-After": retry_after} if retry_after is not None else {})


@pytest.mark.parametrize(("header", "told"), [
    ("7", 7.0), ("0", MIN_COME_BACK), ("999999999", MAX_COME_BACK), (" 7 ", 7.0),
    ("-5", None), ("abc", None), ("", None), ("1.5", None), ("\uff11\uff12", None),
    ("Wed, 21 Oct 2026 07:28:00 GMT", None),
])
def test_a_503_retry_after_is_read_with_the_same_bounds(header: str, told: float | None) -> None:
    assert retry_after_of(_Refused(503, header)) == told  # type: ignore[arg-type]


def test_a_refusal_other_than_503_says_nothing_of_when_to_come_back() -> None:
    assert retry_after_of(_Refused(403, "7")) is None  # type: ignore[arg-type]
    assert retry_after_of(_Refused(503, None)) is None  # type: ignore[arg-type]
