"""A certificate's key as the relay reads it for admission: the SubjectPublicKeyInfo its issuer signed, and the
EC key built from it, equal to what cryptography decodes, for every kind of key and certificate version."""

from __future__ import annotations

import datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from shared.libcrypto import P256_SPKI_PREFIX
from shared.trust import der_bounds, ec_public_key, subject_public_key_info
from tests.shared.der import certificate_der, der_item

CA_KEY = ec.generate_private_key(ec.SECP256R1())


def issued(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, *, extensions: bool = False) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gw-1")]))
               .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Outpost CA")]))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1)))
    if extensions:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier("spiffe://outpost/default/gw-1")]), False)
    return builder.sign(CA_KEY, hashes.SHA256())


def version_1(of: x509.Certificate) -> x509.Certificate:
    """``of`` without its version field and extensions (an X.509 v1 certificate), signed again by the CA."""
    tbs = of.tbs_certificate_bytes
    items, pos = [], der_bounds(tbs, 0)[0]
    while pos < len(tbs):
        end = der_bounds(tbs, pos)[1]
        items.append(tbs[pos:end])
        pos = end
    body = b"".join(item for item in items if item[0] not in (0xA0, 0xA3))  # no [0] version, no [3] extensions
    new_tbs = der_item(0x30, body)
    signature = CA_KEY.sign(new_tbs, ec.ECDSA(hashes.SHA256()))
    return x509.load_der_x509_certificate(certificate_der(new_tbs, signature))


def spki_of(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.mark.parametrize("key", [ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP384R1()),
                                 rsa.generate_private_key(65537, 2048)], ids=["p256", "p384", "rsa"])
@pytest.mark.parametrize("shape", ["v3", "v3 with extensions", "v1"])
def test_the_key_info_read_from_the_signed_bytes_is_the_one_cryptography_decodes(key, shape: str) -> None:
    cert = issued(key, extensions=shape == "v3 with extensions")
    if shape == "v1":
        cert = version_1(cert)
        assert cert.version == x509.Version.v1

    assert subject_public_key_info(cert) == spki_of(cert)


def test_a_p256_key_is_built_from_its_point_and_equals_the_decoded_one() -> None:
    cert = issued(ec.generate_private_key(ec.SECP256R1()), extensions=True)

    key, spki = ec_public_key(cert)

    assert spki.startswith(P256_SPKI_PREFIX) and spki == spki_of(cert)
    assert key is not None and key.public_numbers() == cert.public_key().public_numbers()


def test_another_curve_goes_through_cryptography_and_an_rsa_key_is_no_ec_key() -> None:
    p384 = issued(ec.generate_private_key(ec.SECP384R1()))
    key, spki = ec_public_key(p384)
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp384r1"
    assert spki == spki_of(p384)

    rsa_cert = issued(rsa.generate_private_key(65537, 2048))
    assert ec_public_key(rsa_cert) == (None, spki_of(rsa_cert))


def test_a_p256_point_off_the_curve_gives_no_key() -> None:
    """A leaf whose key info has P-256's form but a point off the curve (the CA signed it; cryptography reads
    it without checking the point): no key, so admission refuses it, and nothing raises."""
    cert = issued(ec.generate_private_key(ec.SECP256R1()))
    spki = spki_of(cert)
    tbs = cert.tbs_certificate_bytes
    moved = spki[:-1] + bytes([spki[-1] ^ 0x01])
    assert tbs.count(spki) == 1
    new_tbs = tbs.replace(spki, moved)
    signature = CA_KEY.sign(new_tbs, ec.ECDSA(hashes.SHA256()))
    off_curve = x509.load_der_x509_certificate(certificate_der(new_tbs, signature))

    assert ec_public_key(off_curve) == (None, moved)
