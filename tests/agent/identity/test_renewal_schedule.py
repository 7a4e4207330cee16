"""When the agent renews: numbers in, numbers out (no clock, no network)."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.identity.renewal_schedule import (
    MAX_RETRY_SECONDS,
    MIN_EXPIRY_MARGIN_SECONDS,
    MIN_RETRY_SECONDS,
    RenewalSchedule,
)

HOUR = 3600.0
DAY = 24 * HOUR
T0 = 1_700_000_000.0


def day_cert() -> RenewalSchedule:
    # notBefore backdated 5 minutes, as the controller issues them.
    return RenewalSchedule(not_before=T0 - 300, not_after=T0 + DAY)


def test_the_first_attempt_falls_at_two_thirds_of_the_lifetime_with_ten_percent_jitter() -> None:
    schedule = day_cert()
    rng = random.Random(1)
    attempts = [schedule.first_attempt(rng) for _ in range(2000)]
    fractions = [(a - schedule.not_before) / schedule.lifetime for a in attempts]
    assert min(fractions) >= 2 / 3 - 0.10 - 1e-9
    assert max(fractions) <= 2 / 3 + 0.10 + 1e-9
    # Spread, not a point: a fleet enrolled together renews over hours.
    assert max(attempts) - min(attempts) > 4 * HOUR
    assert abs(sum(fractions) / len(fractions) - 2 / 3) < 0.01


def test_a_fleet_enrolled_in_the_same_second_does_not_renew_in_the_same_minute() -> None:
    schedule = day_cert()
    minutes = {int(schedule.first_attempt(random.Random(seed)) // 60) for seed in range(500)}
    # 500 gateways over a ±2.4 h window: hundreds of distinct minutes.
    assert len(minutes) > 150


def test_retries_back_off_exponentially_with_full_jitter_and_a_cap() -> None:
    schedule = RenewalSchedule(not_before=T0, not_after=T0 + 90 * DAY)  # far from expiry: plain backoff
    now = T0 + 60 * DAY
    ceilings = []
    for failures in range(1, 16):
        delays = [schedule.retry_at(now, failures, random.Random(seed)) - now for seed in range(300)]
        assert min(delays) >= MIN_RETRY_SECONDS
        ceilings.append(max(delays))
    assert ceilings[0] <= 10.0
    assert ceilings[3] > 2 * ceilings[1]  # it grows
    assert max(ceilings) <= MAX_RETRY_SECONDS  # and stops growing at the cap
    assert ceilings[-1] > 0.9 * MAX_RETRY_SECONDS


def test_several_attempts_still_fit_before_expiry_however_long_the_backoff_grew() -> None:
    schedule = day_cert()
    rng = random.Random(7)
    now = schedule.first_attempt(rng)
    failures = 0
    attempts_before_expiry = 0
    while now < schedule.not_after and attempts_before_expiry < 10_000:
        attempts_before_expiry += 1
        failures += 1
        # Start from a backoff that already reached its cap.
        now = schedule.retry_at(now, failures + 20, rng)
    assert attempts_before_expiry >= 8


def test_no_attempt_is_planned_after_expiry_minus_the_margin() -> None:
    short = RenewalSchedule(not_before=T0, not_after=T0 + 300)  # the shortest lifetime the controller issues
    assert short.latest == T0 + 300 - MIN_EXPIRY_MARGIN_SECONDS
    for seed in range(200):
        assert short.first_attempt(random.Random(seed)) <= short.latest


def test_inside_the_margin_retries_come_quickly_and_after_expiry_the_plain_backoff_applies() -> None:
    schedule = day_cert()
    now = schedule.not_after - 120  # two minutes left
    delays = [schedule.retry_at(now, 30, random.Random(s)) - now for s in range(200)]
    assert max(delays) <= 30.0
    after = schedule.not_after + DAY  # offline a day: recovery, at most hourly
    delays = [schedule.retry_at(after, 30, random.Random(s)) - after for s in range(200)]
    assert max(delays) <= MAX_RETRY_SECONDS and max(delays) > 60.0
    assert schedule.expired(schedule.not_after) and not schedule.expired(schedule.not_after - 1)


@settings(max_examples=300, deadline=None)
@given(
    lifetime=st.floats(min_value=300, max_value=90 * DAY),
    offset=st.floats(min_value=0, max_value=1.5),
    failures=st.integers(min_value=1, max_value=200),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_a_retry_is_always_in_the_future_and_never_past_expiry_while_valid(lifetime: float, offset: float,
                                                                          failures: int, seed: int) -> None:
    schedule = RenewalSchedule(not_before=T0, not_after=T0 + lifetime)
    now = T0 + lifetime * offset
    at = schedule.retry_at(now, failures, random.Random(seed))
    assert at >= now + MIN_RETRY_SECONDS
    assert at - now <= max(MAX_RETRY_SECONDS, MIN_RETRY_SECONDS)
    if now < schedule.latest:
        # Before the margin: at least a quarter of the remaining window is left after this try.
        assert at <= max(schedule.latest, now + MIN_RETRY_SECONDS)
