"""Presence in the store: batched writes, several processes merged, restarts survived, overdue gateways."""

from __future__ import annotations

from controller.fleet import FleetFilter, fleet
from controller.presence import (
    LAST_SEEN_RESOLUTION,
    OVERDUE_KEEPALIVES,
    PRESENCE_STALE_AFTER,
    RELAY_ROW_RETENTION,
    PresenceBook,
    TunnelPresence,
    row_lag,
)
from controller.registry import Identity
from controller.store import Store
from tests.controller.fake_clock import T0, Clock


def identity(name: str, tenant: str = "default", roles: tuple[str, ...] = ("gateway",),
             not_after: float | None = None) -> Identity:
    return Identity(name=name, tenant=tenant, roles=roles, uri=f"spiffe://t/{tenant}/{name}", status="enrolled",
                    created_at=T0 - 86400, cert_not_after=not_after)


def tunnel(name: str, clock: Clock, seen: list[float], keepalive: float | None = 25.0) -> TunnelPresence:
    return TunnelPresence("default", name, "127.0.0.7:40000", clock.now, keepalive, lambda: seen[0])


def test_keepalives_write_nothing_until_last_seen_moved_a_resolution(store: Store) -> None:
    clock = Clock()
    book = PresenceBook(store, "relay-a", clock)
    seen = [clock.now]
    book.up(tunnel("gw", clock, seen))
    book.write(book.collect())
    assert book.rows_written == 1
    for step in range(1, 10):  # keepalives every few seconds: no row is due
        seen[0] = clock.now = T0 + step * 5
        assert book.collect() == []
    seen[0] = clock.now = T0 + LAST_SEEN_RESOLUTION
    [row] = book.collect()
    assert row[5] == T0 + LAST_SEEN_RESOLUTION


def test_a_report_or_the_end_of_a_tunnel_is_written_at_the_next_batch(store: Store) -> None:
    clock = Clock()
    book = PresenceBook(store, "relay-a", clock)
    seen = [clock.now]
    live = tunnel("gw", clock, seen)
    book.up(live)
    book.write(book.collect())
    book.report(live, {"agent_version": "1.2", "rtt_ms": 80.0})
    [row] = book.collect()
    assert '"agent_version": "1.2"' in row[8] and row[3] == 1
    seen[0] = clock.now = T0 + 7
    book.down(live)
    [row] = book.collect()
    assert row[3] == 0 and row[5] == T0 + 7
    book.write([row])
    [entry] = fleet(store, [identity("gw")], PresenceBook(store, "reader", clock), now=clock.now)
    assert (entry["presence"], entry["last_seen"], entry["agent_version"]) == ("offline", T0 + 7, "1.2")


def test_presence_survives_a_restart_and_a_killed_process_reads_offline(store: Store) -> None:
    clock = Clock()
    first = PresenceBook(store, "relay-a", clock)
    seen = [clock.now]
    first.up(tunnel("gw", clock, seen))
    first.write(first.collect())
    # The process is killed: no down, no last batch. Another one starts on the store.
    after = PresenceBook(store, "relay-b", clock)
    clock.now = T0 + 10
    [entry] = fleet(store, [identity("gw")], after, now=clock.now)
    assert entry["presence"] == "online" and entry["relay"] == "relay-a"
    clock.now = T0 + PRESENCE_STALE_AFTER + 1
    [entry] = fleet(store, [identity("gw")], after, now=clock.now)
    assert (entry["presence"], entry["last_seen"], entry["connected_since"]) == ("offline", T0, None)


def test_several_processes_merge_and_the_newest_tunnel_wins(store: Store) -> None:
    clock = Clock()
    a, b = PresenceBook(store, "relay-a", clock), PresenceBook(store, "relay-b", clock)
    old, new = [T0], [T0 + 5]
    a_tunnel = tunnel("gw", clock, old)
    a.up(a_tunnel)
    a.report(a_tunnel, {"agent_version": "1.0"})
    a.write(a.collect())
    clock.now = T0 + 5
    b.up(tunnel("gw", clock, new))  # a reconnect landed on the other process; its report is still on its way
    b.up(tunnel("gw2", clock, new))
    b.write(b.collect())
    a.down(a_tunnel)
    a.write(a.collect())
    for reader in (a, b, PresenceBook(store, "relay-c", clock)):
        entries = {e["name"]: e for e in fleet(store, [identity("gw"), identity("gw2"), identity("gw3")], reader,
                                               now=clock.now)}
        assert entries["gw"]["presence"] == "online" and entries["gw"]["relay"] == "relay-b"
        assert entries["gw"]["agent_version"] == "1.0"  # the last report anyone kept
        assert entries["gw2"]["presence"] == "online"
        assert entries["gw3"]["presence"] == "never" and entries["gw3"]["last_seen"] is None


