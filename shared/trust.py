"""Certificates as both ends read them: dates, the leaf-issued-by check, the CA fingerprint.

The fingerprint the controller writes into an enrollment token must be the one
the agent pins, and cryptography 38 and 42+ read dates differently: one copy
serves both. How the agent judges what a peer presents (the pinned TLS
context, dates at trusted time) is agent/identity/tls_trust.py.
"""

from __future__ import annotations

import datetime
import functools
import hashlib

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import SignatureAlgorithmOID

from shared import libcrypto
from shared.libcrypto import P256_SPKI_PREFIX

FINGERPRINT_PREFIX = "sha256:"
#: How far before its issuance the CA dates a certificate's start: gateways without a real-time clock
#: boot minutes off, and a certificate "not yet valid" on such a clock would fail every first
#: connection. The agent takes it off again where a certificate's life is a schedule (agent/tunnel/relay_trust.py).
NOT_BEFORE_BACKDATE = datetime.timedelta(minutes=5)


def ca_fingerprint(cert: x509.Certificate) -> str:
    """``sha256:<hex>`` of the certificate's DER encoding (the token's ``ca`` claim)."""
    der = cert.public_bytes(serialization.Encoding.DER)
    return FINGERPRINT_PREFIX + hashlib.sha256(der).hexdigest()


def cert_not_after(cert: x509.Certificate) -> datetime.datetime:
    """The certificate's notAfter as an aware UTC datetime (any cryptography version)."""
    aware: datetime.datetime | None = getattr(cert, "not_valid_after_utc", None)
    if aware is not None:
        return aware
    return cert.not_valid_after.replace(tzinfo=datetime.UTC)


def cert_not_before(cert: x509.Certificate) -> datetime.datetime:
    """The certificate's notBefore as an aware UTC datetime (any cryptography version)."""
    aware: datetime.datetime | None = getattr(cert, "not_valid_before_utc", None)
    if aware is not None:
        return aware
    return cert.not_valid_before.replace(tzinfo=datetime.UTC)


#: An uncompressed P-256 point: 0x04, then x and y of 32 bytes each; after ``P256_SPKI_PREFIX`` in the
#: form Outpost's CA writes every EC key it certifies.
P256_POINT_SIZE = 65


def der_bounds(data: bytes, pos: int) -> tuple[int, int]:
    """Where the content of the DER item at ``pos`` starts, and where the item ends."""
    length = data[pos + 1]
    pos += 2
    if length & 0x80:
        count = length & 0x7F
        length = int.from_bytes(data[pos:pos + count], "big")
        pos += count
    return pos, pos + length


def subject_public_key_info(cert: x509.Certificate) -> bytes:
    """The certificate's SubjectPublicKeyInfo, as DER, exactly as the issuer signed it.

    Read from the to-be-signed bytes (which cryptography has parsed, so they are well-formed): on OpenSSL
    3.0 (Debian 12) decoding a certificate's key (``public_key()``) costs about 0.4 ms and encoding it
    again about 0.3 ms, per admission on a relay."""
    tbs = cert.tbs_certificate_bytes
    pos = der_bounds(tbs, 0)[0]  # into the TBSCertificate SEQUENCE
    if tbs[pos] == 0xA0:  # [0] version, absent from a v1 certificate
        pos = der_bounds(tbs, pos)[1]
    for _ in range(5):  # serialNumber, signature, issuer, validity, subject
        pos = der_bounds(tbs, pos)[1]
    return tbs[pos:der_bounds(tbs, pos)[1]]


def ec_public_key(cert: x509.Certificate) -> tuple[ec.EllipticCurvePublicKey | None, bytes]:
    """The certificate's EC public key (None for any other kind) and its SubjectPublicKeyInfo DER.

    A P-256 key in the form our CA writes is built from its point, without OpenSSL 3.0's decoder
    (``subject_public_key_info`` says why); any other goes through ``public_key()``."""
    spki = subject_public_key_info(cert)
    if spki.startswith(P256_SPKI_PREFIX) and len(spki) == len(P256_SPKI_PREFIX) + P256_POINT_SIZE:
        try:
            return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), spki[len(P256_SPKI_PREFIX):]), spki
        except ValueError:  # not a point on the curve: no key
            return None, spki
    key = cert.public_key()
    return (key, spki) if isinstance(key, ec.EllipticCurvePublicKey) else (None, spki)


