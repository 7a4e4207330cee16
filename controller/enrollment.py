"""Enrollment (token + CSR -> certificate) and operator session certificates.

The token is consumed and the certificate recorded in one transaction, so a
token is redeemed exactly once however many requests race for it, and a
crash leaves either both or neither.
"""

from __future__ import annotations

import datetime
import logging
import time
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from controller.audit import AuditLog
from controller.ca import CertificateAuthority, certificate_sha256, not_after_of, public_key_sha256
from controller.errors import ControllerError, bad_request, forbidden, unknown_identity
from controller.registry import Identity, Registry, refuse_blocked
from controller.store import Row, Store, Transaction
from controller.tokens import TokenAuthority, TokenClaims, supersede_in, token_error, token_row_in

log = logging.getLogger(__name__)

#: A P-256 CSR in PEM is under 1 KiB; anything far larger is not one of ours.
MAX_CSR_PEM = 16 * 1024
#: The ``certificates.purpose`` of a session certificate (``outpostctl connect``).
SESSION_PURPOSE = "session"


@dataclass(frozen=True)
class Issued:
    identity: Identity
    certificate: x509.Certificate

    @property
    def certificate_pem(self) -> str:
        return self.certificate.public_bytes(serialization.Encoding.PEM).decode("ascii")

    @property
    def not_after(self) -> int:
        return int(not_after_of(self.certificate).timestamp())


def is_session_certificate(store: Store, certificate: x509.Certificate) -> bool:
    """True when the store recorded ``certificate`` as a session certificate.

    The row is written in the transaction that issues the certificate, so no
    session certificate exists without it.
    """
    return is_session_serial(store, format(certificate.serial_number, "x"))


def is_session_serial(store: Store, serial: str) -> bool:
    """``is_session_certificate`` by the certificate's serial (hex), as the store records it."""
    row = store.query_one("SELECT purpose FROM certificates WHERE serial = ?", (serial,))
    return row is not None and row["purpose"] == SESSION_PURPOSE


