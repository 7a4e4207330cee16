"""The software key store: a private P-256 key in key.pem that signs and never leaks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.errors import DeviceKeyLost, KeyStoreError
from agent.identity.csr import build_csr
from agent.identity.software import SoftwareKeyStore


@pytest.fixture
def store(tmp_path: Path) -> SoftwareKeyStore:
    keystore = SoftwareKeyStore(tmp_path / "state")
    keystore.create()
    return keystore


def test_a_new_key_is_p256_pkcs8_and_private_to_its_owner(store: SoftwareKeyStore):
    pem = store.key_path.read_bytes()

    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    assert os.stat(store.key_path).st_mode & 0o777 == 0o600
    assert isinstance(store.public_key().curve, ec.SECP256R1)
    assert store.backend == "software" and store.exists()


def test_a_signature_verifies_with_the_public_key(store: SoftwareKeyStore):
    signature = store.sign(b"relay challenge")

    store.public_key().verify(signature, b"relay challenge", ec.ECDSA(hashes.SHA256()))
    with pytest.raises(InvalidSignature):
        store.public_key().verify(signature, b"another challenge", ec.ECDSA(hashes.SHA256()))


def test_a_reopened_store_signs_with_the_same_key(store: SoftwareKeyStore):
    reopened = SoftwareKeyStore(store.state_dir)

    signature = reopened.sign(b"data")

    store.public_key().verify(signature, b"data", ec.ECDSA(hashes.SHA256()))


def test_creating_over_an_existing_key_is_refused_and_keeps_it(store: SoftwareKeyStore):
    before = store.key_path.read_bytes()

    with pytest.raises(KeyStoreError, match="already exists"):
        store.create()

    assert store.key_path.read_bytes() == before


@pytest.mark.parametrize("content", [b"", b"garbage\n", b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"])
def test_a_corrupt_key_means_the_identity_is_lost(tmp_path: Path, content: bytes):
    state = tmp_path / "state"
    state.mkdir()
    (state / "key.pem").write_bytes(content)

    with pytest.raises(DeviceKeyLost, match="re-enroll it with a new token") as caught:
        SoftwareKeyStore(state).sign(b"x")

    assert caught.value.exit_code == 78


def test_a_key_of_another_curve_means_the_identity_is_lost(tmp_path: Path):
    state = tmp_path / "state"
    state.mkdir()
    other = ec.generate_private_key(ec.SECP384R1())
    (state / "key.pem").write_bytes(other.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ))

    with pytest.raises(DeviceKeyLost, match="not an ECDSA P-256 key"):
        SoftwareKeyStore(state).public_key()


def test_a_missing_key_means_the_identity_is_lost(tmp_path: Path):
    with pytest.raises(DeviceKeyLost, match="is missing"):
        SoftwareKeyStore(tmp_path).public_key()


def test_an_unreadable_key_means_the_identity_is_lost(tmp_path: Path):
    # A directory in its place cannot be read even by root, unlike a chmod 0 file.
    (tmp_path / "key.pem").mkdir()

    with pytest.raises(DeviceKeyLost, match="cannot be read"):
        SoftwareKeyStore(tmp_path).sign(b"x")


def test_delete_removes_the_key(store: SoftwareKeyStore):
    store.delete()

    assert not store.exists() and not store.key_path.exists()
    with pytest.raises(DeviceKeyLost):
        store.sign(b"x")


def test_a_csr_is_signed_inside_the_store_for_its_key(store: SoftwareKeyStore):
    csr = build_csr(store, "pump-1")

    assert csr.is_signature_valid
    assert csr.public_key().public_numbers() == store.public_key().public_numbers()
    assert csr.subject.rfc4514_string() == "CN=pump-1"
