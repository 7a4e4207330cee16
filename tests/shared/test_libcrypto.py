"""Signing and the leaf-issued-by check through libcrypto agree with cryptography, refuse what it refuses,
and fall back to cryptography where libcrypto cannot be used; a steady-state agent never loads the backend."""

from __future__ import annotations

import contextlib
import datetime
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import cryptography
import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from shared import libcrypto
from shared.trust import Issuer, issuer_of, verify_leaf_issued_by
from tests.shared.der import certificate_der

ROOT = Path(__file__).resolve().parents[2]
#: A probe process imports the agent's code and signs once: seconds on a loaded machine.
PROBE_TIMEOUT = 60.0
#: cryptography releases from here on (the .venv's among them) wrap a Rust backend in a thin Python module,
#: which ECDSA() imports; Debian 12's 38 has the 2 MiB Python one the agent keeps out.
RUST_BACKEND_VERSION = 42


def pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
        encryption: serialization.KeySerializationEncryption | None = None) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             encryption or serialization.NoEncryption())


def certificate(subject: str, issuer: str, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
                signer: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    return (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1)).not_valid_after(now + datetime.timedelta(days=1))
            .sign(signer, hashes.SHA256()))


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


@pytest.fixture(scope="module")
def ca_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def ca(ca_key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    return certificate("Outpost CA", "Outpost CA", ca_key, ca_key)


def test_a_libcrypto_signature_verifies_with_cryptographys_public_key() -> None:
    key = ec.generate_private_key(ec.SECP256R1())

    signature = libcrypto.PemKey.load(pem(key)).sign(b"relay challenge")

    key.public_key().verify(signature, b"relay challenge", ec.ECDSA(hashes.SHA256()))
    with pytest.raises(InvalidSignature):
        key.public_key().verify(signature, b"another challenge", ec.ECDSA(hashes.SHA256()))


@pytest.mark.parametrize(("make", "sentence"), [
    (lambda: pem(ec.generate_private_key(ec.SECP384R1())), "is not an ECDSA P-256 key"),
    (lambda: pem(rsa.generate_private_key(65537, 2048)), "is not an ECDSA P-256 key"),
    (lambda: pem(ec.generate_private_key(ec.SECP256R1()), serialization.BestAvailableEncryption(b"pw")), "is corrupt"),
    (lambda: b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "is corrupt"),
    (lambda: b"", "is corrupt"),
])
def test_what_is_not_an_unencrypted_p256_key_is_refused_without_asking_for_a_password(make, sentence: str) -> None:
    with pytest.raises(libcrypto.NotDeviceKey, match=sentence):
        libcrypto.PemKey.load(make())


@pytest.mark.parametrize("attempt", [lambda ca: libcrypto.PemKey.load(b"garbage"),
                                     lambda ca: libcrypto.Certificate(b"garbage"),
                                     lambda ca: libcrypto.Certificate(der(ca)).verifies(b"garbage", b"data")])
def test_a_refusal_leaves_no_error_in_the_queue_where_the_next_tls_call_would_find_it(attempt,
                                                                                       ca: x509.Certificate) -> None:
    import ctypes

    queue = ctypes.CDLL(libcrypto.LIBCRYPTO)
    queue.ERR_peek_error.restype = ctypes.c_ulong

    with contextlib.suppress(libcrypto.NotDeviceKey, ValueError):
        attempt(ca)

    assert queue.ERR_peek_error() == 0


def test_the_leaf_check_takes_the_cas_signature_and_nothing_else(issuer: Issuer, ca_key: ec.EllipticCurvePrivateKey,
                                                                 ca: x509.Certificate) -> None:
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    other_ca_key = ec.generate_private_key(ec.SECP256R1())

    assert issuer.leaf(der(certificate("relay", "Outpost CA", leaf_key, ca_key))) is not None
    # Same issuer name, another key: a look-alike CA.
    assert issuer.leaf(der(certificate("relay", "Outpost CA", leaf_key, other_ca_key))) is None
    with pytest.raises(ValueError):
        issuer.leaf(b"not a certificate")
    assert verify_leaf_issued_by(certificate("relay", "Outpost CA", leaf_key, ca_key), ca)
    assert not verify_leaf_issued_by(certificate("relay", "Outpost CA", leaf_key, other_ca_key), ca)
    # The right key but another issuer name is refused before any signature is checked.
    assert not verify_leaf_issued_by(certificate("relay", "Other CA", leaf_key, ca_key), ca)


def test_a_leaf_whose_signature_was_changed_is_refused(issuer: Issuer, ca_key: ec.EllipticCurvePrivateKey) -> None:
    leaf = bytearray(der(certificate("relay", "Outpost CA", ec.generate_private_key(ec.SECP256R1()), ca_key)))
    leaf[-5] ^= 0x01

    assert issuer.leaf(bytes(leaf)) is None


def test_the_cas_key_under_another_hash_is_not_its_signature(issuer: Issuer,
                                                             ca_key: ec.EllipticCurvePrivateKey) -> None:
    """Outpost's CA signs with ECDSA-SHA256 only (controller/ca.py): a leaf its key signed over SHA-384 was
    not issued by it, whichever path checks it."""
    now = datetime.datetime.now(datetime.UTC)
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "relay")]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Outpost CA")]))
            .public_key(ec.generate_private_key(ec.SECP256R1()).public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(ca_key, hashes.SHA384()))
    ca_key.public_key().verify(leaf.signature, leaf.tbs_certificate_bytes, ec.ECDSA(hashes.SHA384()))

    assert issuer.leaf(der(leaf)) is None
    assert not issuer.issued(leaf)


