"""Policies: which identities may dial or bind which services. Deny by default.

A selector is ``NAME`` or ``role:ROLE``, optionally with a tenant prefix
(``TENANT/NAME``, ``role:TENANT/ROLE``). An unprefixed selector means the
policy's own tenant.

Tenants are apart: a service is opened only by a policy that lives in the
service's own tenant. Its service selectors may name no other tenant (such a
policy is refused when created, and a stored one opens nothing); its identity
selectors may name other tenants, which is how a tenant lets another
tenant's identities in. No tenant can open another tenant's services, in
either direction.
"""

from __future__ import annotations

import builtins
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from controller.audit import AuditLog
from controller.errors import ControllerError, bad_request, not_found
from controller.names import check_name
from controller.policy_counters import PolicyCounters
from controller.policy_model import Decision, Explanation, Policy, policy_from_row
from controller.policy_selectors import Selector, parse_selector
from controller.policy_terms import expiry, format_time
from controller.registry import BLOCKED_STATUSES, Identity, Service
from controller.store import Store, Transaction
from controller.watcher import CHANGE_POLICY

log = logging.getLogger(__name__)

KINDS = ("dial", "bind")
#: Selectors per side of one policy: enough for any real grouping (use roles
#: for more), small enough that deciding stays a quick scan.
MAX_SELECTORS = 100
#: Foreign policies a refusal names: enough to find the mistake, short enough for one audit line.
MAX_NAMED_FOREIGN = 3
#: What ``policy update`` may change; tenant and id stay (a policy in another tenant is another policy).
UPDATABLE = frozenset({"kind", "identities", "services", "until", "for", "no_expiry", "expected_version"})

PolicyListener = Callable[[int], None]


