"""The certificate authority: one ECDSA P-256 key that signs every certificate and token."""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from controller.names import identity_uri
from controller.settings import DEFAULT_TRUST_DOMAIN
from shared.fsutil import atomic_write, ensure_private_dir
from shared.trust import NOT_BEFORE_BACKDATE, ca_fingerprint, cert_not_after, cert_not_before

# The agent and the controller read certificates the same way: one place for
# the cryptography 38 vs 42+ differences and for the token's CA fingerprint.
# Named here too, for the callers of the CA.
certificate_fingerprint = ca_fingerprint
not_after_of = cert_not_after
not_before_of = cert_not_before

#: Ten years: the CA is pinned by every enrolled gateway and in every token,
#: so replacing it means re-enrolling the fleet.
CA_LIFETIME = datetime.timedelta(days=3650)
#: The listener's certificate: a year, reissued automatically on start.
SERVER_CERT_LIFETIME = datetime.timedelta(days=365)
#: Reissue the listener's certificate on start when it expires sooner than this,
#: so a controller restarted monthly never serves an expired one.
SERVER_CERT_RENEW_BEFORE = datetime.timedelta(days=30)
#: RFC 5280 serials are at most 20 octets; 159 bits keeps the top bit clear.
SERIAL_BITS = 159
CA_COMMON_NAME = "Outpost CA"


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def spki_sha256(spki: bytes) -> str:
    """Hex SHA-256 of a SubjectPublicKeyInfo DER: how the store names a device key."""
    return hashlib.sha256(spki).hexdigest()


def public_key_sha256(public_key: ec.EllipticCurvePublicKey) -> str:
    """``spki_sha256`` of the key's SubjectPublicKeyInfo."""
    return spki_sha256(public_key.public_bytes(serialization.Encoding.DER,
                                               serialization.PublicFormat.SubjectPublicKeyInfo))


def certificate_sha256(certificate: x509.Certificate) -> str:
    """Hex SHA-256 of the certificate's DER: how the store recognises the very certificate it issued."""
    return hashlib.sha256(certificate.public_bytes(serialization.Encoding.DER)).hexdigest()


def _same_key(key: ec.EllipticCurvePrivateKey, certificate: x509.Certificate) -> bool:
    """True when ``certificate`` certifies ``key``'s public half (an ECDSA key, as every key here)."""
    certified = certificate.public_key()
    return (isinstance(certified, ec.EllipticCurvePublicKey)
            and key.public_key().public_numbers() == certified.public_numbers())


