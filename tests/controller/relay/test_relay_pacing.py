"""Come-back times: one slot every 1/rate seconds after the backlog, at a rate measured from admissions."""

from __future__ import annotations

import math

from controller.relay.pacing import (
    DEFAULT_ADMISSIONS_PER_SECOND,
    FIRST_RETRY,
    MAX_ADMISSIONS_PER_SECOND,
    MIN_ADMISSIONS_PER_SECOND,
    PACED_SHARE,
    RATE_MIN_SAMPLES,
    RATE_WINDOW,
    STOP_FIRST_RETRY,
    ComeBackPacer,
)


def test_agents_told_at_once_get_slots_one_pace_apart() -> None:
    pacer = ComeBackPacer()
    told = [pacer.come_back(100.0) for _ in range(1000)]
    gap = 1.0 / DEFAULT_ADMISSIONS_PER_SECOND
    assert told[0] >= FIRST_RETRY
    assert all(math.isclose(b - a, gap) for a, b in zip(told, told[1:], strict=False))
    assert pacer.told == 1000


def test_slots_handed_out_earlier_are_not_handed_out_again_later() -> None:
    pacer = ComeBackPacer()
    first = [100.0 + pacer.come_back(100.0) for _ in range(800)]  # two seconds' worth
    later = 101.0 + pacer.come_back(101.0)
    assert later > first[-1]


def test_the_backlog_in_flight_drains_before_the_first_slot() -> None:
    assert ComeBackPacer().come_back(0.0, in_flight=4000) >= 4000 / DEFAULT_ADMISSIONS_PER_SECOND


def test_at_the_cap_the_pace_follows_the_admission_rate_measured() -> None:
    pacer = ComeBackPacer()
    for index in range(int(RATE_WINDOW * 100)):  # 100 a second
        pacer.admitted(index / 100)
    assert pacer.rate() == DEFAULT_ADMISSIONS_PER_SECOND  # under the cap the rate is only what arrived
    pacer.come_back(RATE_WINDOW)
    assert math.isclose(pacer.rate(), max(MIN_ADMISSIONS_PER_SECOND, 100 * PACED_SHARE), rel_tol=0.05)


def test_the_pace_follows_a_machine_that_got_freer() -> None:
    pacer = ComeBackPacer()
    for index in range(500):  # 100 a second, then 400 a second
        pacer.admitted(index / 100)
    pacer.come_back(5.0)
    slow = pacer.rate()
    for index in range(2000):
        pacer.admitted(10.0 + index / 400)
    pacer.come_back(15.0)
    assert pacer.rate() > 3 * slow


def test_a_few_admissions_say_nothing_of_capacity() -> None:
    pacer = ComeBackPacer()
    for index in range(RATE_MIN_SAMPLES - 1):
        pacer.admitted(index * 0.001)
    pacer.come_back(1.0)
    assert pacer.rate() == DEFAULT_ADMISSIONS_PER_SECOND


def test_the_pace_is_held_within_its_bounds() -> None:
    fast = ComeBackPacer()
    for index in range(20_000):
        fast.admitted(index * 0.0001)
    fast.come_back(2.0)
    assert fast.rate() == MAX_ADMISSIONS_PER_SECOND
    starved = ComeBackPacer()
    for index in range(RATE_MIN_SAMPLES):
        starved.admitted(index * 0.05)  # 20 a second
    starved.come_back(RATE_MIN_SAMPLES * 0.05)
    assert starved.rate() == MIN_ADMISSIONS_PER_SECOND


def test_a_stop_spreads_its_tunnels_from_the_first_slot_at_the_pace() -> None:
    times = ComeBackPacer().stop_times(10_000)
    assert times[0] == STOP_FIRST_RETRY
    assert math.isclose(times[-1] - times[0], 9999 / DEFAULT_ADMISSIONS_PER_SECOND)
    assert len(set(times)) == len(times)


def test_slots_follow_the_times_a_predecessor_told() -> None:
    pacer = ComeBackPacer()
    pacer.follow(130.0)  # a stopped relay's agents keep arriving until then
    told = [100.0 + pacer.come_back(100.0) for _ in range(10)]
    assert told[0] > 130.0
    assert all(math.isclose(b - a, 1.0 / DEFAULT_ADMISSIONS_PER_SECOND) for a, b in zip(told, told[1:], strict=False))


def test_a_schedule_already_past_changes_nothing() -> None:
    followed, first = ComeBackPacer(), ComeBackPacer()
    followed.follow(50.0)
    assert followed.come_back(100.0) == first.come_back(100.0)
