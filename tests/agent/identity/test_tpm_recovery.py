"""Field lessons: cleared, replaced, password-protected and locked-out TPMs, and damaged key files.

A gateway whose TPM no longer holds its key must say "identity lost,
re-enroll" (DeviceKeyLost, exit 78) and leave its files as they were, never
crash-loop and never quietly make a new key. A refused authorization is asked
once (TpmAuthorizationRefused, exit 79); a TPM in dictionary-attack lockout is
reported at once as passing with time (TpmLockedOut), not retried in a loop.
"""

from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

pytest.importorskip("agent.identity.tss", reason="the TPM backend needs tpm2-pytss")

from agent.errors import (  # noqa: E402
    EXIT_IDENTITY_LOST,
    EXIT_TPM_AUTH_REFUSED,
    DeviceKeyLost,
    TpmAuthorizationRefused,
    TpmLockedOut,
)
from agent.identity.tpm import KEY_FILE, TpmKeyStore  # noqa: E402
from agent.identity.tpm_errors import LOST_SENTENCE  # noqa: E402
from agent.identity.tpm_objects import PERSISTENT_SRK_HANDLE, srk_template  # noqa: E402
from tests.agent.identity.swtpm_harness import CC_CREATE_PRIMARY, CC_LOAD, CC_SIGN  # noqa: E402

#: An authorization failure is answered at once, never after a retry loop.
AUTH_FAILURE_DEADLINE = 1.0


@pytest.fixture
def enrolled(swtpm, key_dir: Path) -> TpmKeyStore:
    store = TpmKeyStore(key_dir, swtpm.tcti)
    store.create()
    return store


def snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in directory.iterdir()}


def assert_lost(store: TpmKeyStore) -> None:
    with pytest.raises(DeviceKeyLost) as caught:
        store.sign(b"challenge")
    assert str(caught.value) == LOST_SENTENCE
    assert caught.value.exit_code == EXIT_IDENTITY_LOST


def test_a_cleared_tpm_is_a_lost_identity_and_the_key_file_stays(swtpm, enrolled: TpmKeyStore, key_dir: Path) -> None:
    before = snapshot(key_dir)
    swtpm.clear()
    assert_lost(enrolled)
    assert_lost(TpmKeyStore(key_dir, swtpm.tcti))  # after an agent restart too
    assert snapshot(key_dir) == before


def test_a_replaced_tpm_is_a_lost_identity(swtpm, enrolled: TpmKeyStore, key_dir: Path) -> None:
    before = snapshot(key_dir)
    swtpm.replace()
    assert_lost(enrolled)
    assert snapshot(key_dir) == before


def test_a_cleared_tpm_with_a_new_persistent_srk_is_a_lost_identity(swtpm, key_dir: Path) -> None:
    from agent.identity.tss import ESYS_TR, TPM2B_SENSITIVE_CREATE

    def provision_srk() -> None:
        esapi = swtpm.esapi()
        try:
            handle, _, _, _, _ = esapi.create_primary(TPM2B_SENSITIVE_CREATE(), srk_template(), ESYS_TR.OWNER)
            esapi.evict_control(ESYS_TR.OWNER, handle, PERSISTENT_SRK_HANDLE)
            esapi.flush_context(handle)
        finally:
            esapi.close()

    provision_srk()
    store = TpmKeyStore(key_dir, swtpm.tcti)
    store.create()
    swtpm.clear()  # evicts the persistent SRK with the owner seed
    assert_lost(store)
    provision_srk()  # a technician re-provisions: same template, new seed
    assert_lost(store)


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda doc: b"{ not json", id="not-json"),
        pytest.param(lambda doc: b"", id="empty"),
        pytest.param(lambda doc: b"\xff\xfe" * 10, id="not-utf8"),
        pytest.param(lambda doc: json.dumps({**doc, "format": "other/9"}).encode(), id="unknown-format"),
        pytest.param(lambda doc: json.dumps({**doc, "private": "!!"}).encode(), id="private-not-base64"),
        pytest.param(lambda doc: json.dumps({**doc, "public": doc["public"][:-8]}).encode(), id="public-truncated"),
        pytest.param(lambda doc: json.dumps({**doc, "private": doc["private"] + "AAAA"}).encode(), id="trailing-bytes"),
        pytest.param(lambda doc: json.dumps({**doc, "parent": {"kind": "nvram"}}).encode(), id="unknown-parent"),
        pytest.param(lambda doc: json.dumps({k: v for k, v in doc.items() if k != "public"}).encode(), id="field-missing"),
        pytest.param(lambda doc: json.dumps([doc]).encode(), id="not-an-object"),
        pytest.param(lambda doc: b" " * (64 * 1024), id="oversized"),
    ],
)
def test_a_corrupt_key_file_is_a_lost_identity_and_stays_untouched(enrolled: TpmKeyStore, key_dir: Path, damage) -> None:
    path = key_dir / KEY_FILE
    path.write_bytes(damage(json.loads(path.read_bytes())))
    before = snapshot(key_dir)
    assert_lost(enrolled)
    with pytest.raises(DeviceKeyLost):
        enrolled.public_key()
    assert snapshot(key_dir) == before


