"""The identity and service registry.

Identities and services belong to a tenant and are keyed by (tenant, name).
Every read goes to the store, so several controller processes sharing it see
the same registry.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from controller.audit import AuditLog
from controller.errors import ControllerError, bad_request, conflict, not_found
from controller.names import check_name, identity_uri, parse_identity_uri
from controller.store import Row, Store, Transaction

log = logging.getLogger(__name__)

STATUS_CREATED = "created"
STATUS_ENROLLED = "enrolled"
STATUS_DISABLED = "disabled"
STATUS_REVOKED = "revoked"
#: Identities in these states get no certificate, no session and no tunnel.
BLOCKED_STATUSES = frozenset({STATUS_DISABLED, STATUS_REVOKED})
#: The ``status_changes`` kind of a change of key: the identity was enrolled
#: with another key, and every tunnel on any other key must close.
CHANGE_REKEYED = "rekeyed"


@dataclass(frozen=True)
class Identity:
    name: str
    tenant: str
    roles: tuple[str, ...]
    uri: str
    status: str
    created_at: float
    enrolled_at: float | None = None
    cert_not_after: float | None = None
    #: Hex SHA-256 of the enrolled device key's SubjectPublicKeyInfo.
    key_sha256: str | None = None

    @property
    def label(self) -> str:
        """``tenant/name``, as sentences and audit fields name an identity."""
        return f"{self.tenant}/{self.name}"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "tenant": self.tenant,
            "roles": list(self.roles),
            "uri": self.uri,
            "status": self.status,
            "created_at": self.created_at,
            "enrolled_at": self.enrolled_at,
            "cert_not_after": self.cert_not_after,
            # The one current device key (SHA-256 of its SubjectPublicKeyInfo), as audit events name keys.
            "key_sha256": self.key_sha256,
        }


@dataclass(frozen=True)
class Service:
    name: str
    tenant: str
    roles: tuple[str, ...] = field(default=())
    created_at: float = 0.0
    #: How a plain dial picks among several gateways binding it: "one" (refuse with the choices) or "any".
    choose: str = "one"
    #: The ports it declares, each dialed as ``SERVICE:PORT`` and mapped by the gateway's ``[[bind]]``.
    ports: tuple[int, ...] = ()

    @property
    def label(self) -> str:
        return f"{self.tenant}/{self.name}"

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "tenant": self.tenant, "roles": list(self.roles), "created_at": self.created_at,
                "choose": self.choose, "ports": list(self.ports)}


#: How a plain dial of a service bound by several gateways picks one: "one" refuses
#: with the list of choices (dial SERVICE@GATEWAY), "any" takes the latest bound.
SERVICE_CHOICES = ("one", "any")

#: Ports one service may declare: a device speaks a handful of protocols, not a range; a range is many services.
MAX_SERVICE_PORTS = 16


def check_ports(ports: object) -> tuple[int, ...]:
    """The declared ports, sorted; 400 ``invalid_ports`` unless a short list of distinct TCP ports."""
    if not isinstance(ports, (list, tuple)) or len(ports) > MAX_SERVICE_PORTS or not all(
            isinstance(p, int) and not isinstance(p, bool) and 1 <= p <= 65535 for p in ports) or len(
            set(ports)) != len(ports):
        raise bad_request("invalid_ports", f"A service declares at most {MAX_SERVICE_PORTS} distinct TCP ports "
                          "(1-65535), such as [502, 1502].")
    return tuple(sorted(ports))


RevocationListener = Callable[[Identity], None]
RekeyListener = Callable[[Identity], None]


class Registry:
    """Creates, finds and revokes identities; creates and finds services."""

    def __init__(self, store: Store, audit: AuditLog, trust_domain: str) -> None:
        self._store = store
        self._audit = audit
        self.trust_domain = trust_domain
        #: Called in-process with the revoked Identity (the relay closes its tunnels).
        self.revocation_listeners: list[RevocationListener] = []
        #: Called in-process with the identity as it is after a change of its key
        #: (the relay closes its tunnels on any other key).
        self.rekey_listeners: list[RekeyListener] = []

    def on_revoked(self, listener: RevocationListener) -> None:
        self.revocation_listeners.append(listener)

    def on_rekeyed(self, listener: RekeyListener) -> None:
        self.rekey_listeners.append(listener)

    # Identities

    def _identity(self, row: Row) -> Identity:
        return Identity(
            name=row["name"],
            tenant=row["tenant"],
            roles=tuple(json.loads(row["roles"])),
            uri=identity_uri(self.trust_domain, row["tenant"], row["name"]),
            status=row["status"],
            created_at=row["created_at"],
            enrolled_at=row["enrolled_at"],
            cert_not_after=row["cert_not_after"],
            key_sha256=row["key_sha256"],
        )

    def create_identity_in(self, db: Transaction, tenant: str, name: str, roles: tuple[str, ...]) -> Identity:
        """Insert a new identity inside ``db``; 409 ``identity_exists`` if the name is taken."""
        check_name(tenant, "tenant")
        check_name(name, "identity name")
        if db.query_one("SELECT 1 FROM identities WHERE tenant = ? AND name = ?", (tenant, name)):
            raise conflict(
                "identity_exists",
                f"An identity named {name!r} already exists in tenant {tenant!r}; choose another name.",
            )
        now = time.time()
        db.execute(
            "INSERT INTO identities (tenant, name, roles, status, created_at) VALUES (?, ?, ?, ?, ?)",
            (tenant, name, json.dumps(list(roles)), STATUS_CREATED, now),
        )
        self._audit.record_in(db, "identity_created", identity=f"{tenant}/{name}", roles=list(roles))
        row = db.query_one("SELECT * FROM identities WHERE tenant = ? AND name = ?", (tenant, name))
        assert row is not None
        return self._identity(row)

    def get_identity_in(self, db: Transaction, tenant: str, name: str) -> Identity | None:
        row = db.query_one("SELECT * FROM identities WHERE tenant = ? AND name = ?", (tenant, name))
        return self._identity(row) if row else None

    def get_identity(self, tenant: str, name: str) -> Identity | None:
        row = self._store.query_one("SELECT * FROM identities WHERE tenant = ? AND name = ?", (tenant, name))
        return self._identity(row) if row else None

    def require_identity(self, tenant: str, name: str) -> Identity:
        identity = self.get_identity(tenant, name)
        if identity is None:
            raise not_found("identity_unknown", f"There is no identity {tenant}/{name}; check the name and tenant.")
        return identity

    def identity_by_uri(self, uri: str) -> Identity | None:
        """The identity a certificate's SAN URI names, if it is of this trust domain and exists."""
        parsed = parse_identity_uri(self.trust_domain, uri)
        return self.get_identity(*parsed) if parsed else None

    def list_identities(self, tenant: str | None = None) -> list[Identity]:
        if tenant is None:
            rows = self._store.query("SELECT * FROM identities ORDER BY tenant, name")
        else:
            rows = self._store.query("SELECT * FROM identities WHERE tenant = ? ORDER BY name", (tenant,))
        return [self._identity(row) for row in rows]

    def enroll_key_in(self, db: Transaction, identity: Identity, key_sha256: str, not_after: float) -> bool:
        """Make ``key_sha256`` the identity's one current key; True when that changed its key.

        A change is logged in ``status_changes`` as ``rekeyed`` in the same
        transaction, so every controller process closes the tunnels of the
        key it replaced (controller/watcher.py); the caller announces it in
        this process after the commit (``announce_rekeyed``).
        """
        now = time.time()
        db.execute(
            "UPDATE identities SET status = ?, enrolled_at = ?, cert_not_after = ?, key_sha256 = ? "
            "WHERE tenant = ? AND name = ?",
            (STATUS_ENROLLED, now, not_after, key_sha256, identity.tenant, identity.name),
        )
        if identity.key_sha256 == key_sha256:
            return False
        db.execute(
            "INSERT INTO status_changes (tenant, name, status, time) VALUES (?, ?, ?, ?)",
            (identity.tenant, identity.name, CHANGE_REKEYED, now),
        )
        return True

    def revoke(self, tenant: str, name: str) -> Identity:
        """Mark the identity revoked (idempotent, final), audit it and tell every listener."""
        return self._change_status(tenant, name, STATUS_REVOKED)

    def disable(self, tenant: str, name: str) -> Identity:
        """Block the identity until it is enabled again (idempotent); a revoked one stays revoked."""
        return self._change_status(tenant, name, STATUS_DISABLED)

    def enable(self, tenant: str, name: str) -> Identity:
        """Undo ``disable``: back to enrolled (or created, if it never enrolled); only from disabled."""
        return self._change_status(tenant, name, None)

    def _change_status(self, tenant: str, name: str, target: str | None) -> Identity:
        """One status change in one transaction: row, change log, audit; then the listeners.

        ``target`` None means "enable". The change log row is what the other
        controller processes poll (controller/watcher.py).
        """
        with self._store.transaction() as db:
            identity = self.get_identity_in(db, tenant, name)
            if identity is None:
                raise not_found("identity_unknown", f"There is no identity {tenant}/{name}; check the name and tenant.")
            new_status = _next_status(identity, target)
            if new_status != identity.status:
                db.execute(
                    "UPDATE identities SET status = ? WHERE tenant = ? AND name = ?", (new_status, tenant, name)
                )
                db.execute(
                    "INSERT INTO status_changes (tenant, name, status, time) VALUES (?, ?, ?, ?)",
                    (tenant, name, new_status, time.time()),
                )
                self._audit.record_in(db, _STATUS_EVENTS[new_status], identity=identity.label, previous=identity.status)
            changed = self.get_identity_in(db, tenant, name)
        assert changed is not None
        if changed.status in BLOCKED_STATUSES:
            self.announce_blocked(changed)
        return changed

    def announce_blocked(self, identity: Identity) -> None:
        """Tell every listener (the relay) that ``identity`` may no longer hold a tunnel.

        Called at once for a change made in this process, and by the store
        watcher for one made in another; listeners must be idempotent.
        """
        for listener in list(self.revocation_listeners):
            try:
                listener(identity)
            except Exception:  # a broken listener must not undo or hide the revocation
                log.exception("revocation listener failed for %s", identity.label)

    def announce_rekeyed(self, identity: Identity) -> None:
        """Tell every listener (the relay) that ``identity``'s current key is ``identity.key_sha256``.

        Called at once for a re-enrollment in this process, and by the store
        watcher for one in another; listeners must be idempotent.
        """
        for listener in list(self.rekey_listeners):
            try:
                listener(identity)
            except Exception:  # a broken listener must not undo or hide the re-enrollment
                log.exception("rekey listener failed for %s", identity.label)

    def identities_with_key(self, db: Transaction, key_sha256: str) -> list[Identity]:
        """Identities whose enrolled key is ``key_sha256``, most recently enrolled first."""
        rows = db.query(
            "SELECT * FROM identities WHERE key_sha256 = ? ORDER BY enrolled_at DESC", (key_sha256,)
        )
        return [self._identity(row) for row in rows]

    def former_holder_in(self, db: Transaction, key_sha256: str) -> Identity | None:
        """The identity a certificate was last issued to for ``key_sha256``, if that is no longer its key.

        What the old device of a re-enrolled gateway proves: a key this
        identity held once. Session certificates never held an identity's key.
        """
        row = db.query_one(
            "SELECT tenant, name FROM certificates WHERE key_sha256 = ? AND purpose != 'session' "
            "ORDER BY issued_at DESC LIMIT 1",
            (key_sha256,),
        )
        if row is None:
            return None
        identity = self.get_identity_in(db, row["tenant"], row["name"])
        return identity if identity is not None and identity.key_sha256 != key_sha256 else None

    def record_certificate_in(self, db: Transaction, identity: Identity, not_after: float) -> None:
        """A renewed or recovered certificate: the identity's newest notAfter moves on."""
        db.execute(
            "UPDATE identities SET cert_not_after = ? WHERE tenant = ? AND name = ?",
            (not_after, identity.tenant, identity.name),
        )

    # Services

    def create_service(self, tenant: str, name: str, roles: tuple[str, ...], choose: str = "one",
                       ports: object = ()) -> Service:
        check_name(tenant, "tenant")
        check_name(name, "service name")
        if choose not in SERVICE_CHOICES:
            raise bad_request("invalid_choose", f"A service chooses among its gateways by {' or '.join(SERVICE_CHOICES)}"
                              f", not {str(choose)[:40]!r}.")
        declared = check_ports(ports)
        with self._store.transaction() as db:
            if db.query_one("SELECT 1 FROM services WHERE tenant = ? AND name = ?", (tenant, name)):
                raise conflict(
                    "service_exists",
                    f"A service named {name!r} already exists in tenant {tenant!r}; choose another name.",
                )
            now = time.time()
            db.execute(
                "INSERT INTO services (tenant, name, roles, created_at, choose, ports) VALUES (?, ?, ?, ?, ?, ?)",
                (tenant, name, json.dumps(list(roles)), now, None if choose == "one" else choose,
                 json.dumps(list(declared)) if declared else None),
            )
            self._audit.record_in(db, "service_created", service=f"{tenant}/{name}", roles=list(roles),
                                 **({} if choose == "one" else {"choose": choose}),
                                 **({"ports": list(declared)} if declared else {}))
        return Service(name=name, tenant=tenant, roles=roles, created_at=now)

    @staticmethod
    def _service(row: Row) -> Service:
        return Service(
            name=row["name"], tenant=row["tenant"], roles=tuple(json.loads(row["roles"])), created_at=row["created_at"],
            choose=row["choose"] or "one", ports=tuple(json.loads(row["ports"])) if row["ports"] else (),
        )

    def get_service(self, tenant: str, name: str) -> Service | None:
        row = self._store.query_one("SELECT * FROM services WHERE tenant = ? AND name = ?", (tenant, name))
        return self._service(row) if row else None

    def list_services(self, tenant: str | None = None) -> list[Service]:
        if tenant is None:
            rows = self._store.query("SELECT * FROM services ORDER BY tenant, name")
        else:
            rows = self._store.query("SELECT * FROM services WHERE tenant = ? ORDER BY name", (tenant,))
        return [self._service(row) for row in rows]