def test_overdue_after_two_keepalives_of_silence_even_with_the_socket_held(store: Store) -> None:
    clock = Clock()
    book = PresenceBook(store, "relay-a", clock)
    seen = [T0]
    book.up(tunnel("gw", clock, seen, keepalive=25.0))
    book.write(book.collect())
    clock.now = T0 + OVERDUE_KEEPALIVES * 25.0 - 1
    assert fleet(store, [identity("gw")], book, now=clock.now)[0]["presence"] == "online"
    clock.now = T0 + OVERDUE_KEEPALIVES * 25.0 + 1
    assert fleet(store, [identity("gw")], book, now=clock.now)[0]["presence"] == "overdue"
    # Another process reads the batched row: it allows for the batch's lag, then says overdue too.
    other = PresenceBook(store, "relay-b", clock)
    assert fleet(store, [identity("gw")], other, now=clock.now)[0]["presence"] == "online"
    clock.now = T0 + OVERDUE_KEEPALIVES * 25.0 + row_lag(False) + 1
    book.write([])  # relay-a's heartbeat goes on: it is alive, the gateway is not answering
    assert fleet(store, [identity("gw")], other, now=clock.now)[0]["presence"] == "overdue"


def test_filters(store: Store) -> None:
    clock = Clock()
    book = PresenceBook(store, "relay-a", clock)
    book.up(tunnel("on", clock, [T0]))
    people = [identity("on", not_after=T0 + 3600), identity("off", not_after=T0 + 30 * 86400),
              identity("ops", tenant="acme", roles=("sensor",), not_after=T0 - 5)]
    names = lambda keep: [e["name"] for e in fleet(store, people, book, keep, now=T0)]  # noqa: E731
    assert names(FleetFilter(presence=frozenset({"never", "offline"}))) == ["off", "ops"]
    assert names(FleetFilter(presence=frozenset({"online"}))) == ["on"]
    assert names(FleetFilter(expiring_within=86400)) == ["on", "ops"]  # an expired one is expiring too
    assert names(FleetFilter(tenant="acme")) == ["ops"]
    assert names(FleetFilter(role="sensor")) == ["ops"]


def test_heartbeat_rows_of_long_gone_processes_are_removed(store: Store) -> None:
    clock = Clock()
    PresenceBook(store, "relay-old", clock).write([])
    clock.now = T0 + RELAY_ROW_RETENTION + 1
    PresenceBook(store, "relay-new", clock).write([])
    assert [row["relay"] for row in store.query("SELECT relay FROM presence_relays")] == ["relay-new"]


def test_a_stop_writes_every_tunnels_offline_row_in_one_batch_and_older_offline_rows_go(store: Store) -> None:
    clock = Clock()
    earlier = PresenceBook(store, "relay-earlier", clock)
    fleet_names = [f"gw-{n:03d}" for n in range(120)]
    for name in fleet_names:  # each was on another process before, and went offline there
        earlier_tunnel = tunnel(name, clock, [T0])
        earlier.up(earlier_tunnel)
        earlier.down(earlier_tunnel)
    earlier.write(earlier.collect())
    clock.now = T0 + 10
    book = PresenceBook(store, "relay-a", clock)
    seen = [clock.now]
    live = [tunnel(name, clock, seen) for name in fleet_names]
    for each in live:
        book.up(each)
    book.write(book.collect())
    seen[0] = clock.now = T0 + 20
    for each in live:  # the stop ends them all, then writes once
        book.down(each)
    flushes, written = book.flushes, book.rows_written
    book.write(book.collect())
    assert (book.flushes - flushes, book.rows_written - written) == (1, len(fleet_names))
    entries = fleet(store, [identity(name) for name in fleet_names], PresenceBook(store, "reader", clock),
                    now=clock.now)
    assert {(e["presence"], e["last_seen"], e["relay"]) for e in entries} == {("offline", T0 + 20, "relay-a")}
    # The other process's older offline rows went with it: one row per gateway is left.
    assert store.query_one("SELECT COUNT(*) AS n FROM presence")["n"] == len(fleet_names)  # type: ignore[index]
