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

# The schedule is shared with the links between relays (controller/relay/peering.py); its names stay importable here.
from shared.cert_schedule import BACKDATE as BACKDATE
from shared.cert_schedule import LEAVE_BY as LEAVE_BY
from shared.cert_schedule import LEAVE_FROM as LEAVE_FROM
from shared.cert_schedule import leave_at
from shared.protocol import relay_cert_message
from shared.trust import cert_not_after, cert_not_before, issuer_of
from shared.tunnel.auth import certificate_digest
from shared.utc import format_utc


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
        issued = issuer_of(ca).leaf(der)  # checked over the bytes pushed, and read from them: no encoding again
    except ValueError:
        raise PushRefused("the relay pushed something that is not a certificate") from None
    if issued is None:
        raise PushRefused("the relay pushed a certificate not signed by the pinned controller CA")
    pushed = issued
    if not _serves(pushed) or _names(pushed) != _names(current):
        raise PushRefused("the relay pushed a certificate for another relay (its names differ from the ones "
                          "this tunnel was opened with)")
    start, end = cert_not_before(pushed).timestamp(), cert_not_after(pushed).timestamp()
    if pushed == current:
        raise PushRefused("the relay pushed the certificate this tunnel already trusts, not a renewed one")
    if end < cert_not_after(current).timestamp():
        raise PushRefused("the relay pushed a certificate that ends before the one this tunnel trusts")
    ca_end = cert_not_after(ca).timestamp()
    if end > ca_end:  # a handshake after the CA's end is refused: a push must not carry the tunnel past it
        raise PushRefused(f"the relay pushed a certificate that outlives the pinned controller CA (it ends "
                          f"{format_utc(end)}, the CA {format_utc(ca_end)})")
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