def test_a_tampered_wrapped_blob_is_refused_by_the_tpm_as_a_lost_identity(enrolled: TpmKeyStore, key_dir: Path) -> None:
    path = key_dir / KEY_FILE
    document = json.loads(path.read_bytes())
    private = bytearray(base64.b64decode(document["private"]))
    private[-1] ^= 0x01  # inside the encrypted sensitive area: only the TPM's HMAC check sees it
    document["private"] = base64.b64encode(bytes(private)).decode()
    path.write_text(json.dumps(document))
    before = snapshot(key_dir)
    assert_lost(enrolled)
    assert snapshot(key_dir) == before


def test_a_missing_key_file_is_a_lost_identity(enrolled: TpmKeyStore, key_dir: Path) -> None:
    os.unlink(key_dir / KEY_FILE)
    with pytest.raises(DeviceKeyLost, match="missing"):
        enrolled.sign(b"challenge")


def test_an_owner_password_is_an_authorization_refusal_asked_once_and_not_a_lost_key(
    counted_swtpm, key_dir: Path
) -> None:
    from agent.identity.tss import ESYS_TR

    enrolled = TpmKeyStore(key_dir, counted_swtpm.tcti)
    enrolled.create()
    esapi = counted_swtpm.esapi()
    try:
        esapi.hierarchy_change_auth(ESYS_TR.OWNER, b"set-by-someone-else")
    finally:
        esapi.close()
    before = snapshot(key_dir)
    mark = len(counted_swtpm.commands())
    started = time.monotonic()
    with pytest.raises(TpmAuthorizationRefused, match="refused authorization") as caught:
        enrolled.sign(b"challenge")
    assert time.monotonic() - started < AUTH_FAILURE_DEADLINE
    assert caught.value.terminal and caught.value.exit_code == EXIT_TPM_AUTH_REFUSED
    assert counted_swtpm.commands()[mark:] == [CC_CREATE_PRIMARY]  # one try, then nothing
    assert snapshot(key_dir) == before
    other = TpmKeyStore(key_dir / "fresh", counted_swtpm.tcti)
    with pytest.raises(TpmAuthorizationRefused, match="refused authorization"):
        other.create()
    assert not other.exists()


def test_a_tpm_in_lockout_is_reported_at_once_as_passing_with_time_and_signs_again_after_it(
    counted_swtpm, key_dir: Path
) -> None:
    """Lockout reaches the agent through a DA-protected storage key someone provisioned at
    0x81000001 (its own keys are noDA); the TPM answers LOCKOUT to loading under it."""
    from agent.identity.tss import ESYS_TR, TPM2B_SENSITIVE_CREATE, TPMA_OBJECT

    template = srk_template()
    template.publicArea.objectAttributes &= ~TPMA_OBJECT.NODA
    esapi = counted_swtpm.esapi()
    try:
        handle, _, _, _, _ = esapi.create_primary(TPM2B_SENSITIVE_CREATE(), template, ESYS_TR.OWNER)
        esapi.evict_control(ESYS_TR.OWNER, handle, PERSISTENT_SRK_HANDLE)
        esapi.flush_context(handle)
        store = TpmKeyStore(key_dir, counted_swtpm.tcti)
        store.create()
        assert json.loads((key_dir / KEY_FILE).read_text())["parent"]["kind"] == "persistent"
        esapi.dictionary_attack_parameters(0, 1000, 1000)  # no tries left: the TPM is in lockout now
        before = snapshot(key_dir)
        mark = len(counted_swtpm.commands())
        started = time.monotonic()
        with pytest.raises(TpmLockedOut, match="dictionary-attack lockout") as caught:
            store.sign(b"challenge")
        assert time.monotonic() - started < AUTH_FAILURE_DEADLINE
        assert caught.value.retryable and not caught.value.terminal
        assert counted_swtpm.commands()[mark:].count(CC_LOAD) == 1  # reported, not retried
        assert snapshot(key_dir) == before
        esapi.dictionary_attack_parameters(3, 1000, 1000)
        esapi.dictionary_attack_lock_reset()
    finally:
        esapi.close()
    mark = len(counted_swtpm.commands())
    signature = store.sign(b"after the lockout")
    assert CC_SIGN in counted_swtpm.commands()[mark:]
    store.public_key().verify(signature, b"after the lockout", ec.ECDSA(hashes.SHA256()))
