"""The TPM key store against a real swtpm: create, sign, and nothing secret on disk."""

from __future__ import annotations

import base64
import json
import stat
from pathlib import Path

import pytest

pytest.importorskip("agent.identity.tss", reason="the TPM backend needs tpm2-pytss")

from cryptography import x509  # noqa: E402
from cryptography.exceptions import InvalidSignature  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402

from agent.errors import KeyStoreError  # noqa: E402
from agent.identity.tpm import KEY_FILE, TpmKeyStore  # noqa: E402
from agent.identity.tpm_objects import (  # noqa: E402
    PERSISTENT_SRK_HANDLE,
    name_of,
    srk_template,
    unmarshal_private,
    unmarshal_public,
)


def verify(store: TpmKeyStore, signature: bytes, data: bytes) -> None:
    store.public_key().verify(signature, data, ec.ECDSA(hashes.SHA256()))


def test_a_created_key_signs_and_the_signature_verifies_with_its_public_key(swtpm, key_dir: Path) -> None:
    store = TpmKeyStore(key_dir, swtpm.tcti)
    assert not store.exists()
    store.create()
    assert store.exists()
    assert store.backend == "tpm"
    assert isinstance(store.public_key().curve, ec.SECP256R1)
    signature = store.sign(b"relay challenge")
    verify(store, signature, b"relay challenge")
    with pytest.raises(InvalidSignature):
        verify(store, signature, b"another challenge")


def test_a_new_store_on_the_same_state_dir_signs_with_the_same_key(swtpm, key_dir: Path) -> None:
    first = TpmKeyStore(key_dir, swtpm.tcti)
    first.create()
    second = TpmKeyStore(key_dir, swtpm.tcti)
    assert second.public_key().public_numbers() == first.public_key().public_numbers()
    verify(first, second.sign(b"after a restart"), b"after a restart")


def test_create_refuses_to_replace_an_existing_key(swtpm, key_dir: Path) -> None:
    store = TpmKeyStore(key_dir, swtpm.tcti)
    store.create()
    before = (key_dir / KEY_FILE).read_bytes()
    with pytest.raises(KeyStoreError, match="already exists"):
        store.create()
    assert (key_dir / KEY_FILE).read_bytes() == before


def test_the_state_dir_holds_only_the_owner_readable_key_file(swtpm, key_dir: Path) -> None:
    TpmKeyStore(key_dir, swtpm.tcti).create()
    assert sorted(p.name for p in key_dir.iterdir()) == [KEY_FILE]
    assert stat.S_IMODE((key_dir / KEY_FILE).stat().st_mode) == 0o600


def test_no_stored_file_or_field_is_a_private_key_and_the_blob_is_tpm_wrapped(swtpm, key_dir: Path) -> None:
    TpmKeyStore(key_dir, swtpm.tcti).create()
    raw = (key_dir / KEY_FILE).read_bytes()
    assert b"PRIVATE KEY" not in raw
    document = json.loads(raw)
    candidates = [path.read_bytes() for path in key_dir.iterdir()]
    candidates += [base64.b64decode(document["public"]), base64.b64decode(document["private"])]
    for blob in candidates:
        for loader in (serialization.load_pem_private_key, serialization.load_der_private_key):
            with pytest.raises((ValueError, TypeError)):
                loader(blob, password=None)
    private = base64.b64decode(document["private"])
    unmarshal_private(private)  # a TPM2B_PRIVATE, exactly
    # TPM2B_PRIVATE = size || integrity HMAC (sized SHA-256) || encrypted sensitive area:
    # the HMAC binds it to this TPM's parent key, and a bare P-256 scalar is 32 bytes.
    outer_size = int.from_bytes(private[:2], "big")
    integrity_size = int.from_bytes(private[2:4], "big")
    assert outer_size == len(private) - 2
    assert integrity_size == 32
    assert outer_size > 2 + integrity_size + 32


