"""Policies are edited, removed and limited in time; each decision is counted, cheaply.

The store is real (SQLite, and PostgreSQL where the store_location fixture has one).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from controller.audit import AuditLog
from controller.errors import ControllerError
from controller.policy import PolicyEngine
from controller.registry import Registry
from controller.store import Store
from controller.watcher import StatusWatcher

#: The lifetime of the policy a test watches expire: a create commits (an fsync) and two decisions read the
#: store before it ends; one second left no room for a stalled commit on a loaded machine.
SHORT_POLICY_SECONDS = 3


@pytest.fixture
def world(store_location: Path | str):
    store = Store(store_location)
    audit = AuditLog(store, chain_key=b"k" * 32)
    registry = Registry(store, audit, "outpost.local")
    with store.transaction() as db:
        ops = registry.create_identity_in(db, "default", "ops", ("operator",))
        gw = registry.create_identity_in(db, "default", "gw", ("edge",))
    modbus = registry.create_service("default", "modbus", ("plc",))
    yield PolicyEngine(store, audit), store, {"ops": ops, "gw": gw}, modbus
    store.close()


def audit_rows(store: Store, event: str) -> list[dict]:
    import json

    return [json.loads(r["fields"]) for r in store.query("SELECT fields FROM audit WHERE event = ? ORDER BY id",
                                                          (event,))]


def policy_rows(store: Store) -> list[tuple]:
    return [tuple(r) for r in store.query("SELECT * FROM policies ORDER BY id")]


def test_an_update_is_a_new_version_and_the_audit_records_both(world) -> None:
    engine, store, who, modbus = world
    policy = engine.create("dial", "default", ["ops"], ["modbus"])
    old, new = engine.update(policy.id, {"identities": ["gw"], "expected_version": 1})
    assert (old.version, new.version, new.id) == (1, 2, policy.id)
    assert not engine.decide("dial", who["ops"], modbus).allowed
    assert engine.decide("dial", who["gw"], modbus).allowed
    [row] = audit_rows(store, "policy_updated")
    assert row["previous"]["identities"] == ["ops"] and row["previous"]["version"] == 1
    assert row["policy"]["identities"] == ["gw"] and row["policy"]["version"] == 2


def test_a_deleted_policy_allows_nothing_and_is_audited(world) -> None:
    engine, store, who, modbus = world
    policy = engine.create("dial", "default", ["ops"], ["modbus"])
    engine.delete(policy.id)
    assert engine.list() == [] and not engine.decide("dial", who["ops"], modbus).allowed
    assert audit_rows(store, "policy_deleted")[0]["identities"] == ["ops"]


@pytest.mark.parametrize(("action", "changes", "code", "sentence"), [
    ("update", {"identities": ["gw"]}, "policy_unknown", "There is no policy 99; outpostctl policy list shows them."),
    ("delete", None, "policy_unknown", "There is no policy 99; outpostctl policy list shows them."),
])
def test_an_unknown_policy_id_is_refused_in_one_sentence_and_nothing_changes(world, action, changes, code,
                                                                             sentence) -> None:
    engine, store, _, _ = world
    engine.create("dial", "default", ["ops"], ["modbus"])
    before = policy_rows(store)
    with pytest.raises(ControllerError) as refused:
        engine.update(99, changes) if action == "update" else engine.delete(99)
    assert (refused.value.code, refused.value.message, refused.value.status) == (code, sentence, 404)
    assert policy_rows(store) == before


@pytest.mark.parametrize(("changes", "code", "fragment"), [
    ({"for": "an hour"}, "invalid_duration", "'an hour' is not a duration; write a number and a unit"),
    ({"for": "0s"}, "invalid_duration", "is not a duration"),
    ({"for": "99999999999w"}, "invalid_duration", "longer than ten years"),
    ({"until": "2001-01-01T00:00:00Z"}, "invalid_time", "2001-01-01T00:00:00Z is in the past"),
    ({"until": "tomorrow"}, "invalid_time", "'tomorrow' is not a time; write it as ISO 8601"),
    ({"until": float("nan")}, "invalid_time", "is not a time"),
    ({"until": "2030-01-01T00:00:00Z", "for": "1h"}, "invalid_expiry", "not both"),
    ({"tenant": "acme"}, "invalid_policy", "cannot change 'tenant'"),
    ({"expected_version": 1}, "invalid_policy", "Say what to change"),
    ({"identities": ["gw"], "expected_version": True}, "invalid_policy", "expected_version is the version number"),
    ({"services": ["acme/modbus"]}, "cross_tenant_service", "only a policy of tenant acme opens its services"),
])
def test_bad_updates_are_refused_in_one_sentence_and_change_nothing(world, changes, code, fragment) -> None:
    engine, store, _, _ = world
    policy = engine.create("dial", "default", ["ops"], ["modbus"])
    before = policy_rows(store), audit_rows(store, "policy_updated")
    with pytest.raises(ControllerError) as refused:
        engine.update(policy.id, changes)
    assert refused.value.code == code and fragment in refused.value.message
    assert "\n" not in refused.value.message
    assert (policy_rows(store), audit_rows(store, "policy_updated")) == before


def test_an_update_that_lost_a_race_is_refused_and_says_what_to_do(world) -> None:
    engine, store, _, _ = world
    policy = engine.create("dial", "default", ["ops"], ["modbus"])
    engine.update(policy.id, {"identities": ["gw"], "expected_version": 1})
    before = policy_rows(store)
    with pytest.raises(ControllerError) as refused:
        engine.update(policy.id, {"identities": ["ops"], "expected_version": 1})
    assert refused.value.status == 409
    assert refused.value.message.startswith("Policy 1 is at version 2 now, not 1")
    assert policy_rows(store) == before


def test_a_decision_racing_updates_sees_one_version_or_the_other_never_a_mix(world) -> None:
    engine, _, who, modbus = world
    # Version A lets ops dial modbus; version B lets gw. A mix would let both or neither.
    policy = engine.create("dial", "default", ["ops"], ["modbus"])
    stop = threading.Event()
    mixes: list[tuple[bool, bool]] = []

    def updater() -> None:
        for n in range(40):
            engine.update(policy.id, {"identities": ["gw"] if n % 2 == 0 else ["ops"]})
        stop.set()

    thread = threading.Thread(target=updater)
    thread.start()
    deadline = time.monotonic() + 30
    while not stop.is_set() and time.monotonic() < deadline:
        listed = engine.list()  # one read, as a decision makes
        [p] = listed
        ops = p.allows(who["ops"], modbus)
        gw = p.allows(who["gw"], modbus)
        if ops == gw:
            mixes.append((ops, gw))
    thread.join()
    assert mixes == []


def test_an_expired_policy_allows_nothing_and_its_expiry_is_audited_once(world) -> None:
    engine, store, who, modbus = world
    # It must still be in force for the two checks right after its create, however slow the commit.
    policy = engine.create("dial", "default", ["ops"], ["modbus"], lifetime=f"{SHORT_POLICY_SECONDS}s")
    assert engine.decide("dial", who["ops"], modbus).allowed
    assert engine.record_expiries() == []
    assert policy.expires_at is not None
    time.sleep(max(0.0, policy.expires_at - time.time()) + 0.1)
    decision = engine.decide("dial", who["ops"], modbus)
    assert not decision.allowed and decision.reason == "no policy allows identity default/ops to dial service default/modbus"
    assert engine.record_expiries() == [policy.id]
    assert engine.record_expiries() == []
    [row] = audit_rows(store, "policy_expired")
    assert row["id"] == policy.id and row["reason"].startswith(f"policy {policy.id} expired at ")
    assert engine.list()[0].to_json()["expired"] is True
    # Extended by an update, it allows again, and its next expiry is audited again.
    engine.update(policy.id, {"for": "1h"})
    assert engine.decide("dial", who["ops"], modbus).allowed


def test_decisions_are_counted_in_memory_and_written_in_one_batch(world) -> None:
    engine, store, who, modbus = world
    policy = engine.create("dial", "default", ["ops"], ["modbus"])
    commits = store.commits
    for _ in range(50):
        engine.decide("dial", who["ops"], modbus)
    engine.decide("dial", who["gw"], modbus)  # denied: no policy made it
    assert store.commits == commits  # not a write per decision
    [listed] = engine.list_with_counts()
    assert listed.decisions == 50 and listed.last_allowed_at is not None
    assert engine.list()[0].decisions == 0
    assert engine.counters.flush() == 1
    assert store.commits == commits + 1
    [stored] = engine.list()
    assert stored.id == policy.id and stored.decisions == 50 and stored.last_allowed_at == listed.last_allowed_at
    assert engine.counters.flush() == 0


def test_a_policy_change_in_another_process_reaches_this_ones_listeners(store_location: Path | str) -> None:
    store_a, store_b = Store(store_location), Store(store_location)
    try:
        audit_a, audit_b = AuditLog(store_a, chain_key=b"k" * 32), AuditLog(store_b, chain_key=b"k" * 32)
        engine_a, engine_b = PolicyEngine(store_a, audit_a), PolicyEngine(store_b, audit_b)
        watcher_b = StatusWatcher(store_b, Registry(store_b, audit_b, "outpost.local"), policies=engine_b)
        heard: list[int] = []
        engine_b.on_changed(heard.append)
        policy = engine_a.create("dial", "default", ["ops"], ["modbus"])
        engine_a.update(policy.id, {"identities": ["gw"]})
        engine_a.delete(policy.id)
        watcher_b.poll_once()
        assert heard == [policy.id]  # once per poll, however many changes
    finally:
        store_a.close()
        store_b.close()
