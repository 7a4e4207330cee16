"""Reconnect waits: full jitter within exponential bounds, capped, reset after a stable period."""

from __future__ import annotations

import random
import statistics

import pytest

from agent.tunnel.backoff import Backoff


def test_each_wait_is_uniform_below_a_doubling_bound_up_to_the_cap() -> None:
    backoff = Backoff(initial=1.0, cap=300.0, rng=random.Random(1))
    bounds = [min(300.0, 2.0 ** n) for n in range(15)]
    for bound in bounds:
        assert 0.0 <= backoff.next_delay() <= bound


def test_the_waits_of_a_fleet_spread_over_the_whole_bound() -> None:
    rng = random.Random(7)
    first = [Backoff(initial=5.0, rng=rng).next_delay() for _ in range(10_000)]
    assert abs(statistics.mean(first) - 2.5) < 0.1
    # Uniform: each fifth of [0, 5) holds about a fifth of the fleet; none arrive "at once".
    for k in range(5):
        share = sum(1 for d in first if k <= d < k + 1) / len(first)
        assert 0.18 <= share <= 0.22


def test_after_many_failures_waits_stay_within_the_cap() -> None:
    backoff = Backoff(initial=10.0, cap=900.0, rng=random.Random(3))
    delays = [backoff.next_delay() for _ in range(200)]
    assert max(delays) <= 900.0
    assert statistics.mean(delays[20:]) > 300.0  # capped waits average half the cap


def test_reset_starts_again_from_the_initial_bound() -> None:
    backoff = Backoff(initial=2.0, cap=300.0, rng=random.Random(5))
    for _ in range(10):
        backoff.next_delay()
    assert backoff.bound() == 300.0
    backoff.reset()
    assert backoff.bound() == 2.0
    assert backoff.next_delay() <= 2.0


def test_a_gateway_failing_for_weeks_keeps_waiting_within_the_cap_without_overflowing() -> None:
    backoff = Backoff(initial=1.0, cap=300.0, rng=random.Random(9))
    # 5,000 failures: a month of capped waits; 2.0 ** 1024 alone overflows a float.
    delays = [backoff.next_delay() for _ in range(5000)]
    assert max(delays) <= 300.0
    assert backoff.bound() == 300.0
    assert backoff.attempt < 20  # the exponent stopped growing at the cap


def test_a_stable_tunnel_that_drops_starts_again_from_the_initial_bound() -> None:
    backoff = Backoff(initial=1.0, cap=300.0, stable_after=120.0, rng=random.Random(2))
    for _ in range(6):
        backoff.next_delay()
    backoff.tunnel_ended(uptime=120.0)
    assert backoff.bound() == 1.0


def test_a_tunnel_that_drops_quickly_keeps_the_bound_growing() -> None:
    backoff = Backoff(initial=1.0, cap=300.0, stable_after=120.0, rng=random.Random(2))
    for _ in range(6):
        backoff.next_delay()
    backoff.tunnel_ended(uptime=119.0)
    assert backoff.bound() == 64.0


@pytest.mark.parametrize("initial, cap, factor", [(0.0, 10.0, 2.0), (20.0, 10.0, 2.0), (1.0, 10.0, 1.0)])
def test_bounds_that_cannot_back_off_are_refused(initial: float, cap: float, factor: float) -> None:
    with pytest.raises(ValueError):
        Backoff(initial=initial, cap=cap, factor=factor)