def parse_csr_key(pem: object) -> ec.EllipticCurvePublicKey:
    """The P-256 key of a CSR with a valid self-signature, or 400 ``csr_invalid``."""
    if not isinstance(pem, str) or not pem.strip() or len(pem) > MAX_CSR_PEM:
        raise bad_request("csr_invalid", "The request carries no certificate signing request (CSR) in PEM.")
    try:
        csr = x509.load_pem_x509_csr(pem.encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        raise bad_request("csr_invalid", "The certificate signing request is not valid PEM; create it again.") from None
    public_key = csr.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(public_key.curve, ec.SECP256R1):
        raise bad_request("csr_invalid", "The certificate signing request must carry an ECDSA P-256 key.")
    if not csr.is_signature_valid:
        raise bad_request(
            "csr_invalid", "The certificate signing request's signature does not verify; create it again with the device key."
        )
    return public_key


def refuse_retry(row: Row, identity: Identity, key_sha256: str) -> None:
    """Allow the retry of a redeemed token only for its own key, while that key is still the identity's.

    The retry is for an agent that crashed before storing its certificate.
    Once another token of the identity was redeemed (the token is superseded)
    or the identity holds another key, the token's device no longer holds the
    identity, and replaying the token must not take it back.
    """
    if row["used_key_sha256"] != key_sha256:
        raise token_error("token_used", "This enrollment token was already used; ask central ops for a new one.")
    if row["superseded_at"] is not None or identity.key_sha256 != key_sha256:
        raise token_error(
            "token_used",
            f"This enrollment token was already used, and {identity.label} was enrolled again with a newer token "
            "since, so this device no longer holds it; ask central ops for a new token if it should.",
        )


class Enrollment:
    """Redeems tokens and issues session certificates."""

    def __init__(
        self,
        store: Store,
        ca: CertificateAuthority,
        registry: Registry,
        tokens: TokenAuthority,
        audit: AuditLog,
        cert_lifetime: int,
        session_lifetime: int,
    ) -> None:
        self._store = store
        self._ca = ca
        self._registry = registry
        self._tokens = tokens
        self._audit = audit
        self._cert_lifetime = cert_lifetime
        self._session_lifetime = session_lifetime

    def enroll(self, token: object, csr_pem: object, remote: str | None = None) -> Issued:
        """Consume ``token`` and certify the CSR's key; a refusal changes nothing but one audit event.

        The event says why (the error code) and from where; it names the
        identity only when the token's signature verified (this controller
        wrote that name), and never holds the token or its id.
        """
        claims: TokenClaims | None = None
        try:
            claims = self._tokens.verify(token)
            return self._redeem(claims, csr_pem)
        except ControllerError as error:
            log.warning("enrollment refused: %s", error.code)
            fields = {"reason": error.code, "remote": remote}
            if claims is not None:
                fields["identity"] = f"{claims.tenant}/{claims.name}"
            self._audit.record_anonymous("enrollment_refused", **fields)
            raise

    def _redeem(self, claims: TokenClaims, csr_pem: object) -> Issued:
        public_key = parse_csr_key(csr_pem)
        key_sha256 = public_key_sha256(public_key)
        label = f"{claims.tenant}/{claims.name}"
        with self._store.transaction() as db:
            row = token_row_in(db, claims, label, time.time(), self._tokens.issuer_url)
            identity = self._registry.get_identity_in(db, claims.tenant, claims.name)
            if identity is None:
                raise token_error(
                    "token_unknown", "The identity this token enrolls no longer exists; ask central ops for a new token."
                )
            retry = row["used_at"] is not None
            if retry:
                refuse_retry(row, identity, key_sha256)
            refuse_blocked(identity)
            if not retry:
                db.execute(
                    "UPDATE tokens SET used_at = ?, used_key_sha256 = ? WHERE jti = ? AND used_at IS NULL",
                    (time.time(), key_sha256, claims.jti),
                )
                # From now on this token's key is the identity's one key: no other token enrolls anything.
                supersede_in(db, identity.tenant, identity.name, claims.jti, redeemed_too=True)
            certificate = self._issue_in(db, identity, public_key, self._cert_lifetime, "enrollment")
            not_after = not_after_of(certificate).timestamp()
            rekeyed = self._registry.enroll_key_in(db, identity, key_sha256, not_after)
            fields = {"previous_key_sha256": identity.key_sha256} if rekeyed and identity.key_sha256 else {}
            self._audit.record_in(
                db,
                "enrollment",
                identity=identity.label,
                jti=claims.jti,
                key_sha256=key_sha256,
                serial=format(certificate.serial_number, "x"),
                retry=retry,
                **fields,
            )
            enrolled = self._registry.get_identity_in(db, identity.tenant, identity.name)
        assert enrolled is not None
        if rekeyed:
            # Committed: this process's tunnels on any other key close now, the others' at their next poll.
            self._registry.announce_rekeyed(enrolled)
        return Issued(enrolled, certificate)

    def issue_session(self, tenant: str, name: str, csr_pem: object) -> Issued:
        """A short-lived, dial-only certificate for an operator acting as ``tenant/name``.

        Refused for an identity that enrolled a device key: a gateway is proven
        by its key alone, and the admin credential must not stand in for it.
        """
        public_key = parse_csr_key(csr_pem)
        with self._store.transaction() as db:
            identity = self._registry.get_identity_in(db, tenant, name)
            if identity is None:
                raise unknown_identity(tenant, name)
            refuse_blocked(identity)
            if identity.key_sha256 is not None:
                raise forbidden(
                    "session_for_enrolled_identity",
                    f"The identity {identity.label} is enrolled with its own device key, so only that key may act "
                    "as it; dial as an identity that never enrolled (outpostctl connect --as NAME, default operator).",
                )
            certificate = self._issue_in(db, identity, public_key, self._session_lifetime, SESSION_PURPOSE)
            self._audit.record_in(
                db,
                "session_issued",
                identity=identity.label,
                key_sha256=public_key_sha256(public_key),
                serial=format(certificate.serial_number, "x"),
                not_after=int(not_after_of(certificate).timestamp()),
            )
        return Issued(identity, certificate)

    def _issue_in(
        self, db: Transaction, identity: Identity, public_key: ec.EllipticCurvePublicKey, lifetime: int, purpose: str
    ) -> x509.Certificate:
        certificate = self._ca.issue(public_key, identity.name, identity.tenant, datetime.timedelta(seconds=lifetime))
        db.execute(
            "INSERT INTO certificates (serial, tenant, name, purpose, issued_at, not_after, key_sha256, der_sha256) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                format(certificate.serial_number, "x"),
                identity.tenant,
                identity.name,
                purpose,
                time.time(),
                not_after_of(certificate).timestamp(),
                public_key_sha256(public_key),
                certificate_sha256(certificate),
            ),
        )
        return certificate
