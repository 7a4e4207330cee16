"""The broker's binds: the order tunnels bound in, and unbinding one tunnel without looking at the others."""

from __future__ import annotations

from typing import Any, cast

from controller.relay.broker import Broker


class Tunnel:
    """Stands in for a RelaySession: counts how often the broker compares it with another tunnel."""

    compared = 0

    def __init__(self, closed: bool = False) -> None:
        self.conn = type("Conn", (), {"closed": closed})()
        self.identity = None

    def __eq__(self, other: object) -> bool:
        Tunnel.compared += 1
        return self is other

    __hash__ = object.__hash__


def tunnels(count: int) -> list[Any]:
    return [Tunnel() for _ in range(count)]


def test_the_newest_live_binder_serves_and_a_repeated_bind_keeps_its_place() -> None:
    broker = Broker()
    first, second, third = tunnels(3)
    key = ("acme", "modbus")
    for tunnel in (first, second, third, first):
        broker.bind(key, tunnel)
    assert broker.binders(key) == [first, second, third]
    assert broker.binder(key) is third
    cast("Tunnel", third).conn.closed = True
    assert broker.binder(key) is second


def test_unbinding_a_tunnel_leaves_the_others_and_drops_keys_nobody_binds() -> None:
    broker = Broker()
    first, second = tunnels(2)
    broker.bind(("acme", "modbus"), first)
    broker.bind(("acme", "ssh"), first)
    broker.bind(("acme", "modbus"), second)
    assert broker.keys_bound_by(first) == {("acme", "modbus"), ("acme", "ssh")}
    assert broker.bound_services(first) == ["acme/modbus", "acme/ssh"]
    broker.unbind_all(first)
    broker.unbind_all(first)  # a tunnel is unregistered twice at a stop: the second finds nothing
    assert broker.binders(("acme", "modbus")) == [second]
    assert broker.binders(("acme", "ssh")) == []
    assert broker.keys_bound_by(first) == frozenset() and broker.bound_services(first) == []
    broker.unbind_all(second)
    assert cast("dict[object, object]", broker._binders) == {}


def test_unbinding_one_tunnel_compares_it_with_no_other_tunnel() -> None:
    # Each tunnel used to be looked for in every key's list: a stop of 10,000 tunnels
    # binding a service each was 10,000 x 10,000 comparisons (2.8 s; tests/bench/fleet_scale.py).
    broker = Broker()
    fleet = tunnels(200)
    for number, tunnel in enumerate(fleet):
        broker.keys_bound_by(tunnel)  # as a BIND asks first
        broker.bind(("acme", f"service-{number}"), tunnel)
        broker.bind(("acme", "shared"), tunnel)
    Tunnel.compared = 0
    for tunnel in fleet:
        broker.unbind_all(tunnel)
    assert Tunnel.compared == 0
    assert broker.binders(("acme", "shared")) == []
