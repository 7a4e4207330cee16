"""Field lessons: cleared, replaced and password-protected TPMs, and damaged key files.

A gateway whose TPM no longer holds its key must say "identity lost,
re-enroll" (DeviceKeyLost, exit 78) and leave its files as they were, never
crash-loop and never quietly make a new key.
"""

from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path

import pytest

pytest.importorskip("agent.identity.tss", reason="the TPM backend needs tpm2-pytss")

from agent.errors import EXIT_IDENTITY_LOST, DeviceKeyLost, KeyStoreBusy, KeyStoreError  # noqa: E402
from agent.identity.tpm import KEY_FILE, TpmKeyStore  # noqa: E402
from agent.identity.tpm_errors import LOST_SENTENCE  # noqa: E402
from agent.identity.tpm_objects import PERSISTENT_SRK_HANDLE, srk_template  # noqa: E402

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
    from agent.identity.tss import ESYS_TR
    from agent.identity.tss import TPM2B_SENSITIVE_CREATE

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


def test_an_owner_password_is_an_authorization_error_answered_at_once_and_not_a_lost_key(
    swtpm, enrolled: TpmKeyStore, key_dir: Path
) -> None:
    from agent.identity.tss import ESYS_TR

    esapi = swtpm.esapi()
    try:
        esapi.hierarchy_change_auth(ESYS_TR.OWNER, b"set-by-someone-else")
    finally:
        esapi.close()
    before = snapshot(key_dir)
    started = time.monotonic()
    with pytest.raises(KeyStoreError, match="refused authorization") as caught:
        enrolled.sign(b"challenge")
    assert time.monotonic() - started < AUTH_FAILURE_DEADLINE
    assert not isinstance(caught.value, (DeviceKeyLost, KeyStoreBusy))
    assert snapshot(key_dir) == before
    other = TpmKeyStore(key_dir / "fresh", swtpm.tcti)
    with pytest.raises(KeyStoreError, match="refused authorization"):
        other.create()
    assert not other.exists()