def test_checking_leaves_parses_the_ca_in_libcrypto_once_and_no_leaf(monkeypatch: pytest.MonkeyPatch,
                                                                      ca_key: ec.EllipticCurvePrivateKey,
                                                                      ca: x509.Certificate) -> None:
    """OpenSSL 3.0 decodes the key of every certificate it parses (about 0.3 ms): a relay checking a leaf
    per admission, or an agent per connection, must not pay that for each."""
    parsed: list[int] = []
    real = libcrypto._lib()

    class Counting:
        def __getattr__(self, name: str) -> object:
            if name == "d2i_X509":
                parsed.append(1)
            return getattr(real, name)

    monkeypatch.setattr(libcrypto, "_library", Counting())
    issuer_of.cache_clear()
    leaves = [certificate(f"gw-{n}", "Outpost CA", ec.generate_private_key(ec.SECP256R1()), ca_key) for n in range(3)]

    assert all(verify_leaf_issued_by(leaf, ca) for leaf in leaves)
    assert all(issuer_of(ca).leaf(der(leaf)) is not None for leaf in leaves)
    assert len(parsed) == 1
    issuer_of.cache_clear()


def test_a_ca_with_an_rsa_key_issues_nothing() -> None:
    rsa_key = rsa.generate_private_key(65537, 2048)
    rsa_ca = certificate("RSA CA", "RSA CA", rsa_key, rsa_key)

    assert not libcrypto.Certificate(der(rsa_ca)).has_ec_key
    assert not verify_leaf_issued_by(certificate("relay", "RSA CA", ec.generate_private_key(ec.SECP256R1()),
                                                 rsa_key), rsa_ca)


