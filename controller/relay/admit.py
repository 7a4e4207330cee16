"""Admitting a tunnel: who is this, by their certificate and their signature.

Only what this process verified decides the identity: the leaf certificate is
checked against our CA itself (never "some certificate in the chain"), the
signature must cover our own nonce and our own TLS certificate, and the
registry must still know the identity as enrolled, with the certificate's key
as its one current key (a device replaced by re-enrollment holds a valid
certificate for a key the identity no longer has). A session certificate
(``outpostctl connect``; the store records each one's purpose when it is
issued) is admitted only for an identity that never enrolled a device key,
and the tunnel is marked so that it may dial but never bind.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ssl
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from controller.ca import spki_sha256
from controller.enrollment import is_session_serial
from controller.registry import Identity
from controller.relay.admit_cache import AdmissionCache, CertificateFacts, certificate_key
from shared.protocol import ErrorCode
from shared.trust import cert_not_after, cert_not_before, ec_public_key, issuer_of
from shared.tunnel.auth import verify_challenge_signature

if TYPE_CHECKING:
    from controller.context import ControllerContext

# An agent presents its leaf and at most a few intermediates; anything longer
# is not ours and is refused before any parsing work.
MAX_CHAIN_LENGTH = 4


@dataclass(frozen=True)
class Admitted:
    """Who a tunnel is, as this process verified it."""

    #: The identity as admission read it; its ``key_sha256`` is this tunnel's key
    #: for an enrolled identity (admission refuses any other key).
    identity: Identity
    #: The certificate is a session certificate: dial only, never bind.
    session_certificate: bool
    #: SHA-256 of the SubjectPublicKeyInfo of the key that signed the challenge:
    #: when the identity's key changes, the relay closes tunnels on any other.
    key_sha256: str = ""
    #: The certificate's serial (hex): which certificate opened the tunnel, without parsing it again.
    serial: str = ""


class AdmissionRefused(Exception):
    """The tunnel may not proceed; carries the wire code and the reason sent back."""

    def __init__(self, code: ErrorCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def spiffe_uri(cert: x509.Certificate) -> str | None:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    uris = [u for u in san.get_values_for_type(x509.UniformResourceIdentifier) if u.startswith("spiffe://")]
    return uris[0] if len(uris) == 1 else None


class NeedsStore(Exception):
    """Admitting from what the cache holds is not possible: admit in a worker thread, with the store."""


def certificate_facts(context: ControllerContext, cache: AdmissionCache | None, pem: str,
                      store: bool) -> CertificateFacts:
    """The leaf's facts once our CA's signature verified: from ``cache``, else parsed (and remembered).

    A leaf whose exact bytes the store recorded at issue (``AdmissionCache.recorded``) needs neither
    our CA's signature verified again nor its purpose read: it is the very certificate the CA issued.
    """
    ca = context.ca.certificate
    key = certificate_key(pem) if cache is not None else b""
    facts = cache.certificate(key, ca) if cache is not None else None
    if facts is not None and facts.session_certificate is not None:
        return facts
    if facts is None:
        if not store and (cache is None or not cache.recorded_count):
            raise NeedsStore()
        # The bytes the agent sent are what is looked up, checked and read: one parse, never encoded
        # again, and no second reading of the PEM that could differ from the one checked.
        try:
            der = ssl.PEM_cert_to_DER_cert(pem)
        except (ValueError, TypeError):
            raise AdmissionRefused(ErrorCode.AUTH_FAILED, "the certificate in AUTH is unreadable") from None
        recorded = cache.recorded(der, ca) if cache is not None else None
        if recorded is None and not store:
            raise NeedsStore()
        try:
            leaf = (x509.load_der_x509_certificate(der) if recorded is not None
                    else issuer_of(ca).leaf(der))
        except ValueError:
            raise AdmissionRefused(ErrorCode.AUTH_FAILED, "the certificate in AUTH is unreadable") from None
        if leaf is None:
            raise AdmissionRefused(ErrorCode.AUTH_FAILED, "the certificate was not issued by this controller's CA")
        try:
            usage = list(leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
        except x509.ExtensionNotFound:
            usage = []
        public_key, spki = ec_public_key(leaf)
        facts = CertificateFacts(
            ca=ca, not_before=cert_not_before(leaf), not_after=cert_not_after(leaf),
            client_auth=ExtendedKeyUsageOID.CLIENT_AUTH in usage, uri=spiffe_uri(leaf),
            public_key=public_key, key_sha256=spki_sha256(spki) if public_key is not None else "",
            serial=format(leaf.serial_number, "x"),
            session_certificate=recorded.session if recorded is not None else None,
        )
    if facts.session_certificate is None and facts.client_auth and facts.uri is not None:
        if not store:
            raise NeedsStore()
        # Its purpose is recorded in the transaction that issued it and never changes.
        facts = replace(facts, session_certificate=is_session_serial(context.store, facts.serial))
    if cache is not None:
        cache.remember_certificate(key, facts)
    return facts


def admit(context: ControllerContext, chain_pem: tuple[str, ...] | list[str], signature: bytes, nonce: bytes,
          now: dt.datetime, cache: AdmissionCache | None = None, store: bool = True) -> Admitted:
    """Who a valid AUTH proves to be, or AdmissionRefused saying why not.

    With ``store`` False (on the event loop) nothing is read from the store or
    parsed: what ``cache`` lacks raises NeedsStore, and so does any refusal, so
    that the worker's admission words it (controller/relay/peering.py).
    """
    if not chain_pem or len(chain_pem) > MAX_CHAIN_LENGTH:
        raise AdmissionRefused(ErrorCode.AUTH_FAILED, "AUTH must carry the agent's certificate")
    try:
        return _admit(context, chain_pem, signature, nonce, now, cache, store)
    except AdmissionRefused:
        if not store:
            raise NeedsStore() from None
        raise


def _admit(context: ControllerContext, chain_pem: tuple[str, ...] | list[str], signature: bytes, nonce: bytes,
           now: dt.datetime, cache: AdmissionCache | None, store: bool) -> Admitted:
    facts = certificate_facts(context, cache, chain_pem[0], store)
    if now < facts.not_before:
        raise AdmissionRefused(ErrorCode.AUTH_FAILED, "the certificate is not valid yet (check the gateway's clock)")
    if now > facts.not_after:
        raise AdmissionRefused(
            ErrorCode.AUTH_FAILED,
            f"the certificate expired at {facts.not_after:%Y-%m-%d %H:%M} UTC; the agent must renew it",
        )
    if not facts.client_auth:
        raise AdmissionRefused(ErrorCode.AUTH_FAILED, "the certificate is not a client certificate")
    uri = facts.uri
    identity = cache.identity(uri) if cache is not None and uri else None
    if identity is None and uri:
        if not store:
            raise NeedsStore()
        identity = context.registry.identity_by_uri(uri)
    if identity is None:
        raise AdmissionRefused(ErrorCode.AUTH_FAILED, "the certificate names no identity this controller knows")
    if identity.status in ("revoked", "disabled"):
        raise AdmissionRefused(ErrorCode.DISABLED if identity.status == "disabled" else ErrorCode.REVOKED,
                               f"identity {identity.tenant}/{identity.name} is {identity.status}")
    session_certificate = bool(facts.session_certificate)
    if session_certificate and identity.key_sha256 is not None:
        # Issued before the identity enrolled: from now on only its device key acts as it.
        raise AdmissionRefused(
            ErrorCode.AUTH_FAILED,
            f"identity {identity.tenant}/{identity.name} is enrolled with a device key; "
            "a session certificate cannot act as it",
        )
    public_key = facts.public_key
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or not signed_our_challenge(
            context, public_key, signature, nonce):
        raise AdmissionRefused(ErrorCode.AUTH_FAILED, "the challenge signature does not verify with the certificate's key")
    key_sha256 = facts.key_sha256
    if identity.key_sha256 is not None and key_sha256 != identity.key_sha256:
        # Judged after the signature, so only the holder of the old key learns that it was replaced.
        raise AdmissionRefused(
            ErrorCode.REVOKED,
            f"this certificate's key is no longer the key of identity {identity.tenant}/{identity.name}: "
            "it was re-enrolled with a new key, and one identity has one key",
        )
    return Admitted(identity, session_certificate, key_sha256, facts.serial)


def admit_here(context: ControllerContext, cache: AdmissionCache, chain_pem: tuple[str, ...] | list[str],
               signature: bytes, nonce: bytes, now: dt.datetime) -> Admitted | None:
    """Admission from ``cache`` alone (on the event loop), or None: admit in a worker thread instead."""
    try:
        return admit(context, chain_pem, signature, nonce, now, cache, store=False)
    except NeedsStore:
        return None


def has_usage(leaf: x509.Certificate, usage: x509.ObjectIdentifier) -> bool:
    """Whether ``leaf``'s extended key usage names ``usage`` (a certificate without the extension names none)."""
    try:
        return usage in leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return False


def signed_our_challenge(context: ControllerContext, public_key: ec.EllipticCurvePublicKey, signature: bytes,
                         nonce: bytes) -> bool:
    """Whether ``signature`` signs ``nonce`` bound to our listener's certificate, by ``public_key``.

    The listener's certificate as of the tunnel's handshake: the current one, or the one a
    renewal while running just replaced (controller/listener_tls.py).
    """
    ours = [der for der in (context.server_certificate_der,
                            getattr(context, "previous_server_certificate_der", None)) if der]
    return any(verify_challenge_signature(public_key, signature, nonce, hashlib.sha256(der).digest()) for der in ours)