def _private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@dataclass
class CertificateAuthority:
    """The CA certificate and key, loaded from or created in ``ca/``."""

    certificate: x509.Certificate
    #: None in a relay process (``--role relay``): it verifies with the CA certificate and signs nothing.
    private_key: ec.EllipticCurvePrivateKey | None
    #: The SPIFFE trust domain written into every identity certificate.
    trust_domain: str = DEFAULT_TRUST_DOMAIN

    @property
    def certificate_pem(self) -> str:
        return self.certificate.public_bytes(serialization.Encoding.PEM).decode("ascii")

    @property
    def fingerprint(self) -> str:
        return certificate_fingerprint(self.certificate)

    @property
    def signing_key(self) -> ec.EllipticCurvePrivateKey:
        """The CA's private key; a relay process holds none, and nothing there may sign."""
        if self.private_key is None:
            raise ValueError("this process holds no CA key (a relay): certificates are issued by a controller")
        return self.private_key

    @classmethod
    def public_only(cls, cert_path: Path, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> CertificateAuthority:
        """The CA as a relay knows it: the certificate alone."""
        return cls(x509.load_pem_x509_certificate(cert_path.read_bytes()), None, trust_domain)

    @classmethod
    def create(cls, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> CertificateAuthority:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_COMMON_NAME)])
        now = utcnow()
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(secrets.randbits(SERIAL_BITS))
            .not_valid_before(now - NOT_BEFORE_BACKDATE)
            .not_valid_after(now + CA_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                    encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(certificate, key, trust_domain)

    @classmethod
    def load(cls, cert_path: Path, key_path: Path, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> CertificateAuthority:
        certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{key_path} is not an ECDSA key")
        if not _same_key(key, certificate):
            raise ValueError(f"{key_path} is not the key of {cert_path}")
        return cls(certificate, key, trust_domain)

    def save(self, cert_path: Path, key_path: Path) -> None:
        ensure_private_dir(cert_path.parent)
        atomic_write(key_path, _private_key_pem(self.signing_key), mode=0o600)
        atomic_write(cert_path, self.certificate_pem.encode("ascii"), mode=0o644)

    def _builder(
        self, subject: x509.Name, public_key: ec.EllipticCurvePublicKey, lifetime: datetime.timedelta
    ) -> x509.CertificateBuilder:
        now = utcnow()
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.certificate.subject)
            .public_key(public_key)
            .serial_number(secrets.randbits(SERIAL_BITS))
            .not_valid_before(now - NOT_BEFORE_BACKDATE)
            # Never past the CA's own end: a client that checks the chain would refuse the rest anyway,
            # and one that pinned the CA must not be handed a certificate that outlives it.
            .not_valid_after(min(now + lifetime, cert_not_after(self.certificate)))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                    encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.signing_key.public_key()), critical=False
            )
        )

    def issue(
        self,
        csr_or_public_key: x509.CertificateSigningRequest | ec.EllipticCurvePublicKey,
        name: str,
        tenant: str,
        lifetime: int | float | datetime.timedelta,
    ) -> x509.Certificate:
        """A client certificate for ``tenant/name``: CN=name, SAN ``spiffe://<domain>/<tenant>/<name>``.

        A CSR must already have been checked (signature, key type) by the caller.
        """
        public_key = (
            csr_or_public_key.public_key()
            if isinstance(csr_or_public_key, x509.CertificateSigningRequest)
            else csr_or_public_key
        )
        if not isinstance(public_key, ec.EllipticCurvePublicKey):
            raise ValueError("only ECDSA keys are certified")
        if not isinstance(lifetime, datetime.timedelta):
            lifetime = datetime.timedelta(seconds=lifetime)
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, tenant),
                x509.NameAttribute(NameOID.COMMON_NAME, name),
            ]
        )
        return (
            self._builder(subject, public_key, lifetime)
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity_uri(self.trust_domain, tenant, name))]),
                critical=False,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(self.signing_key, hashes.SHA256())
        )

    def issue_server(self, public_key: ec.EllipticCurvePublicKey, names: list[str],
                     lifetime: datetime.timedelta = SERVER_CERT_LIFETIME) -> x509.Certificate:
        """The listener's certificate: serverAuth for each DNS name or IP address in ``names``."""
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0] if names else "outpost")])
        return (
            self._builder(subject, public_key, lifetime)
            .add_extension(x509.SubjectAlternativeName(general_names(names)), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(self.signing_key, hashes.SHA256())
        )


    def issue_relay(self, public_key: ec.EllipticCurvePublicKey, name: str, host: str,
                    lifetime: int | float) -> x509.Certificate:
        """A relay's certificate: its listener (serverAuth for ``host``) and its identity as a relay.

        The URI ``spiffe://<domain>/_relay/<name>`` can never name an identity
        (``_`` is not allowed in a tenant), so a relay's certificate presented
        on a tunnel is refused like any stranger's.
        """
        subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "relay"),
                             x509.NameAttribute(NameOID.COMMON_NAME, name)])
        sans: list[x509.GeneralName] = [*general_names([host]),
                                        x509.UniformResourceIdentifier(relay_uri(self.trust_domain, name))]
        return (
            self._builder(subject, public_key, datetime.timedelta(seconds=lifetime))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(self.signing_key, hashes.SHA256())
        )


def relay_uri(trust_domain: str, name: str) -> str:
    """What names a relay in its certificate; never an identity's URI."""
    return f"spiffe://{trust_domain}/_relay/{name}"


def general_names(names: list[str]) -> list[x509.GeneralName]:
    """DNS names and IP addresses for a SubjectAlternativeName, each once."""
    result: list[x509.GeneralName] = []
    for name in names:
        try:
            entry: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(name))
        except ValueError:
            entry = x509.DNSName(name.lower())
        if entry not in result:
            result.append(entry)
    return result


def server_certificate_covers(cert: x509.Certificate, names: list[str], ca: CertificateAuthority,
                              renew_before: datetime.timedelta = SERVER_CERT_RENEW_BEFORE) -> bool:
    """True when ``cert`` was issued by ``ca``, names every one of ``names`` and is not about to expire."""
    if cert.issuer != ca.certificate.subject:
        return False
    if not_after_of(cert) - utcnow() < renew_before:
        return False
    ca_key = ca.certificate.public_key()
    algorithm = cert.signature_hash_algorithm
    if not isinstance(ca_key, ec.EllipticCurvePublicKey) or algorithm is None:
        return False  # not signed by our ECDSA CA (whose certificate is created with its own key)
    try:
        ca_key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(algorithm))
        present = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except Exception:
        return False
    return all(entry in present for entry in general_names(names))


def ensure_server_certificate(
    ca: CertificateAuthority, cert_path: Path, key_path: Path, names: list[str],
    lifetime: datetime.timedelta = SERVER_CERT_LIFETIME,
    renew_before: datetime.timedelta = SERVER_CERT_RENEW_BEFORE,
    force: bool = False,
) -> tuple[x509.Certificate, bool]:
    """Load the listener's certificate, or (re)issue it (always with ``force``); returns (certificate, reissued)."""
    if cert_path.exists() and key_path.exists():
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if (
            isinstance(key, ec.EllipticCurvePrivateKey)
            and _same_key(key, cert)
            and not force
            and server_certificate_covers(cert, names, ca, renew_before)
        ):
            return cert, False
    else:
        key = None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        key = ec.generate_private_key(ec.SECP256R1())
        ensure_private_dir(key_path.parent)
        atomic_write(key_path, _private_key_pem(key), mode=0o600)
    cert = ca.issue_server(key.public_key(), names, lifetime)
    atomic_write(cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
    return cert, True
