"""Policy decisions: deny by default, by name or role, across tenants only when named."""

from __future__ import annotations

from pathlib import Path

import pytest

from controller.audit import AuditLog
from controller.errors import ControllerError
from controller.policy import PolicyEngine
from controller.registry import Identity, Registry, Service
from controller.store import Store


@pytest.fixture
def world(tmp_path: Path):
    store = Store(tmp_path / "store.sqlite3")
    audit = AuditLog(store)
    registry = Registry(store, audit, "outpost.local")
    with store.transaction() as db:
        ops = registry.create_identity_in(db, "default", "ops", ("operator",))
        gw = registry.create_identity_in(db, "default", "gw", ("edge",))
        other = registry.create_identity_in(db, "acme", "ops", ("operator",))
    modbus = registry.create_service("default", "modbus", ("plc",))
    acme_modbus = registry.create_service("acme", "modbus", ("plc",))
    yield PolicyEngine(store, audit), registry, {"ops": ops, "gw": gw, "acme-ops": other}, {
        "modbus": modbus,
        "acme-modbus": acme_modbus,
    }
    store.close()


def test_nothing_is_allowed_without_a_policy_and_the_reason_says_so(world) -> None:
    engine, _, who, what = world
    decision = engine.decide("dial", who["ops"], what["modbus"])
    assert not decision.allowed
    assert decision.reason == "no policy allows identity default/ops to dial service default/modbus"


def test_a_policy_by_name_allows_that_identity_and_no_other(world) -> None:
    engine, _, who, what = world
    policy = engine.create("dial", "default", ["ops"], ["modbus"])
    decision = engine.decide("dial", who["ops"], what["modbus"])
    assert decision.allowed and decision.reason == f"allowed by policy {policy.id}"
    assert not engine.decide("dial", who["gw"], what["modbus"]).allowed
    assert not engine.decide("bind", who["ops"], what["modbus"]).allowed


def test_a_policy_by_role_matches_identities_and_services_holding_the_role(world) -> None:
    engine, _, who, what = world
    engine.create("bind", "default", ["role:edge"], ["role:plc"])
    assert engine.decide("bind", who["gw"], what["modbus"]).allowed
    assert not engine.decide("bind", who["ops"], what["modbus"]).allowed


def test_an_unprefixed_selector_never_reaches_another_tenant(world) -> None:
    engine, _, who, what = world
    engine.create("dial", "default", ["role:operator"], ["modbus"])
    denied = engine.decide("dial", who["acme-ops"], what["modbus"])
    assert not denied.allowed
    assert denied.reason == "no policy allows identity acme/ops to dial service default/modbus"
    assert not engine.decide("dial", who["ops"], what["acme-modbus"]).allowed


def test_a_policy_of_the_services_tenant_lets_another_tenants_identities_in(world) -> None:
    engine, _, who, what = world
    policy = engine.create("dial", "default", ["acme/ops"], ["modbus"])
    assert engine.decide("dial", who["acme-ops"], what["modbus"]).reason == f"allowed by policy {policy.id}"
    assert not engine.decide("dial", who["ops"], what["modbus"]).allowed
    assert policy.to_json()["identities"] == ["acme/ops"]
    by_role = engine.create("dial", "acme", ["role:default/operator"], ["modbus"])
    assert engine.decide("dial", who["ops"], what["acme-modbus"]).reason == f"allowed by policy {by_role.id}"


@pytest.mark.parametrize("services", [["acme/modbus"], ["role:acme/plc"], ["modbus", "acme/modbus"]])
def test_a_policy_cannot_open_another_tenants_services_and_says_where_to_create_it(world, services) -> None:
    engine, _, who, what = world
    with pytest.raises(ControllerError) as refused:
        engine.create("dial", "default", ["ops"], services)
    error = refused.value
    assert error.status == 400 and error.code == "cross_tenant_service"
    assert "only a policy of tenant acme opens its services" in error.message
    assert "outpostctl policy create --tenant acme --kind dial --identities default/ops" in error.message
    assert "\n" not in error.message
    assert engine.list() == []
    assert not engine.decide("dial", who["ops"], what["acme-modbus"]).allowed


