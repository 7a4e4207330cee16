"""The relay forgets a silent tunnel after three of the agent's announced keepalives."""

from __future__ import annotations

import pytest

from controller.relay.tunnel_auth import RELAY_IDLE_MIN, RELAY_LIVENESS, relay_liveness_for


def test_three_keepalives_of_silence_end_a_tunnel() -> None:
    assert relay_liveness_for(110.0).idle_timeout == 330.0
    assert relay_liveness_for(25).idle_timeout == 75.0
    assert relay_liveness_for(110.0).keepalive_interval is None  # the relay never pings


def test_the_bounds_hold_for_tiny_and_huge_keepalives() -> None:
    assert relay_liveness_for(1.0).idle_timeout == RELAY_IDLE_MIN
    assert relay_liveness_for(3600.0).idle_timeout == RELAY_LIVENESS.idle_timeout


@pytest.mark.parametrize("announced", [None, "25", True, -1, 0, float("nan")])
def test_an_absent_or_odd_keepalive_keeps_the_default(announced) -> None:
    assert relay_liveness_for(announced) == RELAY_LIVENESS