def test_without_libcrypto_cryptography_checks_and_signs_the_same(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                                  ca_key: ec.EllipticCurvePrivateKey,
                                                                  ca: x509.Certificate) -> None:
    from agent.identity.software import SoftwareKeyStore

    store = SoftwareKeyStore(tmp_path)
    store.create()
    monkeypatch.setattr(libcrypto, "_library", None)
    monkeypatch.setattr(libcrypto, "LIBCRYPTO", "libcrypto.so.not-here")
    leaf_key = ec.generate_private_key(ec.SECP256R1())

    issuer = Issuer(ca)
    reopened = SoftwareKeyStore(tmp_path)
    signature = reopened.sign(b"data")

    assert issuer.key is not None  # the cryptography path
    assert issuer.issued(certificate("relay", "Outpost CA", leaf_key, ca_key))
    assert not issuer.issued(certificate("relay", "Outpost CA", leaf_key, leaf_key))
    assert reopened._without_libcrypto
    store.public_key().verify(signature, b"data", ec.ECDSA(hashes.SHA256()))


def test_the_public_key_read_through_libcrypto_is_cryptographys(tmp_path: Path) -> None:
    from agent.identity.software import SoftwareKeyStore, SpkiPublicKey

    store = SoftwareKeyStore(tmp_path)
    store.create()
    expected = store.public_key()
    read = SoftwareKeyStore(tmp_path).public_key()

    assert isinstance(read, SpkiPublicKey)
    assert read == expected and read.public_numbers() == expected.public_numbers()
    assert read.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo) == \
        expected.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    read.verify(store.sign(b"data"), b"data", ec.ECDSA(hashes.SHA256()))
    assert read != ec.generate_private_key(ec.SECP256R1()).public_key()


def test_a_certificates_key_checks_a_message_signature(ca_key: ec.EllipticCurvePrivateKey,
                                                      ca: x509.Certificate) -> None:
    checked = libcrypto.Certificate(der(ca))
    signature = ca_key.sign(b"nonce and digest", ec.ECDSA(hashes.SHA256()))

    assert checked.verifies(signature, b"nonce and digest")
    assert not checked.verifies(signature, b"another nonce")
    assert not checked.verifies(b"\x30\x00", b"nonce and digest")
    assert checked.spki() == ca.public_key().public_bytes(serialization.Encoding.DER,
                                                          serialization.PublicFormat.SubjectPublicKeyInfo)


def test_signing_and_checking_as_a_running_agent_does_not_load_cryptographys_openssl_backend(
        tmp_path: Path, ca_key: ec.EllipticCurvePrivateKey, ca: x509.Certificate) -> None:
    """The steady state (a signature per tunnel, a certificate check per connection, the relay
    certificate's digest, a renewal's CSR and key comparison) in a fresh process: on cryptography 38
    the backend alone is 2 MiB."""
    from agent.identity.software import SoftwareKeyStore

    store = SoftwareKeyStore(tmp_path)
    store.create()
    leaf = certificate("relay", "Outpost CA", ec.generate_private_key(ec.SECP256R1()), ca_key)
    (tmp_path / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "leaf.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    probe = (
        "import sys; from pathlib import Path; from cryptography import x509\n"
        "from agent.identity.software import SoftwareKeyStore\n"
        "from agent.tunnel.relay_trust import leaves_on, remember_leave\n"
        "from agent.tunnel.status import OPENSSL_BACKEND\n"
        "from shared.trust import verify_leaf_issued_by\n"
        "from agent.identity.csr import build_csr\n"
        "from cryptography.hazmat.primitives.serialization import Encoding\n"
        "from agent.identity.exchange import certificate_spki, spki\n"
        f"d = Path({str(tmp_path)!r})\n"
        "ca = x509.load_pem_x509_certificate((d / 'ca.pem').read_bytes())\n"
        "leaf = x509.load_pem_x509_certificate((d / 'leaf.pem').read_bytes())\n"
        "leaves = {}; remember_leave(leaves, leaf)\n"
        "print(SoftwareKeyStore(d).sign(b'challenge').hex(), verify_leaf_issued_by(leaf, ca), leaves_on(leaves, leaf),\n"
        "      OPENSSL_BACKEND in sys.modules)\n"
        "store = SoftwareKeyStore(d)\n"
        "csr = build_csr(store, 'pump-1')  # a renewal's CSR, and its key compared with the answer's\n"
        "assert csr.public_bytes(Encoding.DER) and certificate_spki(leaf) != spki(store.public_key())\n"
        "print(OPENSSL_BACKEND in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=PROBE_TIMEOUT,
                            cwd=ROOT)

    signature, issued, left, loaded, loaded_by_renewal = result.stdout.split()
    assert (issued, left, loaded) == ("True", "1", "False"), result.stderr
    # From cryptography 42 on the backend module is a thin wrapper of the Rust one, which ECDSA() imports.
    assert loaded_by_renewal == str(int(cryptography.__version__.split(".")[0]) >= RUST_BACKEND_VERSION)
    store.public_key().verify(bytes.fromhex(signature), b"challenge", ec.ECDSA(hashes.SHA256()))