# The device key's attributes as the TPM holds them: set, and not set.
ATTRIBUTES_SET = ("FIXEDTPM", "FIXEDPARENT", "SENSITIVEDATAORIGIN", "USERWITHAUTH", "SIGN_ENCRYPT", "NODA")
ATTRIBUTES_CLEAR = ("DECRYPT", "RESTRICTED", "ADMINWITHPOLICY", "ENCRYPTEDDUPLICATION")


def test_the_key_has_the_field_attributes_and_the_parent_is_rederivable(swtpm, key_dir: Path) -> None:
    from agent.identity.tss import ESYS_TR, TPM2B_SENSITIVE_CREATE, TPMA_OBJECT

    TpmKeyStore(key_dir, swtpm.tcti).create()
    document = json.loads((key_dir / KEY_FILE).read_text())
    parent = document["parent"]
    assert parent["kind"] == "primary" and parent["hierarchy"] == "owner"
    esapi = swtpm.esapi()
    try:
        # The parent derived again from the stored template is the one the key was made under.
        srk, srk_public, _, _, _ = esapi.create_primary(
            TPM2B_SENSITIVE_CREATE(), unmarshal_public(base64.b64decode(parent["template"])), ESYS_TR.OWNER
        )
        try:
            assert name_of(srk_public).hex() == parent["name"]
            key = esapi.load(srk, unmarshal_private(base64.b64decode(document["private"])),
                             unmarshal_public(base64.b64decode(document["public"])))
        finally:
            esapi.flush_context(srk)
        try:
            held, _, _ = esapi.read_public(key)  # what the TPM itself says about the loaded key
        finally:
            esapi.flush_context(key)
    finally:
        esapi.close()
    attributes = int(held.publicArea.objectAttributes)
    assert {name for name in ATTRIBUTES_SET if not attributes & int(getattr(TPMA_OBJECT, name))} == set()
    assert {name for name in ATTRIBUTES_CLEAR if attributes & int(getattr(TPMA_OBJECT, name))} == set()
    assert len(bytes(held.publicArea.authPolicy)) == 0  # no policy, so no PCRs either


def test_a_persistent_srk_at_0x81000001_is_used_as_the_parent(swtpm, key_dir: Path) -> None:
    from agent.identity.tss import ESYS_TR, TPM2B_SENSITIVE_CREATE

    esapi = swtpm.esapi()
    try:
        handle, _, _, _, _ = esapi.create_primary(TPM2B_SENSITIVE_CREATE(), srk_template(), ESYS_TR.OWNER)
        esapi.evict_control(ESYS_TR.OWNER, handle, PERSISTENT_SRK_HANDLE)
        esapi.flush_context(handle)
    finally:
        esapi.close()
    store = TpmKeyStore(key_dir, swtpm.tcti)
    store.create()
    parent = json.loads((key_dir / KEY_FILE).read_text())["parent"]
    assert parent["kind"] == "persistent" and int(parent["handle"], 16) == PERSISTENT_SRK_HANDLE
    verify(store, store.sign(b"under the persistent SRK"), b"under the persistent SRK")


def test_signing_key_builds_a_csr_with_the_standard_builder(swtpm, key_dir: Path) -> None:
    store = TpmKeyStore(key_dir, swtpm.tcti)
    store.create()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gw-0001")]))
        .sign(store.signing_key(), hashes.SHA256())
    )
    assert csr.is_signature_valid
    assert csr.public_key().public_numbers() == store.public_key().public_numbers()
    with pytest.raises(NotImplementedError):
        store.signing_key().private_numbers()


def test_delete_removes_the_key_file(swtpm, key_dir: Path) -> None:
    store = TpmKeyStore(key_dir, swtpm.tcti)
    store.create()
    store.delete()
    assert not store.exists()
    assert list(key_dir.iterdir()) == []
    store.delete()  # deleting nothing is not an error