def test_a_stored_policy_naming_another_tenants_service_opens_nothing_and_the_decision_says_why(world, tmp_path) -> None:
    engine, _, who, what = world
    # A policy stored before the rule existed, straight into the table.
    store = Store(tmp_path / "store.sqlite3")
    try:
        with store.transaction() as db:
            db.execute(
                "INSERT INTO policies (kind, tenant, identities, services, created_at) VALUES (?, ?, ?, ?, ?)",
                ("dial", "default", '["ops"]', '["acme/modbus"]', 0.0),
            )
    finally:
        store.close()
    [legacy] = engine.list()
    denied = engine.decide("dial", who["ops"], what["acme-modbus"])
    assert not denied.allowed and denied.policy_id is None
    assert denied.reason == (
        f"no policy allows identity default/ops to dial service acme/modbus: policy {legacy.id} (tenant default) "
        "names it, but only a policy of tenant acme opens acme's services"
    )


def test_a_bind_across_tenants_needs_the_services_tenant_too(world) -> None:
    engine, _, who, what = world
    engine.create("bind", "default", ["role:edge"], ["role:plc"])
    assert engine.decide("bind", who["gw"], what["modbus"]).allowed
    assert not engine.decide("bind", who["gw"], what["acme-modbus"]).allowed
    engine.create("bind", "acme", ["default/gw"], ["modbus"])
    assert engine.decide("bind", who["gw"], what["acme-modbus"]).allowed


def test_a_revoked_identity_is_denied_whatever_the_policies_say(world) -> None:
    engine, registry, who, what = world
    engine.create("dial", "default", ["ops"], ["modbus"])
    revoked = registry.revoke("default", "ops")
    decision = engine.decide("dial", revoked, what["modbus"])
    assert not decision.allowed and decision.reason == "identity default/ops is revoked"


@pytest.mark.parametrize(
    "identities, services",
    [([], ["modbus"]), (["ops"], []), (["Bad"], ["modbus"]), (["a/b/c"], ["modbus"]), (["role:"], ["x"]), ("ops", ["x"])],
)
def test_malformed_policies_are_refused_and_stored_nowhere(world, identities, services) -> None:
    engine, *_ = world
    with pytest.raises(ControllerError) as refused:
        engine.create("dial", "default", identities, services)
    assert refused.value.status == 400 and refused.value.message.endswith(".")
    assert engine.list() == []


def test_policies_survive_a_reload_and_decide_the_same(world, tmp_path: Path) -> None:
    engine, *_ = world
    engine.create("dial", "default", ["role:operator", "acme/ops"], ["role:plc"])
    reopened = Store(tmp_path / "store.sqlite3")
    try:
        again = PolicyEngine(reopened, AuditLog(reopened))
        assert [p.to_json() for p in again.list()] == [p.to_json() for p in engine.list()]
    finally:
        reopened.close()


def test_decisions_use_only_the_identity_and_service_objects_given(world) -> None:
    engine, *_ = world
    engine.create("dial", "default", ["role:operator"], ["modbus"])
    stranger = Identity(name="x", tenant="default", roles=("operator",), uri="", status="enrolled", created_at=0)
    assert engine.decide("dial", stranger, Service(name="modbus", tenant="default")).allowed


def test_a_session_certificate_may_dial_but_never_bind_whatever_the_policies_say(world) -> None:
    engine, _, who, what = world
    engine.create("bind", "default", ["role:operator"], ["modbus"])
    engine.create("dial", "default", ["role:operator"], ["modbus"])
    assert engine.decide("bind", who["ops"], what["modbus"]).allowed
    refused = engine.decide("bind", who["ops"], what["modbus"], session_certificate=True)
    assert not refused.allowed and refused.policy_id is None
    assert refused.reason == (
        "identity default/ops holds a session certificate, which may dial but never bind; "
        "bind from an agent enrolled with a token"
    )
    assert engine.decide("dial", who["ops"], what["modbus"], session_certificate=True).allowed