def test_a_p256_point_becomes_its_subject_public_key_info_and_a_point_off_the_curve_is_refused() -> None:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    point = key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)

    assert libcrypto.p256_spki(point) == key.public_bytes(serialization.Encoding.DER,
                                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    moved = point[:-1] + bytes([point[-1] ^ 0x01])
    with pytest.raises(ValueError, match="not a point on P-256"):
        libcrypto.p256_spki(moved)


def spliced(tbs_of: x509.Certificate, signature_of: x509.Certificate) -> bytes:
    """One certificate's to-be-signed part with another's signature: names and key of the first, a CA's
    real signature (over the second) beside them."""
    return certificate_der(tbs_of.tbs_certificate_bytes, signature_of.signature)


@pytest.fixture(params=["libcrypto", "cryptography"])
def issuer(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch,
           ca: x509.Certificate) -> Iterator[Issuer]:
    """The CA's Issuer on each of its two paths."""
    if request.param == "cryptography":
        monkeypatch.setattr(libcrypto, "_library", None)
        monkeypatch.setattr(libcrypto, "LIBCRYPTO", "libcrypto.so.not-here")
    issuer_of.cache_clear()  # an Issuer kept from another test would check on the path it was made on
    made = Issuer(ca)
    assert (made.key is not None) == (request.param == "cryptography")
    yield made
    issuer_of.cache_clear()


def test_the_der_a_caller_passes_is_what_is_checked_and_what_is_read(issuer: Issuer,
                                                                     ca_key: ec.EllipticCurvePrivateKey) -> None:
    genuine = certificate("gw-a", "Outpost CA", ec.generate_private_key(ec.SECP256R1()), ca_key)
    # Same issuer name, the intruder's own names and key, signed by a look-alike CA.
    foreign = certificate("intruder", "Outpost CA", ec.generate_private_key(ec.SECP256R1()),
                          ec.generate_private_key(ec.SECP256R1()))

    assert issuer.issued(genuine) and issuer.issued(genuine, der(genuine))
    read = issuer.leaf(der(genuine))
    assert read == genuine and read is not None and read.subject == genuine.subject
    # The genuine leaf's bytes beside a foreign leaf vouch for nothing: what is checked is what is used.
    assert not issuer.issued(foreign)
    assert not issuer.issued(foreign, der(genuine))
    assert not issuer.issued(genuine, der(foreign))
    assert issuer.leaf(der(foreign)) is None
    # The intruder's names and key beside the CA's real signature over another leaf.
    forged = spliced(foreign, genuine)
    assert x509.load_der_x509_certificate(forged).signature == genuine.signature
    assert issuer.leaf(forged) is None
    assert not issuer.issued(x509.load_der_x509_certificate(forged), forged)
    assert not issuer.issued(genuine, forged)
    # Bytes after the genuine certificate (another one, or junk) make it no certificate at all.
    for tail in (der(foreign), b"\0"):
        with pytest.raises(ValueError):
            issuer.leaf(der(genuine) + tail)
        assert not issuer.issued(genuine, der(genuine) + tail)
    assert not issuer.issued(genuine, b"not a certificate")
