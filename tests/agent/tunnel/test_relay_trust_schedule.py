"""When an agent leaves a tunnel before its relay's certificate ends: a property of the schedule alone (sans-IO)."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from agent.tunnel.relay_trust import BACKDATE, LEAVE_BY, LEAVE_FROM, leave_at

#: A relay certificate of 6 h (the default), dated BACKDATE before it was issued, as the CA does.
ISSUED = 1_800_000_000.0
LIFE = 6 * 3600.0
NOT_BEFORE, NOT_AFTER = ISSUED - BACKDATE, ISSUED + LIFE
#: Relays renew (and push) at two thirds of the life they see (controller/relay_node.py).
RELAY_RENEWS_AT = NOT_BEFORE + (NOT_AFTER - NOT_BEFORE) * 2 / 3

lives = st.floats(min_value=1.0, max_value=400 * 24 * 3600.0)
draws = st.floats(min_value=0.0, max_value=1.0, exclude_max=True)


@given(life=lives, backdated=st.booleans(), elapsed=st.floats(min_value=0.0, max_value=1.2), draw=draws,
       left_before=st.integers(min_value=0, max_value=5))
def test_the_leave_is_never_before_now_nor_after_the_end(life: float, backdated: bool, elapsed: float,
                                                         draw: float, left_before: int) -> None:
    not_before = ISSUED - (BACKDATE if backdated else 0.0)
    not_after = ISSUED + life
    now = not_before + (not_after - not_before) * elapsed
    moment = leave_at(not_before, not_after, now, draw, left_before)
    assert moment <= not_after
    if now <= not_after:
        assert moment >= now


@given(draw=draws)
def test_a_tunnel_up_early_leaves_in_the_window_after_the_relay_renewed(draw: float) -> None:
    moment = leave_at(NOT_BEFORE, NOT_AFTER, ISSUED + 60, draw)
    assert ISSUED + LIFE * LEAVE_FROM <= moment <= ISSUED + LIFE * LEAVE_BY
    # Past the relay's renewal by more than a few of its retries (a minute each): the push had time to come.
    assert moment - RELAY_RENEWS_AT > 30 * 60


@given(elapsed=st.floats(min_value=LEAVE_BY, max_value=0.999), draw=draws)
def test_a_tunnel_up_past_the_window_leaves_between_now_and_the_end(elapsed: float, draw: float) -> None:
    now = ISSUED + LIFE * elapsed
    assert now <= leave_at(NOT_BEFORE, NOT_AFTER, now, draw) <= NOT_AFTER


def test_a_fleet_of_ten_thousand_leaves_spread_over_the_window() -> None:
    """10,000 agents that came up at the same moment do not all come back at once."""
    rng = random.Random(11)
    moments = sorted(leave_at(NOT_BEFORE, NOT_AFTER, ISSUED, rng.random()) for _ in range(10_000))
    window = LIFE * (LEAVE_BY - LEAVE_FROM)
    assert moments[-1] - moments[0] > 0.95 * window
    # No minute of the window takes more than twice its even share (72 min: 139 a minute).
    per_minute: dict[int, int] = {}
    for moment in moments:
        per_minute[int(moment // 60)] = per_minute.get(int(moment // 60), 0) + 1
    assert max(per_minute.values()) <= 2 * 10_000 / (window / 60)


def test_a_certificate_already_ended_is_left_at_once() -> None:
    assert leave_at(NOT_BEFORE, NOT_AFTER, NOT_AFTER + 5, 0.5) == NOT_AFTER


@given(seed=st.integers(min_value=0, max_value=2**32), up_at=st.floats(min_value=0.0, max_value=0.999))
def test_a_relay_that_never_renews_costs_an_agent_at_most_three_leaves_per_certificate(seed: int,
                                                                                         up_at: float) -> None:
    """A controller outage (or a revoked relay): the agent comes back to the same certificate each time."""
    rng = random.Random(seed)
    now = ISSUED + LIFE * up_at
    left = 0
    while True:
        moment = leave_at(NOT_BEFORE, NOT_AFTER, now, rng.random(), left)
        if moment >= NOT_AFTER:
            break
        left += 1
        assert left <= 2  # two early leaves, then the tunnel stays to the end: three in all
        now = moment + rng.uniform(0.0, 5.0)  # the reconnect's backoff
        if now >= NOT_AFTER:
            break


@given(draw=draws)
def test_the_second_tunnel_on_the_same_certificate_stays_into_the_last_part(draw: float) -> None:
    moment = leave_at(NOT_BEFORE, NOT_AFTER, ISSUED + LIFE * LEAVE_FROM, draw, left_before=1)
    assert ISSUED + LIFE * LEAVE_BY <= moment <= NOT_AFTER
    assert leave_at(NOT_BEFORE, NOT_AFTER, ISSUED + LIFE * LEAVE_FROM, draw, left_before=2) == NOT_AFTER
