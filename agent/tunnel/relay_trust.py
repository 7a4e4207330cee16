"""How long a tunnel trusts its relay: until the relay's certificate ends, or a renewed one it pushed.

The relay's certificate is checked at the TLS handshake (agent/identity/pinned_tls.py);
without more, a relay revoked while it holds a tunnel would keep it as long as
TCP lives. So the agent leaves each tunnel before the certificate it trusted
ends (``leave_at``), and a relay that renewed presents the new certificate
in-band (RELAY_CERT, docs/protocol.md), which ``check_pushed`` judges: the same
checks as the handshake, plus the same names and a signature bound to this
tunnel. No clock and no randomness of its own: ``now`` and the draw come in.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from shared import libcrypto
from shared.protocol import relay_cert_message
from shared.trust import NOT_BEFORE_BACKDATE, cert_not_after, cert_not_before, verify_leaf_issued_by
from shared.tunnel.auth import certificate_digest
from shared.utc import format_utc

#: The share of the relay certificate's life after which an agent may leave: relays renew at two
#: thirds (controller/relay_node.py RENEW_FRACTION) and push at once; three quarters leaves a
#: renewal retried for a twelfth of the life (30 min of 6 h) before anyone goes.
LEAVE_FROM = 0.75
#: The share by which every agent has left: the leaves of a whole fleet are spread over a fifth of
#: the life (72 min of 6 h: 10,000 gateways come back at 2.3 a second), and the last 5 % (18 min of
#: 6 h) covers a reconnect with its backoff before the old certificate ends.
LEAVE_BY = 0.95


#: Seconds the CA dates a certificate's start before its issuance: the life a relay renews by starts after them.
BACKDATE = NOT_BEFORE_BACKDATE.total_seconds()


def leave_at(not_before: float, not_after: float, now: float, draw: float, left_before: int = 0) -> float:
    """When to leave a tunnel whose relay certificate is valid from ``not_before`` to ``not_after``.

    ``draw`` is uniform in [0, 1): the moment falls uniformly between LEAVE_FROM and LEAVE_BY of the
    life counted from issuance (``not_before`` plus the CA's backdating, when the life is longer
    than that). A tunnel that comes up already past LEAVE_BY draws between now and the end.

    ``left_before`` counts the tunnels this agent already left on this very certificate: the relay
    has not renewed (a controller outage, or it was revoked), so leaving early again gains nothing.
    The second tunnel draws in the last part of the life (LEAVE_BY to the end) and any later one
    stays to the end: at most three reconnects per relay certificate, never a loop. Never past
    the end, and not all agents in the same instant.
    """
    issued = not_before + BACKDATE if not_after - not_before > BACKDATE else not_before
    life = max(0.0, not_after - issued)
    if left_before >= 2:
        return not_after
    start, end = issued + life * (LEAVE_BY if left_before else LEAVE_FROM), issued + life * LEAVE_BY
    if now >= end:
        start, end = now, not_after
    elif now > start:
        start = now
    return min(not_after, start + max(0.0, end - start) * min(max(draw, 0.0), 1.0))


class PushRefused(ValueError):
    """A RELAY_CERT the agent does not believe; the message is the one-line reason."""


@dataclass(frozen=True)
class Trusted:
    """The relay certificate a tunnel trusts now, and when the tunnel leaves."""

    certificate: x509.Certificate
    leave_at: float

    @property
    def not_after(self) -> float:
        return cert_not_after(self.certificate).timestamp()


def trust(certificate: x509.Certificate, now: float, draw: float, left_before: int = 0) -> Trusted:
    """The tunnel trusts ``certificate`` from ``now``; it leaves at a moment drawn by ``draw`` (see ``leave_at``)."""
    return Trusted(certificate, leave_at(cert_not_before(certificate).timestamp(),
                                         cert_not_after(certificate).timestamp(), now, draw, left_before))


#: Relay certificates an agent remembers having left a tunnel on: one or two per relay of its list
#: (a list holds a handful); the oldest is forgotten first, which at worst costs one early leave.
MAX_REMEMBERED_LEAVES = 16


def remember_leave(leaves: dict[bytes, int], certificate: x509.Certificate) -> None:
    """Count a tunnel left on ``certificate`` in ``leaves`` (its SHA-256 -> tunnels left), within the bound."""
    digest = _sha256(certificate)
    leaves[digest] = leaves.pop(digest, 0) + 1
    while len(leaves) > MAX_REMEMBERED_LEAVES:
        del leaves[next(iter(leaves))]


def leaves_on(leaves: dict[bytes, int], certificate: x509.Certificate) -> int:
    return leaves.get(_sha256(certificate), 0)


def _sha256(certificate: x509.Certificate) -> bytes:
    """``certificate.fingerprint(SHA256())`` without cryptography's OpenSSL backend, which that loads (2 MiB)."""
    return certificate_digest(certificate.public_bytes(serialization.Encoding.DER))


def _names(cert: x509.Certificate) -> tuple[x509.Name, frozenset[x509.GeneralName]]:
    try:
        names = frozenset(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        names = frozenset()
    return cert.subject, names


def _serves(cert: x509.Certificate) -> bool:
    try:
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return False
    return ExtendedKeyUsageOID.SERVER_AUTH in usages


def check_pushed(current: x509.Certificate, ca: x509.Certificate, der: bytes, signature: bytes,
                 nonce: bytes, now: float) -> x509.Certificate:
    """The pushed certificate, once it may replace ``current`` on the tunnel whose CHALLENGE nonce was
    ``nonce``; PushRefused (its message says why, in one line) otherwise."""
    try:
        pushed = x509.load_der_x509_certificate(der)
    except ValueError:
        raise PushRefused("the relay pushed something that is not a certificate") from None
    if not verify_leaf_issued_by(pushed, ca):
        raise PushRefused("the relay pushed a certificate not signed by the pinned controller CA")
    if not _serves(pushed) or _names(pushed) != _names(current):
        raise PushRefused("the relay pushed a certificate for another relay (its names differ from the ones "
                          "this tunnel was opened with)")
    start, end = cert_not_before(pushed).timestamp(), cert_not_after(pushed).timestamp()
    if pushed == current:
        raise PushRefused("the relay pushed the certificate this tunnel already trusts, not a renewed one")
    if end < cert_not_after(current).timestamp():
        raise PushRefused("the relay pushed a certificate that ends before the one this tunnel trusts")
    if not start <= now < end:
        raise PushRefused(f"the relay pushed a certificate that is not valid now (valid from "
                          f"{format_utc(start)} to {format_utc(end)})")
    if not _signed_by(pushed, der, signature, relay_cert_message(nonce, certificate_digest(der))):
        raise PushRefused("the relay's pushed certificate is not signed over this tunnel (replayed from another "
                          "tunnel, or another key)")
    return pushed


def _signed_by(pushed: x509.Certificate, der: bytes, signature: bytes, message: bytes) -> bool:
    """Whether the pushed certificate's EC key signed ``message``; PushRefused for a key that is not EC.

    Through libcrypto where it can: the key object would load cryptography 38's OpenSSL backend (2 MiB) at
    every relay certificate renewal."""
    try:
        checked = libcrypto.Certificate(der)
    except (libcrypto.Unavailable, ValueError):
        key = pushed.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise PushRefused("the relay pushed a certificate whose key is not an EC key") from None
        try:
            key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            return False
        return True
    if not checked.has_ec_key:
        raise PushRefused("the relay pushed a certificate whose key is not an EC key")
    return checked.verifies(signature, message)