class Issuer:
    """A CA certificate's subject and key, read once, for checking many leaves against it.

    The signature is checked by the process's libcrypto (shared/libcrypto.py)
    where it can: an agent then never loads cryptography's OpenSSL backend
    for it, about 2 MiB on Debian's cryptography 38. Only the CA's own
    certificate goes through libcrypto's parser, once: OpenSSL 3.0 decodes
    the key of every certificate it parses, about 0.3 ms, which a relay
    would pay per admission; a leaf is read by cryptography and its signed
    bytes checked with the CA's key. Outpost's CA signs with ECDSA-SHA256
    and nothing else (controller/ca.py), so no other algorithm is its
    signature.
    """

    def __init__(self, ca_cert: x509.Certificate) -> None:
        self.certificate = ca_cert
        self.subject = ca_cert.subject
        self.key: ec.EllipticCurvePublicKey | None = None
        self._libcrypto: libcrypto.Certificate | None = None
        try:
            self._libcrypto = libcrypto.Certificate(ca_cert.public_bytes(serialization.Encoding.DER))
        except (libcrypto.Unavailable, ValueError):
            public_key = ca_cert.public_key()
            self.key = public_key if isinstance(public_key, ec.EllipticCurvePublicKey) else None

    def issued(self, cert: x509.Certificate, der: bytes | None = None) -> bool:
        """True when ``cert`` names this CA as issuer and carries its valid signature.

        ``der``, when the caller holds it, is taken as ``cert``'s own bytes only once it is shown to be:
        the signature is checked over ``der`` and ``cert`` must be what ``der`` reads as, so a genuine
        leaf's bytes beside a foreign leaf prove nothing for the foreign one. A caller that has only the
        bytes saves the most with ``leaf`` (one parse, no encoding)."""
        if der is None:
            return self._issued(cert)
        try:
            leaf = self.leaf(der)
        except ValueError:  # not one certificate: it proves nothing, as a bad signature proves nothing
            return False
        return leaf is not None and leaf == cert

    def leaf(self, der: bytes) -> x509.Certificate | None:
        """The certificate ``der`` holds when this CA issued it, else None; ValueError when ``der`` is not
        one DER certificate (nothing before or after it).

        The signature is checked over these very bytes and the certificate returned is read from them:
        what the caller goes on to use (its names, its key) is what the CA signed."""
        cert = x509.load_der_x509_certificate(der)
        return cert if self._issued(cert) else None

    def _issued(self, cert: x509.Certificate) -> bool:
        if cert.signature_algorithm_oid != SignatureAlgorithmOID.ECDSA_WITH_SHA256 or cert.issuer != self.subject:
            return False
        if self._libcrypto is not None:
            return self._libcrypto.verifies(cert.signature, cert.tbs_certificate_bytes)
        if self.key is None:
            return False
        try:
            self.key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            return False
        return True


#: CAs whose Issuer is kept, most recent first: an agent pins one CA (two while it rolls), a relay
#: checks its peers against its controller's; reading a CA's key costs ~0.3 ms on OpenSSL 3.0.
ISSUERS_KEPT = 4


@functools.lru_cache(maxsize=ISSUERS_KEPT)
def issuer_of(ca_cert: x509.Certificate) -> Issuer:
    """The ``Issuer`` of ``ca_cert``, read once and reused (certificates compare and hash by their DER)."""
    return Issuer(ca_cert)


def verify_leaf_issued_by(cert: x509.Certificate, ca_cert: x509.Certificate) -> bool:
    """True when ``cert`` names ``ca_cert`` as issuer and carries its valid signature."""
    return issuer_of(ca_cert).issued(cert)
