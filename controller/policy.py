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

import json
import time
from dataclasses import dataclass
from typing import Any

from controller.audit import AuditLog
from controller.errors import bad_request
from controller.names import check_name
from controller.registry import BLOCKED_STATUSES, Identity, Service
from controller.store import Store

KINDS = ("dial", "bind")
ROLE_PREFIX = "role:"
#: Selectors per side of one policy: enough for any real grouping (use roles
#: for more), small enough that deciding stays a quick scan.
MAX_SELECTORS = 100
#: Foreign policies a refusal names: enough to find the mistake, short enough for one audit line.
MAX_NAMED_FOREIGN = 3


@dataclass(frozen=True)
class Selector:
    """One parsed selector: a name or a role, in a tenant."""

    tenant: str
    value: str
    is_role: bool

    def matches(self, tenant: str, name: str, roles: tuple[str, ...]) -> bool:
        if tenant != self.tenant:
            return False
        return self.value in roles if self.is_role else self.value == name

    def text(self, policy_tenant: str) -> str:
        """The selector as written, with the tenant prefix only where it differs."""
        body = self.value if self.tenant == policy_tenant else f"{self.tenant}/{self.value}"
        return ROLE_PREFIX + body if self.is_role else body


def parse_selector(text: object, policy_tenant: str) -> Selector:
    """Parse one selector; 400 ``invalid_selector`` with the rule when it is malformed."""
    if not isinstance(text, str):
        raise bad_request("invalid_selector", "Each selector must be a string such as \"ops\" or \"role:plc\".")
    is_role = text.startswith(ROLE_PREFIX)
    body = text[len(ROLE_PREFIX):] if is_role else text
    tenant, _, value = body.rpartition("/")
    if "/" in tenant:
        raise bad_request(
            "invalid_selector", f"The selector {text!r} is not valid; write NAME, TENANT/NAME, role:ROLE or role:TENANT/ROLE."
        )
    tenant = check_name(tenant, "tenant") if tenant else policy_tenant
    check_name(value, "role" if is_role else "name")
    return Selector(tenant=tenant, value=value, is_role=is_role)


@dataclass(frozen=True)
class Policy:
    id: int
    kind: str
    tenant: str
    identities: tuple[Selector, ...]
    services: tuple[Selector, ...]
    created_at: float

    def allows(self, identity: Identity, service: Service) -> bool:
        """True when both sides match and the policy lives in the service's tenant."""
        return service.tenant == self.tenant and self.names(identity, service)

    def names(self, identity: Identity, service: Service) -> bool:
        """Both sides match, whatever tenant the policy lives in."""
        return any(s.matches(identity.tenant, identity.name, identity.roles) for s in self.identities) and any(
            s.matches(service.tenant, service.name, service.roles) for s in self.services
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "tenant": self.tenant,
            "identities": [s.text(self.tenant) for s in self.identities],
            "services": [s.text(self.tenant) for s in self.services],
            "created_at": self.created_at,
        }


@dataclass(frozen=True)
class Decision:
    allowed: bool
    #: One plain sentence: which policy allowed it, or why nothing did.
    reason: str
    policy_id: int | None = None


@dataclass(frozen=True)
class Explanation:
    """Why a decision is what it is: the decision itself, and every policy that took part in it."""

    decision: Decision
    #: every policy that allows it, in the order they are tried (the first decides)
    allowing: tuple[int, ...] = ()
    #: policies that name both sides but live in another tenant than the service, so open nothing
    foreign: tuple[int, ...] = ()
    #: what refuses before any policy is read (a blocked identity, a session certificate binding)
    blocked: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"allowed": self.decision.allowed, "reason": self.decision.reason,
                "policy": self.decision.policy_id, "allowing": list(self.allowing), "foreign": list(self.foreign),
                "blocked": self.blocked}


class PolicyEngine:
    """Stores policies and decides; ``decide`` records nothing (the caller audits the outcome)."""

    def __init__(self, store: Store, audit: AuditLog) -> None:
        self._store = store
        self._audit = audit

    def create(self, kind: object, tenant: str, identities: object, services: object) -> Policy:
        if kind not in KINDS:
            raise bad_request("invalid_policy", "A policy's kind must be \"dial\" or \"bind\".")
        check_name(tenant, "tenant")
        identity_selectors = self._selectors(identities, tenant, "identities")
        service_selectors = self._selectors(services, tenant, "services")
        _refuse_foreign_services(kind, tenant, identity_selectors, service_selectors)
        now = time.time()
        with self._store.transaction() as db:
            row = db.query_one(
                "INSERT INTO policies (kind, tenant, identities, services, created_at) VALUES (?, ?, ?, ?, ?) "
                "RETURNING id",
                (
                    kind,
                    tenant,
                    json.dumps([s.text(tenant) for s in identity_selectors]),
                    json.dumps([s.text(tenant) for s in service_selectors]),
                    now,
                ),
            )
            if row is None:  # RETURNING gives the row it wrote; None would mean no row was written
                raise RuntimeError("the store wrote no policy row")
            policy_id = int(row["id"])
            policy = Policy(policy_id, str(kind), tenant, identity_selectors, service_selectors, now)
            self._audit.record_in(db, "policy_created", **policy.to_json())
        return policy

    @staticmethod
    def _selectors(value: object, tenant: str, side: str) -> tuple[Selector, ...]:
        if not isinstance(value, list) or not value:
            raise bad_request("invalid_policy", f"A policy needs a non-empty list of {side} selectors.")
        if len(value) > MAX_SELECTORS:
            raise bad_request(
                "invalid_policy", f"A policy takes at most {MAX_SELECTORS} {side} selectors; use roles to group more."
            )
        return tuple(parse_selector(item, tenant) for item in value)

    def list(self) -> list[Policy]:
        rows = self._store.query("SELECT * FROM policies ORDER BY id")
        return [
            Policy(
                id=row["id"],
                kind=row["kind"],
                tenant=row["tenant"],
                identities=tuple(parse_selector(t, row["tenant"]) for t in json.loads(row["identities"])),
                services=tuple(parse_selector(t, row["tenant"]) for t in json.loads(row["services"])),
                created_at=row["created_at"],
            )
            for row in rows
        ]

    def decide(self, kind: str, identity: Identity, service: Service, *, session_certificate: bool = False) -> Decision:
        """May ``identity`` ``kind`` ("dial"/"bind") ``service``? Deny unless a policy says so.

        ``session_certificate``: the tunnel authenticated with a session
        certificate (``outpostctl connect``), which may dial but never bind,
        whatever the policies say. The decision is ``explain``'s, so what
        ``outpostctl policy explain`` says is what the relay does.
        """
        return self.explain(kind, identity, service, session_certificate=session_certificate).decision

    def explain(self, kind: str, identity: Identity, service: Service, *,
                session_certificate: bool = False) -> Explanation:
        """The decision, with every policy that allows it and every one that names it in vain."""
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
        for policy in self.list():
            if policy.kind != kind:
                continue
            if policy.allows(identity, service):
                allowing.append(policy)
            elif policy.tenant != service.tenant and policy.names(identity, service):
                foreign.append(policy)
        if allowing:
            first = allowing[0].id
            return Explanation(Decision(True, f"allowed by policy {first}", first),
                               tuple(p.id for p in allowing), tuple(p.id for p in foreign))
        reason = f"no policy allows identity {identity.label} to {kind} service {service.label}"
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
