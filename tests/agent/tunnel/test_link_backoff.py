"""Reconnect waits: full jitter within exponential bounds, capped, reset after a stable period."""

from __future__ import annotations

import random
import statistics

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
    backoff.reset()
    assert all(backoff.next_delay() <= 2.0 for _ in range(1))