class PolicyEngine:
    """Stores policies and decides; ``decide`` records nothing (the caller audits the outcome)."""

    def __init__(self, store: Store, audit: AuditLog) -> None:
        self._store = store
        self._audit = audit
        #: Decisions per policy, written in batches (controller/policy_counters.py).
        self.counters = PolicyCounters(store)
        #: Called with a policy id when it changed (updated, deleted, expired), in this process or another.
        self.change_listeners: list[PolicyListener] = []
        #: The expiry of each policy as the latest decision read it: the relay times its closing by it.
        self._expiries: dict[int, float | None] = {}
        #: The grant correlation id of each policy created for a grant, as the latest decision read it.
        self._grants: dict[int, str] = {}
        #: Each policy row's values -> the policy parsed from them (only the rows the latest read returned).
        self._parsed: dict[tuple[object, ...], Policy] = {}
        self._expiries_lock = threading.Lock()

    def create(self, kind: object, tenant: str, identities: object, services: object, *,
               until: object = None, lifetime: object = None) -> Policy:
        """A new policy; ``until`` (a time) or ``lifetime`` (a duration such as 8h) makes it expire."""
        with self._store.transaction() as db:
            return self.create_in(db, kind, tenant, identities, services, until=until, lifetime=lifetime)

    def create_in(self, db: Transaction, kind: object, tenant: str, identities: object, services: object, *,
                  until: object = None, lifetime: object = None, correlation: str | None = None) -> Policy:
        """``create`` inside a caller's transaction; ``correlation``: the grant it is for (controller/grants.py)."""
        if kind not in KINDS:
            raise bad_request("invalid_policy", "A policy's kind must be \"dial\" or \"bind\".")
        check_name(tenant, "tenant")
        identity_selectors = self._selectors(identities, tenant, "identities")
        service_selectors = self._selectors(services, tenant, "services", aimed=True)
        _refuse_foreign_services(kind, tenant, identity_selectors, service_selectors)
        now = time.time()
        expires_at = expiry(until, lifetime, now)
        row = db.query_one(
            "INSERT INTO policies (kind, tenant, identities, services, created_at, version, expires_at, correlation) "
            "VALUES (?, ?, ?, ?, ?, 1, ?, ?) RETURNING id",
            (
                kind,
                tenant,
                json.dumps([s.text(tenant) for s in identity_selectors]),
                json.dumps([s.text(tenant) for s in service_selectors]),
                now,
                expires_at,
                correlation,
            ),
        )
        if row is None:  # RETURNING gives the row it wrote; None would mean no row was written
            raise RuntimeError("the store wrote no policy row")
        policy = Policy(int(row["id"]), str(kind), tenant, identity_selectors, service_selectors, now,
                        expires_at=expires_at, correlation=correlation)
        self._audit.record_in(db, "policy_created", **policy.definition(),
                              **({} if correlation is None else {"correlation": correlation}))
        return policy

    def get(self, policy_id: int) -> Policy | None:
        row = self._store.query_one("SELECT * FROM policies WHERE id = ?", (policy_id,))
        return None if row is None else policy_from_row(row)

    def get_in(self, db: Transaction, policy_id: int) -> Policy:
        """The policy ``policy_id`` inside a transaction; 404 ``policy_unknown`` when there is none."""
        row = db.query_one("SELECT * FROM policies WHERE id = ?", (policy_id,))
        if row is None:
            raise not_found("policy_unknown", f"There is no policy {policy_id}; outpostctl policy list shows them.")
        return policy_from_row(row)

    def update(self, policy_id: int, changes: dict[str, Any]) -> tuple[Policy, Policy]:
        """A new version of ``policy_id`` with ``changes``: (previous, new), both in the audit.

        One row is rewritten in one transaction, so a decision reads one
        version or the other, never a mix. ``expected_version`` refuses the
        update (409) when another one came first.
        """
        unknown = sorted(set(changes) - UPDATABLE)
        if unknown:
            raise bad_request("invalid_policy", f"A policy update cannot change {unknown[0]!r}; it takes "
                              f"{', '.join(sorted(UPDATABLE))}.")
        if not set(changes) - {"expected_version"}:
            raise bad_request("invalid_policy", "Say what to change: identities, services, kind, until, for or "
                              "no_expiry.")
        now = time.time()
        with self._store.transaction() as db:
            old = self.get_in(db, policy_id)
            expected = changes.get("expected_version")
            if expected is not None and (isinstance(expected, bool) or not isinstance(expected, int)):
                raise bad_request("invalid_policy", "expected_version is the version number policy list shows.")
            if expected is not None and expected != old.version:
                raise ControllerError(
                    "policy_changed", f"Policy {policy_id} is at version {old.version} now, not {expected}: someone "
                    "updated it meanwhile; read it again (outpostctl policy list) and repeat the update.", 409)
            new = self._changed(old, changes, now)
            db.execute(
                "UPDATE policies SET kind = ?, identities = ?, services = ?, expires_at = ?, version = ?, "
                "updated_at = ?, expiry_recorded_at = NULL WHERE id = ?",
                (new.kind, json.dumps([s.text(new.tenant) for s in new.identities]),
                 json.dumps([s.text(new.tenant) for s in new.services]), new.expires_at, new.version, now,
                 policy_id),
            )
            self._record_change_in(db, new, now)
            self._audit.record_in(db, "policy_updated", id=policy_id, tenant=new.tenant, version=new.version,
                                  previous=old.definition(), policy=new.definition())
        self.announce_changed(policy_id)
        return old, new

    def _changed(self, old: Policy, changes: dict[str, Any], now: float) -> Policy:
        kind = changes.get("kind", old.kind)
        if kind not in KINDS:
            raise bad_request("invalid_policy", "A policy's kind must be \"dial\" or \"bind\".")
        identities = (self._selectors(changes["identities"], old.tenant, "identities") if "identities" in changes
                      else old.identities)
        services = (self._selectors(changes["services"], old.tenant, "services", aimed=True) if "services" in changes
                    else old.services)
        _refuse_foreign_services(kind, old.tenant, identities, services)
        expires_at = old.expires_at
        if changes.get("no_expiry") is True:
            if "until" in changes or "for" in changes:
                raise bad_request("invalid_expiry", "Give an end time, a duration or no expiry, not several.")
            expires_at = None
        elif "until" in changes or "for" in changes:
            expires_at = expiry(changes.get("until"), changes.get("for"), now)
        return replace(old, kind=str(kind), identities=identities, services=services, expires_at=expires_at,
                       version=old.version + 1, updated_at=now)

    def delete(self, policy_id: int) -> Policy:
        """Remove ``policy_id``; the live dials it allowed are decided again (and closed when nothing allows them)."""
        now = time.time()
        with self._store.transaction() as db:
            policy = self.get_in(db, policy_id)
            db.execute("DELETE FROM policies WHERE id = ?", (policy_id,))
            self._record_change_in(db, policy, now)
            self._audit.record_in(db, "policy_deleted", **policy.definition())
        self.announce_changed(policy_id)
        return policy

    @staticmethod
    def _record_change_in(db: Transaction, policy: Policy, now: float) -> None:
        """The row every controller process watches (controller/watcher.py): its relays re-decide."""
        db.execute("INSERT INTO status_changes (tenant, name, status, time) VALUES (?, ?, ?, ?)",
                   (policy.tenant, str(policy.id), CHANGE_POLICY, now))

    def on_changed(self, listener: PolicyListener) -> None:
        self.change_listeners.append(listener)

    def announce_changed(self, policy_id: int) -> None:
        """Tell every listener (the relay) that ``policy_id`` changed; listeners must be idempotent."""
        for listener in list(self.change_listeners):
            try:
                listener(policy_id)
            except Exception:  # a broken listener must not undo or hide the change
                log.exception("policy change listener failed for policy %d", policy_id)

    def expiry_of(self, policy_id: int) -> float | None:
        """The expiry of ``policy_id`` as the latest decision read it (no store read: safe on the event loop)."""
        with self._expiries_lock:
            return self._expiries.get(policy_id)

    def grant_of(self, policy_id: int) -> str | None:
        """The correlation id of the grant ``policy_id`` was created for, if any (no store read)."""
        with self._expiries_lock:
            return self._grants.get(policy_id)

    def why_ended(self, policy_id: int, now: float) -> str:
        """Why a policy allows no more what it allowed: deleted, expired or changed (reads the store)."""
        policy = self.get(policy_id)
        if policy is None:
            return f"policy {policy_id} was deleted"
        if policy.expired(now):
            return f"policy {policy_id} expired at {format_time(policy.expires_at or now)}"
        return f"policy {policy_id} was changed (version {policy.version})"

    def record_expiries(self, now: float | None = None) -> list[int]:
        """Audit ``policy_expired`` once for each policy past its expiry (any process may; one does)."""
        now = time.time() if now is None else now
        expired: list[int] = []
        with self._store.transaction() as db:
            rows = db.query("SELECT * FROM policies WHERE expires_at <= ? AND expiry_recorded_at IS NULL", (now,))
            for row in rows:
                policy = policy_from_row(row)
                db.execute("UPDATE policies SET expiry_recorded_at = ? WHERE id = ?", (now, policy.id))
                self._audit.record_in(db, "policy_expired", **policy.definition(),
                                      reason=f"policy {policy.id} expired at {format_time(policy.expires_at or now)}",
                                      **({} if policy.correlation is None else {"correlation": policy.correlation}))
                expired.append(policy.id)
        return expired

    @staticmethod
    def _selectors(value: object, tenant: str, side: str, *, aimed: bool = False) -> tuple[Selector, ...]:
        if not isinstance(value, list) or not value:
            raise bad_request("invalid_policy", f"A policy needs a non-empty list of {side} selectors.")
        if len(value) > MAX_SELECTORS:
            raise bad_request(
                "invalid_policy", f"A policy takes at most {MAX_SELECTORS} {side} selectors; use roles to group more."
            )
        return tuple(parse_selector(item, tenant, aimed=aimed) for item in value)

    def list(self) -> list[Policy]:
        """Every policy, expired ones included (they allow nothing), with its decisions counted so far."""
        rows = self._store.query("SELECT * FROM policies ORDER BY id")
        # Every dial reads every policy: a row seen before (same values) is not parsed again.
        keys = [tuple(row[k] for k in row.keys()) for row in rows]
        with self._expiries_lock:
            parsed = self._parsed
        policies = [parsed.get(key) or policy_from_row(row) for key, row in zip(keys, rows, strict=True)]
        with self._expiries_lock:
            self._parsed = dict(zip(keys, policies, strict=True))
            self._expiries = {p.id: p.expires_at for p in policies}
            self._grants = {p.id: p.correlation for p in policies if p.correlation is not None}
        return policies

    def list_with_counts(self) -> builtins.list[Policy]:
        """``list`` with this process's counts not written yet added (``policy list``)."""
        counted = []
        for policy in self.list():
            count, last = self.counters.pending(policy.id)
            lasts = [t for t in (policy.last_allowed_at, last) if t is not None]
            counted.append(replace(policy, decisions=policy.decisions + count,
                                   last_allowed_at=max(lasts) if lasts else None))
        return counted

    def decide(self, kind: str, identity: Identity, service: Service, *, gateway: Identity | None = None,
               port: int | None = None, session_certificate: bool = False) -> Decision:
        """May ``identity`` ``kind`` ("dial"/"bind") ``service``? Deny unless a policy says so.

        ``session_certificate``: the tunnel authenticated with a session
        certificate (``outpostctl connect``), which may dial but never bind,
        whatever the policies say. The decision is ``explain``'s, so what
        ``outpostctl policy explain`` says is what the relay does.
        """
        decision = self.explain(kind, identity, service, gateway=gateway, port=port,
                                session_certificate=session_certificate).decision
        if decision.policy_id is not None:
            self.counters.count(decision.policy_id, time.time() if decision.allowed else None)
        return decision

    def explain(self, kind: str, identity: Identity, service: Service, *, gateway: Identity | None = None,
                port: int | None = None, session_certificate: bool = False) -> Explanation:
        """The decision, with every policy that allows it and every one that names it in vain.

        ``gateway``: the gateway a dial is aimed at (or the one bound gateway that would serve it).
        """
        if kind not in KINDS:
            return Explanation(Decision(False, f"{kind!r} is not an action a policy can allow."))
        if identity.status in BLOCKED_STATUSES:
            why = f"identity {identity.label} is {identity.status}"
            return Explanation(Decision(False, why), blocked=why)
        if kind == "bind" and session_certificate:
            why = (f"identity {identity.label} holds a session certificate, which may dial but never bind; "
                   "bind from an agent enrolled with a token")
            return Explanation(Decision(False, why), blocked=why)
        foreign: list[Policy] = []
        allowing: list[Policy] = []
        now = time.time()
        for policy in self.list():
            if policy.kind != kind or policy.expired(now):
                continue
            if policy.allows(identity, service, gateway, port):
                allowing.append(policy)
            elif policy.tenant != service.tenant and policy.names(identity, service, gateway, port):
                foreign.append(policy)
        if allowing:
            first = allowing[0].id
            return Explanation(Decision(True, f"allowed by policy {first}", first),
                               tuple(p.id for p in allowing), tuple(p.id for p in foreign))
        aimed = ("" if port is None else f" port {port}") + ("" if gateway is None else f" on gateway {gateway.label}")
        reason = f"no policy allows identity {identity.label} to {kind} service {service.label}{aimed}"
        if foreign:
            named = ", ".join(f"{p.id} (tenant {p.tenant})" for p in foreign[:MAX_NAMED_FOREIGN])
            if len(foreign) > MAX_NAMED_FOREIGN:
                named += f" and {len(foreign) - MAX_NAMED_FOREIGN} more"
            reason = (f"{reason}: policy {named} names it, but only a policy of tenant {service.tenant} "
                      f"opens {service.tenant}'s services")
        return Explanation(Decision(False, reason), foreign=tuple(p.id for p in foreign))


def _refuse_foreign_services(kind: object, tenant: str, identities: tuple[Selector, ...],
                             services: tuple[Selector, ...]) -> None:
    """400 ``cross_tenant_service`` when a service selector names a tenant other than the policy's."""
    foreign = next((s for s in services if s.tenant != tenant), None)
    if foreign is None:
        return
    who = ",".join(s.text(foreign.tenant) for s in identities)
    raise bad_request(
        "cross_tenant_service",
        f"A policy of tenant {tenant} cannot open {foreign.text(tenant)}: only a policy of tenant {foreign.tenant} "
        f"opens its services; create it there: outpostctl policy create --tenant {foreign.tenant} --kind {kind} "
        f"--identities {who} --services {foreign.text(foreign.tenant)}",
    )
