"""Grants on a real store: bad requests refused in one sentence, pending ones expire on their own, never approved late."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from controller.audit import AuditLog
from controller.errors import ControllerError
from controller.grants import PENDING_GRANT_SECONDS, Grants
from controller.policy import PolicyEngine
from controller.registry import Registry
from controller.store import Store


@pytest.fixture
def grants(tmp_path: Path):
    store = Store(tmp_path / "store.sqlite3")
    audit = AuditLog(store)
    registry = Registry(store, audit, "outpost.local")
    with store.transaction() as db:
        registry.create_identity_in(db, "default", "gw-1", ("gateway",))
    registry.create_service("default", "modbus", ())
    yield Grants(store, audit, registry, PolicyEngine(store, audit)), store
    store.close()


def rows(store: Store, table: str) -> list[tuple]:
    return [tuple(r) for r in store.query(f"SELECT * FROM {table} ORDER BY 1")]


@pytest.mark.parametrize(("service", "lifetime", "reason", "code", "fragment"), [
    ("modbus", "an hour", "x", "invalid_duration", "'an hour' is not a duration"),
    ("modbus", "2d", "x", "invalid_duration", "A grant runs at most 24 h"),
    ("modbus", "1h", "", "invalid_reason", "Say why you need it in --reason"),
    ("scada", "1h", "x", "service_unknown", "There is no service default/scada"),
    ("modbus@gw-9", "1h", "x", "identity_unknown", "There is no gateway default/gw-9"),
    ("modbus@GW", "1h", "x", "invalid_name", "gateway name"),
])
def test_a_bad_request_is_refused_in_one_sentence_and_writes_nothing(grants, service, lifetime, reason, code,
                                                                    fragment) -> None:
    engine, store = grants
    with pytest.raises(ControllerError) as refused:
        engine.request("default/oscar", service, lifetime, reason)
    assert fragment in refused.value.message and "\n" not in refused.value.message
    assert rows(store, "grants") == []


def test_a_pending_grant_expires_on_its_own_and_cannot_be_approved_after(grants, monkeypatch) -> None:
    engine, store = grants
    grant = engine.request("default/oscar", "modbus@gw-1", "1h", "PLC firmware")
    late = grant.requested_at + PENDING_GRANT_SECONDS + 1
    # Before the sweep ran: the approval sees the time and refuses.
    with monkeypatch.context() as patched:
        patched.setattr("controller.grants.time.time", lambda: late)
        with pytest.raises(ControllerError) as refused:
            engine.decide(grant.id, "default/april", True)
    assert refused.value.code == "grant_expired" and refused.value.status == 409
    assert refused.value.message.startswith(f"Grant {grant.id} expired at ")
    assert rows(store, "policies") == []
    assert engine.expire_pending(late) == [grant.id]
    assert engine.expire_pending(late) == []
    expired = [json.loads(r["fields"]) for r in store.query("SELECT fields FROM audit WHERE event = 'grant_expired'")]
    assert expired[0]["correlation"] == grant.correlation
    with pytest.raises(ControllerError) as refused:
        engine.decide(grant.id, "default/april", True)
    assert refused.value.message == f"Grant {grant.id} is expired already; a grant is answered once."


def test_a_denied_grant_creates_no_policy_and_an_unknown_one_is_named(grants) -> None:
    engine, store = grants
    grant = engine.request("default/oscar", "modbus", "30m", "read only")
    assert engine.decide(grant.id, "default/april", False).status == "denied"
    assert rows(store, "policies") == []
    with pytest.raises(ControllerError) as refused:
        engine.decide(99, "default/april", True)
    assert (refused.value.status, refused.value.message) == (
        404, "There is no grant 99; outpostctl grant list shows them.")


def test_a_person_cannot_flood_the_approvers(grants) -> None:
    from controller.grants import MAX_PENDING_PER_PERSON

    engine, store = grants
    for _ in range(MAX_PENDING_PER_PERSON):
        engine.request("default/oscar", "modbus", "1h", "again")
    with pytest.raises(ControllerError) as refused:
        engine.request("default/oscar", "modbus", "1h", "again")
    assert refused.value.code == "too_many_grants" and refused.value.status == 429
    assert len(rows(store, "grants")) == MAX_PENDING_PER_PERSON
    engine.request("default/tina", "modbus", "1h", "someone else")  # others are not held up
