"""No certificate the CA signs outlives the CA itself.

A gateway pins the CA; a certificate ending after it would be refused by every
peer that checks the chain, and an agent refuses a pushed relay certificate that
outlives the pin. So the CA never issues one: near its own end it issues shorter.
"""

from __future__ import annotations

import datetime

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from controller.ca import CertificateAuthority, utcnow
from shared.trust import cert_not_after

DAY = datetime.timedelta(days=1)


def ca_ending_in(remaining: datetime.timedelta) -> CertificateAuthority:
    """A CA like any other, whose own certificate ends ``remaining`` from now."""
    fresh = CertificateAuthority.create()
    cert = fresh.certificate
    builder = (
        x509.CertificateBuilder()
        .subject_name(cert.subject)
        .issuer_name(cert.issuer)
        .public_key(fresh.signing_key.public_key())
        .serial_number(cert.serial_number)
        .not_valid_before(utcnow() - DAY)
        .not_valid_after(utcnow() + remaining)
    )
    for extension in cert.extensions:
        builder = builder.add_extension(extension.value, extension.critical)
    return CertificateAuthority(builder.sign(fresh.signing_key, hashes.SHA256()), fresh.signing_key)


def key() -> ec.EllipticCurvePublicKey:
    return ec.generate_private_key(ec.SECP256R1()).public_key()


def test_a_gateway_certificate_ends_with_a_ca_that_ends_first() -> None:
    ca = ca_ending_in(datetime.timedelta(hours=2))
    issued = ca.issue(key(), "gw-1", "default", DAY)
    assert cert_not_after(issued) == cert_not_after(ca.certificate)


def test_relay_and_listener_certificates_end_with_the_ca_too() -> None:
    ca = ca_ending_in(datetime.timedelta(hours=2))
    relay = ca.issue_relay(key(), "relay-a", "127.0.0.1", 6 * 3600)
    listener = ca.issue_server(key(), ["127.0.0.1"])
    assert cert_not_after(relay) == cert_not_after(ca.certificate)
    assert cert_not_after(listener) == cert_not_after(ca.certificate)


def test_a_ca_with_years_left_issues_the_lifetime_asked() -> None:
    ca = CertificateAuthority.create()
    before = utcnow()
    issued = ca.issue(key(), "gw-1", "default", DAY)
    assert before + DAY - datetime.timedelta(seconds=5) <= cert_not_after(issued) <= utcnow() + DAY
