"""Failover order: the next relay after a failed connect, the same relay after a dropped tunnel."""

from __future__ import annotations

import pytest

from agent.tunnel.relays import MAX_RELAYS, RelayRotation, valid_relay_list

A, B, C = "wss://a.example/v1/tunnel", "wss://b.example/v1/tunnel", "wss://c.example/v1/tunnel"


def test_a_failed_connect_moves_to_the_next_relay_and_wraps() -> None:
    rotation = RelayRotation([A, B, C])
    assert rotation.current() == A
    assert [rotation.connect_failed() for _ in range(4)] == [B, C, A, B]


def test_a_dropped_tunnel_retries_the_same_relay() -> None:
    rotation = RelayRotation([A, B])
    rotation.connect_failed()
    assert rotation.tunnel_dropped() == B


def test_the_controllers_list_is_adopted_with_the_working_relay_first() -> None:
    rotation = RelayRotation(["wss://127.0.0.1:9/v1/tunnel"])
    assert rotation.refresh([A, B], connected="wss://127.0.0.1:9/v1/tunnel")
    assert rotation.relays == ["wss://127.0.0.1:9/v1/tunnel", A, B]
    assert not rotation.refresh([A, B], connected="wss://127.0.0.1:9/v1/tunnel")
    rotation2 = RelayRotation([B])
    rotation2.refresh([A, B, C], connected=B)
    assert rotation2.relays == [B, A, C] and rotation2.current() == B


@pytest.mark.parametrize("value", [None, "wss://a", [], [1], ["https://a"], ["wss://" + "a" * 3000],
                                   [A] * (MAX_RELAYS + 1)])
def test_a_malformed_relay_list_is_ignored(value) -> None:
    assert valid_relay_list(value) is None


def test_a_relay_list_is_deduplicated() -> None:
    assert valid_relay_list([A, B, A]) == [A, B]


def test_the_next_relay_is_untried_until_every_relay_failed_in_a_row() -> None:
    rotation = RelayRotation([A, B, C])
    rotation.tunnel_dropped()
    assert rotation.untried  # nothing failed yet
    rotation.connect_failed()
    assert rotation.untried and rotation.current() == B  # A went away: B now, not after a backoff
    rotation.connect_failed()
    assert rotation.untried and rotation.current() == C
    rotation.connect_failed()
    assert not rotation.untried  # all three failed in a row: the backoff decides
    rotation.tunnel_up()
    assert rotation.untried
    single = RelayRotation([A])
    single.connect_failed()
    assert not single.untried  # one relay: always the backoff


def test_preferred_relays_come_first_in_every_list_the_controller_sends() -> None:
    eu, us = "wss://relay-eu.example:443/v1/tunnel", "wss://relay-us.example/v1/tunnel"
    rotation = RelayRotation([A, us, eu], prefer=("relay-eu.example:443", "relay-us.example"))
    assert rotation.relays == [eu, us, A] and rotation.current() == eu
    # A working tunnel stays first; the preferred ones follow it, then the controller's order.
    rotation.refresh([A, B, us, eu], connected=A)
    assert rotation.relays == [A, eu, us, B]
    assert RelayRotation([A, B], prefer=("elsewhere.example",)).relays == [A, B]
