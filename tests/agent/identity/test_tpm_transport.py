"""Reaching the TPM: a bad TCTI, an absent TPM and a TPM that goes away."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

pytest.importorskip("agent.identity.tss", reason="the TPM backend needs tpm2-pytss")

from cryptography.hazmat.primitives import hashes  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402

from agent.errors import ConfigError, DeviceKeyLost, KeyStoreError  # noqa: E402
from agent.identity.tpm import TpmKeyStore, unusable_reason  # noqa: E402

#: Connection refused on loopback is immediate; a second is generous. Timed once the TCTI library is
#: loaded: its first load takes about 0.1 s here, a second or more under emulation.
ABSENT_DEADLINE = 1.0


def test_a_bad_tcti_string_is_a_config_error_before_any_tpm_is_touched(key_dir: Path) -> None:
    with pytest.raises(ConfigError, match="device:/dev/tpmrm0"):
        TpmKeyStore(key_dir, "tpm at /dev/tpmrm0")
    assert list(key_dir.iterdir()) == []


def test_an_absent_device_node_is_named_with_what_to_do(key_dir: Path, tmp_path: Path) -> None:
    missing = "device:/dev/outpost-test-no-such-tpm"
    store = TpmKeyStore(key_dir, missing)
    with pytest.raises(KeyStoreError) as caught:
        store.create()
    assert str(caught.value) == (
        f'no TPM found at {missing}; set keystore.backend = "software" or fix keystore.tcti'
    )
    assert list(key_dir.iterdir()) == []
    assert unusable_reason(missing) == f"no TPM found at {missing}"


def test_a_simulator_that_is_not_listening_is_an_absent_tpm_reported_quickly(key_dir: Path, closed_tcti: str,
                                                                            tmp_path: Path) -> None:
    # The library's first load is not what "quickly" is about: it happens once per process.
    warm = tmp_path / "warm"
    warm.mkdir(mode=0o700)
    with pytest.raises(KeyStoreError):
        TpmKeyStore(warm, closed_tcti).create()
    store = TpmKeyStore(key_dir, closed_tcti)
    started = time.monotonic()
    with pytest.raises(KeyStoreError, match="no TPM found at swtpm:host=127.0.0.1"):
        store.create()
    assert time.monotonic() - started < ABSENT_DEADLINE
    assert not store.exists()


def test_a_tpm_that_went_away_is_a_keystore_error_not_a_lost_identity(swtpm, key_dir: Path) -> None:
    store = TpmKeyStore(key_dir, swtpm.tcti)
    store.create()
    before = (key_dir / "key.tpm.json").read_bytes()
    swtpm.stop()
    with pytest.raises(KeyStoreError, match="no TPM found") as caught:
        store.sign(b"challenge")
    assert not isinstance(caught.value, DeviceKeyLost)
    assert (key_dir / "key.tpm.json").read_bytes() == before
    swtpm.start()  # the same TPM back (state kept): the key works again
    store.public_key().verify(store.sign(b"challenge"), b"challenge", ec.ECDSA(hashes.SHA256()))
