"""The status watcher: a change made through one store connection reaches another process's listeners."""

from __future__ import annotations

from pathlib import Path

from controller.audit import AuditLog
from controller.registry import Identity, Registry
from controller.store import Store
from controller.watcher import MAX_CHANGES_PER_POLL, StatusWatcher
from tests.controller.harness import TEST_CHAIN_KEY


def two_processes(path: Path | str) -> tuple[Registry, Registry, Store]:
    """Two registries on two connections to one store (either engine), as two controller processes hold them."""
    store_a, store_b = Store(path), Store(path)
    registry_a = Registry(store_a, AuditLog(store_a, chain_key=TEST_CHAIN_KEY), "outpost.test")
    registry_b = Registry(store_b, AuditLog(store_b, chain_key=TEST_CHAIN_KEY), "outpost.test")
    return registry_a, registry_b, store_b


def test_a_revocation_through_another_connection_reaches_this_process_on_the_next_poll(store_location: Path | str) -> None:
    registry_a, registry_b, store_b = two_processes(store_location)
    with registry_a._store.transaction() as db:
        registry_a.create_identity_in(db, "default", "gw", ())
        registry_a.create_identity_in(db, "default", "other", ())
    heard_b: list[Identity] = []
    registry_b.on_revoked(heard_b.append)
    watcher = StatusWatcher(store_b, registry_b)
    assert watcher.poll_once() == []

    registry_a.revoke("default", "gw")
    registry_a.disable("default", "other")
    assert heard_b == []  # nothing reaches B until it polls
    announced = watcher.poll_once()
    assert [(i.name, i.status) for i in announced] == [("gw", "revoked"), ("other", "disabled")]
    assert heard_b == announced
    assert watcher.poll_once() == []  # each change once


def test_an_identity_enabled_again_before_the_poll_is_not_closed(store_location: Path | str) -> None:
    registry_a, registry_b, store_b = two_processes(store_location)
    with registry_a._store.transaction() as db:
        registry_a.create_identity_in(db, "default", "gw", ())
    watcher = StatusWatcher(store_b, registry_b)
    registry_a.disable("default", "gw")
    registry_a.enable("default", "gw")
    assert watcher.poll_once() == []


def test_changes_from_before_the_process_started_are_not_replayed(store_location: Path | str) -> None:
    registry_a, registry_b, store_b = two_processes(store_location)
    with registry_a._store.transaction() as db:
        registry_a.create_identity_in(db, "default", "gw", ())
    registry_a.revoke("default", "gw")
    assert StatusWatcher(store_b, registry_b).poll_once() == []


def test_a_burst_drains_over_several_polls(store_location: Path | str) -> None:
    registry_a, registry_b, store_b = two_processes(store_location)
    count = MAX_CHANGES_PER_POLL + 20
    with registry_a._store.transaction() as db:
        for i in range(count):
            registry_a.create_identity_in(db, "default", f"gw-{i}", ())
    watcher = StatusWatcher(store_b, registry_b)
    for i in range(count):
        registry_a.disable("default", f"gw-{i}")
    assert len(watcher.poll_once()) == MAX_CHANGES_PER_POLL
    assert len(watcher.poll_once()) == 20


def test_the_poll_is_one_indexed_query(tmp_path: Path) -> None:
    _, _, store_b = two_processes(tmp_path / "store.sqlite3")
    plan = store_b.query("EXPLAIN QUERY PLAN SELECT seq, tenant, name, status FROM status_changes "
                         "WHERE seq > ? ORDER BY seq LIMIT ?", (0, 10))
    detail = " ".join(row["detail"] for row in plan)
    assert "SEARCH status_changes USING INTEGER PRIMARY KEY" in detail, detail


def _enroll_key(registry: Registry, name: str, key_sha256: str) -> None:
    """What a redemption does to the identity's key, in one transaction (controller/enrollment.py)."""
    with registry._store.transaction() as db:
        identity = registry.get_identity_in(db, "default", name)
        registry.enroll_key_in(db, identity, key_sha256, 2e9)


def test_a_re_enrollment_through_another_connection_reaches_this_process_as_rekeyed(store_location: Path | str) -> None:
    registry_a, registry_b, store_b = two_processes(store_location)
    with registry_a._store.transaction() as db:
        registry_a.create_identity_in(db, "default", "gw", ())
    _enroll_key(registry_a, "gw", "aa" * 32)
    rekeyed_b: list[Identity] = []
    revoked_b: list[Identity] = []
    registry_b.on_rekeyed(rekeyed_b.append)
    registry_b.on_revoked(revoked_b.append)
    watcher = StatusWatcher(store_b, registry_b)

    _enroll_key(registry_a, "gw", "aa" * 32)  # the same key again (a crash retry): no change to announce
    assert watcher.poll_once() == []
    _enroll_key(registry_a, "gw", "bb" * 32)
    assert rekeyed_b == []
    announced = watcher.poll_once()
    assert [(i.name, i.key_sha256) for i in announced] == [("gw", "bb" * 32)]
    assert rekeyed_b == announced and revoked_b == []
    assert watcher.poll_once() == []


def test_a_rekey_announces_the_key_current_at_the_poll_not_the_one_in_the_row(store_location: Path | str) -> None:
    registry_a, registry_b, store_b = two_processes(store_location)
    with registry_a._store.transaction() as db:
        registry_a.create_identity_in(db, "default", "gw", ())
    watcher = StatusWatcher(store_b, registry_b)
    heard: list[Identity] = []
    registry_b.on_rekeyed(heard.append)
    _enroll_key(registry_a, "gw", "aa" * 32)
    _enroll_key(registry_a, "gw", "bb" * 32)
    watcher.poll_once()
    # Both rows announce what holds now: every tunnel not on the newest key closes.
    assert {i.key_sha256 for i in heard} == {"bb" * 32}


def test_revocation_listeners_are_not_told_of_a_rekey_nor_rekey_listeners_of_a_revocation(store_location: Path | str) -> None:
    registry_a, registry_b, store_b = two_processes(store_location)
    with registry_a._store.transaction() as db:
        registry_a.create_identity_in(db, "default", "gw", ())
    watcher = StatusWatcher(store_b, registry_b)
    rekeyed: list[Identity] = []
    registry_b.on_rekeyed(rekeyed.append)
    registry_a.revoke("default", "gw")
    assert [i.status for i in watcher.poll_once()] == ["revoked"]
    assert rekeyed == []
