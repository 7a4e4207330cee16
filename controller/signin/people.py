"""People and their sessions in the store: a person is an identity created on first sign-in.

A session is a random bearer the controller hands out once and keeps only as
its SHA-256; it ends at its expiry or at logout, and is never renewed: a
person signs in again. ID tokens and nonces are remembered until they
expire, so neither is accepted twice.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import secrets
import time
from typing import Any

from controller.audit import AuditLog
from controller.names import NAME_PATTERN
from controller.registry import BLOCKED_STATUSES, Registry
from controller.signin.config import Grant, Provider, parse_grant
from controller.signin.errors import SigninRefused
from controller.store import Store, Transaction

#: What a session bearer starts with, so a leaked one is recognisable (secret scanners, logs).
SESSION_PREFIX = "ops_"
#: 256 bits: not guessable, however many requests a flood makes.
SESSION_BYTES = 32
#: Remembered ID tokens and nonces are swept at most this many at a time: a
#: sign-in never pays for a large backlog at once.
SWEEP_BATCH = 100
#: An expired session is kept this long, so a person using it is told it expired rather than unknown.
ENDED_SESSION_KEPT = 7 * 24 * 3600
_NOT_NAME = re.compile(r"[^a-z0-9-]+")


def sha256(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class Person:
    tenant: str
    name: str
    grants: tuple[Grant, ...]
    session_expires_at: float

    @property
    def label(self) -> str:
        return f"{self.tenant}/{self.name}"


def person_name(claims: dict[str, Any], provider: Provider) -> str:
    """The identity name from the configured claim: lowercased, other characters as hyphens."""
    raw = claims.get(provider.name_claim)
    if not isinstance(raw, str) or not raw.strip():
        raise SigninRefused("no_name_claim",
                            f"The ID token carries no {provider.name_claim} claim to name you by; ask the provider's "
                            "admin to release it, or set name_claim in [[signin.provider]].", 403)
    name = _NOT_NAME.sub("-", raw.strip().lower()).strip("-")[:63].strip("-")
    if not NAME_PATTERN.fullmatch(name):
        raise SigninRefused("no_name_claim", f"The {provider.name_claim} claim {raw[:80]!r} makes no identity name; "
                            "set name_claim to another claim.", 403)
    return name


class People:
    def __init__(self, store: Store, registry: Registry, audit: AuditLog) -> None:
        self._store = store
        self._registry = registry
        self._audit = audit

    def remember_once(self, db: Transaction, what: str, value: str, expires_at: float, code: str, message: str) -> None:
        """Refuse ``value`` if it was seen before (a replay); remember it until ``expires_at``."""
        digest = f"{what}:{sha256(value)}"
        if db.query_one("SELECT 1 FROM signin_seen WHERE digest = ?", (digest,)):
            raise SigninRefused(code, message)
        stale = db.query("SELECT digest FROM signin_seen WHERE expires_at < ? LIMIT ?", (time.time(), SWEEP_BATCH))
        for row in stale:
            db.execute("DELETE FROM signin_seen WHERE digest = ?", (row["digest"],))
        db.execute("INSERT INTO signin_seen (digest, expires_at) VALUES (?, ?)", (digest, expires_at))

    def sign_in(self, provider: Provider, claims: dict[str, Any], id_token: str, grants: tuple[Grant, ...],
                lifetime: int, remote: str, nonce: str | None = None) -> tuple[Person, str]:
        """Create or update the person, remember the ID token, open a session: one transaction."""
        name = person_name(claims, provider)
        subject = str(claims["sub"])
        tenant = provider.tenant
        roles = sorted({g.role for g in grants})
        now = time.time()
        token = SESSION_PREFIX + secrets.token_urlsafe(SESSION_BYTES)
        expires_at = now + lifetime
        with self._store.transaction() as db:
            if nonce is not None:
                # Only an ID token a client brought can be replayed: one the controller redeemed a device
                # code for came straight from the provider, once (and two such tokens issued in the same
                # second to the same person may be byte for byte the same).
                replay = "This ID token was already used to sign in; sign in again for a new one."
                self.remember_once(db, "id_token", id_token, float(claims["exp"]) + 60, "id_token_replayed", replay)
                self.remember_once(db, "nonce", nonce, float(claims["exp"]) + 60, "nonce_replayed",
                                   "This sign-in's nonce was already used; start the sign-in again.")
            row = db.query_one("SELECT tenant, name FROM people WHERE provider = ? AND subject = ?",
                               (provider.name, subject))
            if row is None:
                if self._registry.get_identity_in(db, tenant, name) is not None:
                    raise SigninRefused(
                        "person_name_taken",
                        f"The name {name!r} your provider gives you is already an identity of tenant {tenant} that "
                        "is not you; ask an admin to rename one of you.", 409)
                self._registry.create_identity_in(db, tenant, name, tuple(roles))
                db.execute("INSERT INTO people (tenant, name, provider, subject, display_name, grants, created_at, "
                           "signed_in_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                           (tenant, name, provider.name, subject, str(claims.get("name", name))[:200],
                            json.dumps([str(g) for g in grants]), now, now))
            else:
                tenant, name = row["tenant"], row["name"]
                db.execute("UPDATE people SET grants = ?, signed_in_at = ? WHERE tenant = ? AND name = ?",
                           (json.dumps([str(g) for g in grants]), now, tenant, name))
                db.execute("UPDATE identities SET roles = ? WHERE tenant = ? AND name = ?",
                           (json.dumps(roles), tenant, name))
            identity = self._registry.get_identity_in(db, tenant, name)
            assert identity is not None
            if identity.status in BLOCKED_STATUSES:
                raise SigninRefused("person_blocked", f"Your identity {identity.label} is {identity.status}; "
                                    "ask an admin to enable it.", 403)
            self._sweep_sessions(db, now)
            db.execute("INSERT INTO person_sessions (token_sha256, tenant, name, grants, created_at, expires_at) "
                       "VALUES (?, ?, ?, ?, ?, ?)",
                       (sha256(token), tenant, name, json.dumps([str(g) for g in grants]), now, expires_at))
            self._audit.record_in(db, "signin", identity=identity.label, provider=provider.name, subject=subject,
                                  grants=[str(g) for g in grants], session_expires=int(expires_at), remote=remote)
        return Person(tenant, name, grants, expires_at), token

    @staticmethod
    def _sweep_sessions(db: Transaction, now: float) -> None:
        """Forget sessions long over (the audit keeps their story), a batch at a time."""
        stale = db.query("SELECT token_sha256 FROM person_sessions WHERE expires_at < ? LIMIT ?",
                         (now - ENDED_SESSION_KEPT, SWEEP_BATCH))
        for row in stale:
            db.execute("DELETE FROM person_sessions WHERE token_sha256 = ?", (row["token_sha256"],))

    def session(self, token: str) -> Person | None:
        """The person a live session bearer belongs to, or None (unknown, ended, expired, person blocked)."""
        row = self._store.query_one(
            "SELECT s.tenant, s.name, s.grants, s.expires_at, s.ended_at, i.status FROM person_sessions s "
            "JOIN identities i ON i.tenant = s.tenant AND i.name = s.name WHERE s.token_sha256 = ?",
            (sha256(token),))
        if row is None or row["ended_at"] is not None or row["expires_at"] <= time.time():
            return None
        if row["status"] in BLOCKED_STATUSES:
            return None
        grants = tuple(parse_grant(g, "session") for g in json.loads(row["grants"]))
        return Person(row["tenant"], row["name"], grants, row["expires_at"])

    def session_state(self, token: str) -> str:
        """Why a bearer that is no live session fails: unknown, ended, blocked (the person) or expired."""
        row = self._store.query_one(
            "SELECT s.expires_at, s.ended_at, i.status FROM person_sessions s "
            "LEFT JOIN identities i ON i.tenant = s.tenant AND i.name = s.name WHERE s.token_sha256 = ?",
            (sha256(token),))
        if row is None:
            return "unknown"
        if row["ended_at"] is not None:
            return "ended"
        return "blocked" if row["status"] in BLOCKED_STATUSES or row["status"] is None else "expired"

    def end(self, token: str, remote: str) -> Person | None:
        person = self.session(token)
        if person is None:
            return None
        with self._store.transaction() as db:
            db.execute("UPDATE person_sessions SET ended_at = ? WHERE token_sha256 = ? AND ended_at IS NULL",
                       (time.time(), sha256(token)))
            self._audit.record_in(db, "signout", identity=person.label, remote=remote)
        return person

    def is_person(self, tenant: str, name: str) -> bool:
        return self._store.query_one("SELECT 1 FROM people WHERE tenant = ? AND name = ?", (tenant, name)) is not None
