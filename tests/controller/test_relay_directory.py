"""Which relay hosts which service, in the store: batches of changes, a restart's rows replaced, a dead relay ignored;
and a link kept only while its relay is active with its key."""

from __future__ import annotations

from types import SimpleNamespace

from controller.relay.broker import Broker
from controller.relay.directory import RemoteHost, ServiceDirectory
from controller.relay.link_admit import LinkPeer, still_admitted, why_not_admitted
from controller.relays import ACTIVE, RELAY_STALE_AFTER, RETIRED, REVOKED
from controller.store import Store
from tests.controller.fake_clock import T0, Clock


def relay_row(store: Store, name: str, heartbeat: float | None, status: str = ACTIVE) -> None:
    with store.transaction() as db:
        db.execute("INSERT INTO relays (name, address, status, created_at, heartbeat_at) VALUES (?, ?, ?, ?, ?) "
                   "ON CONFLICT (name) DO UPDATE SET status = excluded.status, heartbeat_at = excluded.heartbeat_at",
                   (name, f"{name}.example.net:443", status, T0, heartbeat))


def directory(store: Store, name: str, clock: Clock) -> ServiceDirectory:
    return ServiceDirectory(store, name, Broker(), clock)


def test_binds_are_published_by_difference_and_found_by_other_relays_only(store: Store) -> None:
    clock = Clock()
    relay_row(store, "ra", T0)
    relay_row(store, "rb", T0)
    a, b = directory(store, "ra", clock), directory(store, "rb", clock)
    b.write({("default", "modbus", "default/gw-1"), ("default", "modbus", "default/gw-2"),
             ("acme", "ssh", "acme/gw-9")})
    host = RemoteHost("rb", "rb.example.net:443", "default/gw-1")
    assert a.hosts(("default", "modbus")) == [host, RemoteHost("rb", "rb.example.net:443", "default/gw-2")]
    assert b.hosts(("default", "modbus")) == []  # a relay never links to itself
    assert a.hosts(("default", "ssh")) == []  # tenants apart
    b.write({("default", "modbus", "default/gw-1")})  # gw-2 went, acme/ssh unbound
    assert a.hosts(("default", "modbus")) == [host]
    assert a.hosts(("acme", "ssh")) == []
    b.remove_all()  # a relay stopping withdraws everything
    assert a.hosts(("default", "modbus")) == []


def test_a_restart_replaces_the_rows_a_previous_run_left(store: Store) -> None:
    clock = Clock()
    relay_row(store, "ra", T0)
    relay_row(store, "rb", T0)
    directory(store, "rb", clock).write({("default", "modbus", "default/gw-1")})
    # Killed: nothing withdrawn. Started again with no binder yet: its first batch clears the old rows.
    directory(store, "rb", clock).write(set())
    assert directory(store, "ra", clock).hosts(("default", "modbus")) == []


def test_a_relay_whose_heartbeat_stopped_or_that_was_retired_hosts_nothing(store: Store) -> None:
    clock = Clock()
    relay_row(store, "ra", T0)
    relay_row(store, "rb", T0)
    directory(store, "rb", clock).write({("default", "modbus", "default/gw-1")})
    a = directory(store, "ra", clock)
    clock.now = T0 + RELAY_STALE_AFTER + 1  # rb died without withdrawing
    assert a.hosts(("default", "modbus")) == []
    relay_row(store, "rb", clock.now)  # it beat again
    assert len(a.hosts(("default", "modbus"))) == 1
    relay_row(store, "rb", clock.now, RETIRED)
    assert a.hosts(("default", "modbus")) == []


def test_a_link_outlives_its_relay_s_renewal_but_not_a_revocation_or_a_new_key(store: Store) -> None:
    context = SimpleNamespace(store=store)  # still_admitted reads the store only
    relay_row(store, "ra", T0)
    with store.transaction() as db:
        db.execute("UPDATE relays SET key_sha256 = 'k1', serial = 'a1' WHERE name = 'ra'")
    peer = LinkPeer("ra", "a1", "k1", float("inf"))
    assert still_admitted(context, peer) is None  # type: ignore[arg-type]
    with store.transaction() as db:  # renewed: a new serial for the same key
        db.execute("UPDATE relays SET serial = 'a2' WHERE name = 'ra'")
    assert still_admitted(context, peer) is None  # type: ignore[arg-type]
    with store.transaction() as db:
        db.execute("UPDATE relays SET key_sha256 = 'k2' WHERE name = 'ra'")
    assert still_admitted(context, peer) == "relay ra was enrolled again with another key"  # type: ignore[arg-type]
    relay_row(store, "ra", T0, REVOKED)
    assert still_admitted(context, peer) == "relay ra is revoked"  # type: ignore[arg-type]


def test_every_link_is_judged_from_one_read_of_the_relays_in_the_order_asked(store: Store) -> None:
    context = SimpleNamespace(store=store)
    for name, status in [("ra", ACTIVE), ("rb", ACTIVE), ("rc", REVOKED)]:
        relay_row(store, name, T0, status)
    with store.transaction() as db:
        db.execute("UPDATE relays SET key_sha256 = 'k-' || name")
    peers = [LinkPeer("rb", "b1", "k-rb", float("inf")), LinkPeer("ra", "a1", "k-old", float("inf")),
             LinkPeer("rc", "c1", "k-rc", float("inf")), LinkPeer("rz", "z1", "k-rz", float("inf")),
             LinkPeer("rb", "b2", "k-rb", float("inf"))]
    assert why_not_admitted(context, peers) == [  # type: ignore[arg-type]
        None, "relay ra was enrolled again with another key", "relay rc is revoked", "relay rz is removed", None]
    assert why_not_admitted(context, []) == []  # type: ignore[arg-type]