_STATUS_EVENTS = {
    STATUS_REVOKED: "identity_revoked",
    STATUS_DISABLED: "identity_disabled",
    STATUS_ENROLLED: "identity_enabled",
    STATUS_CREATED: "identity_enabled",
}


def _next_status(identity: Identity, target: str | None) -> str:
    """The status ``identity`` moves to, or 409 when the move is not allowed."""
    if target == STATUS_REVOKED:
        return STATUS_REVOKED
    if identity.status == STATUS_REVOKED:
        verb = "disable" if target == STATUS_DISABLED else "enable"
        raise conflict(
            "identity_revoked",
            f"The identity {identity.label} is revoked, which is final; cannot {verb} it. "
            "Create a new identity for this gateway.",
        )
    if target == STATUS_DISABLED:
        return STATUS_DISABLED
    if identity.status != STATUS_DISABLED:
        return identity.status  # enabling an identity that is not disabled changes nothing
    return STATUS_ENROLLED if identity.key_sha256 else STATUS_CREATED


def refuse_blocked(identity: Identity) -> None:
    """Raise 403 ``identity_disabled``/``identity_revoked`` for an identity that may get nothing."""
    if identity.status == STATUS_REVOKED:
        raise ControllerError(
            "identity_revoked",
            f"The identity {identity.label} was revoked; central ops must create a new identity.",
            403,
        )
    if identity.status == STATUS_DISABLED:
        raise ControllerError(
            "identity_disabled",
            f"The identity {identity.label} is disabled; ask central ops to enable it.",
            403,
        )
