"""Just-in-time grants: a person asks to dial a service for a while; another person, an approver, says yes or no.

An approved grant is a dial policy of the service's tenant that names the
requester alone and expires with the grant (``PolicyEngine.create_in``, in
the approval's transaction), so everything a policy's end does applies: at
expiry its live dials close within 2 s on every process. The request, the
answer, each dial the policy allowed (``grant_used``) and the expiry share
the grant's one correlation id in the audit. A request nobody answered
expires on its own after ``PENDING_GRANT_SECONDS``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from controller.audit import AuditLog
from controller.correlation import GRANT, new_id
from controller.errors import ControllerError, bad_request, not_found
from controller.names import check_name
from controller.policy import PolicyEngine
from controller.policy_selectors import GATEWAY_MARK
from controller.policy_terms import format_time, parse_duration
from controller.registry import Registry
from controller.store import Row, Store, Transaction

#: How long a request waits for an approver before it expires: access asked
#: for now is needed now; a request approved a day later grants access nobody
#: is watching. An hour covers a change board's response time.
PENDING_GRANT_SECONDS = 3600.0
#: The longest a grant may run: a working shift. Longer access is a policy an admin writes, not a grant.
MAX_GRANT_SECONDS = 24 * 3600.0
#: A reason is a sentence or two for the approver and the audit, not a document.
MAX_REASON_CHARS = 500
#: Pending requests one person may have at once: more than anyone needs
#: answered at a time, few enough that nobody floods the approvers or the store.
MAX_PENDING_PER_PERSON = 10


@dataclass(frozen=True)
class GrantRecord:
    id: int
    tenant: str
    requester: str
    service: str
    duration: float
    reason: str
    status: str
    correlation: str
    requested_at: float
    pending_until: float
    decided_by: str | None = None
    decided_at: float | None = None
    policy_id: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "tenant": self.tenant, "requester": self.requester, "service": self.service,
                "for_s": self.duration, "reason": self.reason, "status": self.status,
                "correlation": self.correlation, "requested_at": self.requested_at,
                "pending_until": self.pending_until, "decided_by": self.decided_by, "decided_at": self.decided_at,
                "policy": self.policy_id}


def _grant(row: Row) -> GrantRecord:
    return GrantRecord(int(row["id"]), row["tenant"], row["requester"], row["service"], float(row["duration"]),
                       row["reason"], row["status"], row["correlation"], row["requested_at"], row["pending_until"],
                       row["decided_by"], row["decided_at"], row["policy_id"])


class Grants:
    def __init__(self, store: Store, audit: AuditLog, registry: Registry, policy: PolicyEngine) -> None:
        self._store = store
        self._audit = audit
        self._registry = registry
        self._policy = policy

    def request(self, requester: str, service: object, lifetime: object, reason: object) -> GrantRecord:
        """A pending grant for ``requester`` (``tenant/name``) to dial ``[TENANT/]SERVICE[@GATEWAY]``."""
        requester_tenant = requester.split("/", 1)[0]
        tenant, target = self._service(service, requester_tenant)
        seconds = parse_duration(lifetime)
        if seconds > MAX_GRANT_SECONDS:
            raise bad_request("invalid_duration", f"A grant runs at most {int(MAX_GRANT_SECONDS // 3600)} h; ask for "
                              "less, or ask an admin for a policy.")
        if not isinstance(reason, str) or not reason.strip() or len(reason) > MAX_REASON_CHARS:
            raise bad_request("invalid_reason", f"Say why you need it in --reason (1 to {MAX_REASON_CHARS} "
                              "characters); the approver and the audit read it.")
        now = time.time()
        correlation = new_id(GRANT)
        with self._store.transaction() as db:
            waiting = db.query_one("SELECT COUNT(*) AS n FROM grants WHERE requester = ? AND status = 'pending' "
                                   "AND pending_until > ?", (requester, now))
            if waiting is not None and int(waiting["n"]) >= MAX_PENDING_PER_PERSON:
                raise ControllerError("too_many_grants", f"You have {MAX_PENDING_PER_PERSON} grants waiting for an "
                                      "answer; wait for them, or ask an approver, before requesting more.", 429)
            row = db.query_one(
                "INSERT INTO grants (tenant, requester, service, duration, reason, status, correlation, requested_at, "
                "pending_until) VALUES (?, ?, ?, ?, ?, 'pending', ?, ?, ?) RETURNING id",
                (tenant, requester, target, seconds, reason.strip(), correlation, now, now + PENDING_GRANT_SECONDS))
            if row is None:
                raise RuntimeError("the store wrote no grant row")
            grant = self._get_in(db, int(row["id"]))
            self._audit.record_in(db, "grant_requested", correlation=correlation, id=grant.id, requester=requester,
                                  service=f"{tenant}/{target}", for_s=seconds, reason=grant.reason,
                                  pending_until=grant.pending_until)
        return grant

    def _service(self, service: object, default_tenant: str) -> tuple[str, str]:
        """(the service's tenant, ``NAME[@GATEWAY]``) of a request, both checked to exist."""
        if not isinstance(service, str):
            raise bad_request("invalid_service", "Name the service: SERVICE, TENANT/SERVICE or SERVICE@GATEWAY.")
        body, mark, gateway = service.partition(GATEWAY_MARK)
        tenant, _, name = body.rpartition("/")
        tenant = check_name(tenant, "tenant") if tenant else default_tenant
        check_name(name, "service name")
        if self._registry.get_service(tenant, name) is None:
            raise not_found("service_unknown", f"There is no service {tenant}/{name}; outpostctl service list "
                            "shows them.")
        if mark:
            check_name(gateway, "gateway name")
            if self._registry.get_identity(tenant, gateway) is None:
                raise not_found("identity_unknown", f"There is no gateway {tenant}/{gateway}; check the name after @.")
            return tenant, f"{name}@{gateway}"
        return tenant, name

    def get(self, grant_id: int) -> GrantRecord | None:
        row = self._store.query_one("SELECT * FROM grants WHERE id = ?", (grant_id,))
        return None if row is None else _grant(row)

    def _get_in(self, db: Transaction, grant_id: int) -> GrantRecord:
        row = db.query_one("SELECT * FROM grants WHERE id = ?", (grant_id,))
        if row is None:
            raise not_found("grant_unknown", f"There is no grant {grant_id}; outpostctl grant list shows them.")
        return _grant(row)

    def list_grants(self, tenants: set[str] | None, requester: str | None = None) -> list[GrantRecord]:
        """Grants of ``tenants`` (None: all), or only ``requester``'s; pending ones past their time read expired."""
        self.expire_pending()
        rows = self._store.query("SELECT * FROM grants ORDER BY id")
        grants = [_grant(r) for r in rows]
        return [g for g in grants if (tenants is None or g.tenant in tenants)
                and (requester is None or g.requester == requester)]

    def decide(self, grant_id: int, approver: str, approve: bool) -> GrantRecord:
        """Approve (a policy is created) or deny a pending grant; never by its requester, never once expired."""
        now = time.time()
        action = "approve" if approve else "deny"
        with self._store.transaction() as db:
            grant = self._get_in(db, grant_id)
            if grant.requester == approver:
                raise ControllerError("own_grant", f"You requested grant {grant_id}; another approver must "
                                      f"{action} it.", 403)
            if grant.status == "pending" and grant.pending_until <= now:
                raise ControllerError("grant_expired", f"Grant {grant_id} expired at "
                                      f"{format_time(grant.pending_until)} before anyone answered it; request it "
                                      "again.", 409)
            if grant.status != "pending":
                raise ControllerError("grant_decided", f"Grant {grant_id} is {grant.status} already; a grant is "
                                      "answered once.", 409)
            policy_id = None
            if approve:
                name = grant.requester if not grant.requester.startswith(grant.tenant + "/") else (
                    grant.requester.split("/", 1)[1])
                policy = self._policy.create_in(db, "dial", grant.tenant, [name], [grant.service],
                                                lifetime=f"{int(grant.duration)}s", correlation=grant.correlation)
                policy_id = policy.id
            status = "approved" if approve else "denied"
            db.execute("UPDATE grants SET status = ?, decided_by = ?, decided_at = ?, policy_id = ? WHERE id = ?",
                       (status, approver, now, policy_id, grant_id))
            decided = self._get_in(db, grant_id)
            self._audit.record_in(db, f"grant_{status}", correlation=grant.correlation, id=grant_id,
                                  requester=grant.requester, service=f"{grant.tenant}/{grant.service}",
                                  approver=approver, policy=policy_id,
                                  **({} if not approve else {"until": now + grant.duration}))
        return decided

    def refused(self, error: ControllerError, grant_id: object, action: str) -> None:
        """One ``grant_refused`` row under the grant's correlation id when there is such a grant."""
        grant = self.get(grant_id) if isinstance(grant_id, int) else None
        self._audit.record("grant_refused", action=action, id=grant_id, code=error.code, reason=error.message,
                           **({} if grant is None else {"correlation": grant.correlation}))

    def expire_pending(self, now: float | None = None) -> list[int]:
        """Expire the pending requests past their time, each with its ``grant_expired`` row."""
        now = time.time() if now is None else now
        if not self._store.query("SELECT 1 FROM grants WHERE status = 'pending' AND pending_until <= ? LIMIT 1",
                                 (now,)):
            return []
        expired: list[int] = []
        with self._store.transaction() as db:
            for row in db.query("SELECT * FROM grants WHERE status = 'pending' AND pending_until <= ?", (now,)):
                grant = _grant(row)
                db.execute("UPDATE grants SET status = 'expired' WHERE id = ?", (grant.id,))
                self._audit.record_in(db, "grant_expired", correlation=grant.correlation, id=grant.id,
                                      requester=grant.requester, service=f"{grant.tenant}/{grant.service}",
                                      reason=f"nobody answered grant {grant.id} by {format_time(grant.pending_until)}")
                expired.append(grant.id)
        return expired
