"""Renewal and recovery: a gateway proves its enrolled key and gets a new certificate.

One endpoint serves both (``POST /v1/renew``). The proof is the CSR's
self-signature by the device key, and that key's SHA-256 must be the key an
identity enrolled with. What the identity's newest certificate says decides
the rest:

* still valid                       -> renewal
* expired less than the grace ago   -> recovery (no new token needed)
* expired longer ago                -> refused ``recovery_expired``
* identity revoked or disabled      -> refused

A key is renewed only while it is the identity's one current key: the key of
a device replaced by re-enrollment is refused (``renewal_unknown_key``, the
code every agent version stops on) with a sentence that says so, and the
refusal names the identity, since the key once held it.

The decision is a pure function of the identity and ``now``
(``renewal_decision``); ``Renewal`` wraps it in one store transaction that
issues, records and audits together.
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

from cryptography.hazmat.primitives.asymmetric import ec

from controller.audit import AuditLog
from controller.ca import CertificateAuthority, certificate_sha256, not_after_of, public_key_sha256
from controller.enrollment import Issued, parse_csr_key
from controller.errors import ControllerError, forbidden
from controller.registry import (
    BLOCKED_STATUSES,
    STATUS_ENROLLED,
    Identity,
    Registry,
    refuse_blocked,
)
from controller.store import Store, Transaction
from shared.utc import utc_datetime

log = logging.getLogger(__name__)

RENEWAL = "renewal"
RECOVERY = "recovery"


@dataclass(frozen=True)
class RenewalRefused:
    """Why a proven key gets no certificate (audited as ``renewal_refused``)."""

    error: ControllerError


def renewal_decision(identity: Identity, now: float, grace: float) -> str | RenewalRefused:
    """``RENEWAL``, ``RECOVERY`` or why not, for an identity that proved its enrolled key."""
    if identity.status in BLOCKED_STATUSES:
        try:
            refuse_blocked(identity)
        except ControllerError as error:
            return RenewalRefused(error)
    if identity.status != STATUS_ENROLLED or identity.cert_not_after is None:
        return RenewalRefused(forbidden(
            "renewal_not_enrolled",
            f"The identity {identity.label} has no enrolled certificate to renew; enroll it with a token.",
        ))
    not_after = identity.cert_not_after
    if now <= not_after:
        return RENEWAL
    if now - not_after <= grace:
        return RECOVERY
    expired = utc_datetime(not_after)
    return RenewalRefused(forbidden(
        "recovery_expired",
        f"This gateway's certificate expired on {expired:%Y-%m-%d %H:%M} UTC, more than "
        f"{_days(grace)} ago; re-enroll it with a new token.",
    ))


def unknown_key(former_holder: Identity | None) -> ControllerError:
    """403 ``renewal_unknown_key``: no identity holds this key now; say so plainly if one did."""
    if former_holder is None:
        return forbidden(
            "renewal_unknown_key", "No identity is enrolled with this gateway's key; re-enroll it with a new token."
        )
    return forbidden(
        "renewal_unknown_key",
        f"This gateway's key is no longer the key of {former_holder.label}: the identity was enrolled again with "
        "a new key, and one identity has one key. Re-enroll this gateway with a new token if it should hold it.",
    )


def _days(seconds: float) -> str:
    days = seconds / 86400
    return f"{days:g} days" if days >= 1 else f"{seconds:g} seconds"


class Renewal:
    """Certifies a proven enrolled key again; every outcome is audited."""

    def __init__(
        self,
        store: Store,
        ca: CertificateAuthority,
        registry: Registry,
        audit: AuditLog,
        cert_lifetime: int,
        recovery_grace: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._ca = ca
        self._registry = registry
        self._audit = audit
        self._cert_lifetime = cert_lifetime
        self._recovery_grace = recovery_grace
        #: The controller's "now" for the renewal window (tests move it).
        self.clock = clock

    def renew(self, csr_pem: object, remote: str | None = None) -> Issued:
        """A new certificate for the identity enrolled with the CSR's key, or a ControllerError.

        Every refusal is audited as ``renewal_refused`` with its reason and
        the peer's address (``remote``): naming the identity and its key when
        the CSR proved the identity's key; otherwise (a bad CSR, a key nobody
        holds) through the audit log's anonymous budget, naming the identity
        a replaced key held before re-enrollment. Never the CSR.
        """
        try:
            public_key = parse_csr_key(csr_pem)
        except ControllerError as error:
            self._refuse(error, remote)
        key_sha256 = public_key_sha256(public_key)
        identity: Identity | None = None
        former: Identity | None = None
        with self._store.transaction() as db:
            candidates = self._registry.identities_with_key(db, key_sha256)
            if not candidates:
                # Named if the key once held an identity, but budgeted: it holds none now.
                former = self._registry.former_holder_in(db, key_sha256)
                refusal = unknown_key(former)
            else:
                # The same device key enrolled under two names: the newest enrollment is the one in use.
                identity = candidates[0]
                decision = renewal_decision(identity, self.clock(), self._recovery_grace)
                if not isinstance(decision, RenewalRefused):
                    return self._certify_in(db, identity, decision, public_key, key_sha256)
                refusal = decision.error
        # After the transaction: the refusal is recorded, nothing else changes.
        self._refuse(refusal, remote, key_sha256, identity, former_holder=former)

    def _certify_in(
        self, db: Transaction, identity: Identity, decision: str, public_key: ec.EllipticCurvePublicKey, key_sha256: str
    ) -> Issued:
        certificate = self._ca.issue(
            public_key, identity.name, identity.tenant, datetime.timedelta(seconds=self._cert_lifetime)
        )
        not_after = not_after_of(certificate).timestamp()
        serial = format(certificate.serial_number, "x")
        db.execute(
            "INSERT INTO certificates (serial, tenant, name, purpose, issued_at, not_after, key_sha256, der_sha256) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (serial, identity.tenant, identity.name, decision, time.time(), not_after, key_sha256,
             certificate_sha256(certificate)),
        )
        self._registry.record_certificate_in(db, identity, not_after)
        self._audit.record_in(
            db,
            decision,
            identity=identity.label,
            key_sha256=key_sha256,
            serial=serial,
            previous_not_after=int(identity.cert_not_after or 0),
            not_after=int(not_after),
        )
        renewed = self._registry.get_identity_in(db, identity.tenant, identity.name)
        assert renewed is not None
        return Issued(renewed, certificate)

    def _refuse(
        self,
        error: ControllerError,
        remote: str | None,
        key_sha256: str | None = None,
        identity: Identity | None = None,
        former_holder: Identity | None = None,
    ) -> NoReturn:
        fields: dict[str, object] = {"reason": error.code, "remote": remote}
        if key_sha256 is not None:
            # The SHA-256 of a public key: no secret, and what names a gateway whose identity is gone.
            fields["key_sha256"] = key_sha256
        if former_holder is not None:
            # A replaced device proves a key that no longer holds the identity: say whose it was, within the
            # anonymous budget, since a device that holds nothing must not grow the store without bound.
            fields["identity"] = former_holder.label
        if identity is None:
            log.warning("renewal refused: %s", error.code)
            self._audit.record_anonymous("renewal_refused", **fields)
        else:
            log.warning("renewal refused for %s: %s", identity.label, error.code)
            self._audit.record("renewal_refused", identity=identity.label, **fields)
        raise error
