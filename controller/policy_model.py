"""What a policy is and what a decision says: the rows ``PolicyEngine`` (controller/policy.py) reads and answers."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from controller.policy_selectors import Selector, parse_selector
from controller.registry import Identity, Service
from controller.store import Row


@dataclass(frozen=True)
class Policy:
    id: int
    kind: str
    tenant: str
    identities: tuple[Selector, ...]
    services: tuple[Selector, ...]
    created_at: float
    #: Counts the edits: each ``update`` makes a new version of the same id.
    version: int = 1
    updated_at: float | None = None
    #: After this moment (seconds since the epoch) the policy allows nothing, and what it allowed is closed.
    expires_at: float | None = None
    decisions: int = 0
    last_allowed_at: float | None = None
    #: The correlation id of the just-in-time grant this policy was created for (controller/grants.py).
    correlation: str | None = None

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and self.expires_at <= now

    def allows(self, identity: Identity, service: Service, gateway: Identity | None = None,
               port: int | None = None) -> bool:
        """True when both sides match and the policy lives in the service's tenant.

        ``gateway``: the gateway the dial is aimed at or served by; a selector
        naming one (``modbus@gw-0042``) matches only a dial of that gateway.
        """
        return service.tenant == self.tenant and self.names(identity, service, gateway, port)

    def names(self, identity: Identity, service: Service, gateway: Identity | None = None,
              port: int | None = None) -> bool:
        """Both sides match, whatever tenant the policy lives in."""
        return any(s.matches(identity.tenant, identity.name, identity.roles) for s in self.identities) and any(
            s.matches_service(service, gateway, port) for s in self.services
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "tenant": self.tenant,
            "identities": [s.text(self.tenant) for s in self.identities],
            "services": [s.text(self.tenant) for s in self.services],
            "created_at": self.created_at,
            "version": self.version,
            "updated_at": self.updated_at,
            "expires_at": self.expires_at,
            "expired": self.expired(time.time()),
            "decisions": self.decisions,
            "last_allowed_at": self.last_allowed_at,
            "grant": self.correlation,
        }

    def definition(self) -> dict[str, Any]:
        """What the policy says (no counters): the audit records it for each version."""
        return {key: value for key, value in self.to_json().items()
                if key not in ("decisions", "last_allowed_at", "expired")}


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


def policy_from_row(row: Row) -> Policy:
    tenant = row["tenant"]
    return Policy(
        id=int(row["id"]),
        kind=row["kind"],
        tenant=tenant,
        identities=tuple(parse_selector(t, tenant) for t in json.loads(row["identities"])),
        services=tuple(parse_selector(t, tenant, aimed=True) for t in json.loads(row["services"])),
        created_at=row["created_at"],
        version=int(row["version"] or 1),
        updated_at=row["updated_at"],
        expires_at=row["expires_at"],
        decisions=int(row["decisions"] or 0),
        last_allowed_at=row["last_allowed_at"],
        correlation=row["correlation"],
    )
