"""The steady-state signature through libtss2-esys, against a real swtpm: no tpm2-pytss in a running agent."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("agent.identity.tss", reason="the TPM backend needs tpm2-pytss")

from cryptography.hazmat.primitives import hashes  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402

from agent.errors import DeviceKeyLost  # noqa: E402
from agent.identity.tpm import KEY_FILE, TpmKeyStore, _is_device_public, unusable_reason  # noqa: E402
from agent.identity.tpm_objects import device_key_template  # noqa: E402
from agent.identity.tpm_tss import TssKeyStore  # noqa: E402
from tests.agent.identity.swtpm_harness import CC_CREATE_PRIMARY, CC_LOAD, CC_SIGN  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]
#: A fresh interpreter opening the key store and signing once: seconds.
SUBPROCESS_TIMEOUT = 60
#: TPM2_FlushContext (TPM 2.0 Part 2, TPM_CC).
CC_FLUSH_CONTEXT = 0x165

STEADY_STATE = """
import json, sys
from pathlib import Path
from agent.identity.select import KeyStoreSettings, open_keystore
store = open_keystore(Path({state!r}), KeyStoreSettings(backend={backend!r}, tcti={tcti!r}))
signature = store.sign(b"tunnel challenge")
store.public_key()
print(json.dumps({{"signature": signature.hex(), "loaded": sorted(m for m in sys.modules if m.startswith("tpm2_pytss"))}}))
"""


def verify(public_key: ec.EllipticCurvePublicKey, signature: bytes, data: bytes) -> None:
    public_key.verify(signature, data, ec.ECDSA(hashes.SHA256()))


@pytest.mark.parametrize("backend", ["tpm", "auto"])
def test_an_enrolled_agent_probes_and_signs_without_loading_tpm2_pytss(swtpm, key_dir: Path, backend: str) -> None:
    store = TpmKeyStore(key_dir, swtpm.tcti)
    store.create()
    program = STEADY_STATE.format(state=str(key_dir), backend=backend, tcti=swtpm.tcti)
    result = subprocess.run([sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True,
                            timeout=SUBPROCESS_TIMEOUT)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["loaded"] == []
    verify(store.public_key(), bytes.fromhex(found["signature"]), b"tunnel challenge")


def test_a_signature_takes_the_same_commands_as_before_and_flushes_both_objects(counted_swtpm, key_dir: Path) -> None:
    TpmKeyStore(key_dir, counted_swtpm.tcti).create()
    store = TpmKeyStore(key_dir, counted_swtpm.tcti)  # as after an agent restart
    mark = len(counted_swtpm.commands())
    verify(store.public_key(), store.sign(b"challenge"), b"challenge")
    assert counted_swtpm.commands()[mark:] == [CC_CREATE_PRIMARY, CC_LOAD, CC_FLUSH_CONTEXT, CC_SIGN, CC_FLUSH_CONTEXT]
    assert store._tss is None  # tpm2-pytss was not needed after the key was made


def test_the_public_key_read_without_tpm2_pytss_is_the_one_tpm2_pytss_reads(swtpm, key_dir: Path) -> None:
    TpmKeyStore(key_dir, swtpm.tcti).create()
    lean = TpmKeyStore(key_dir, swtpm.tcti)
    assert lean.public_key().public_numbers() == TssKeyStore(key_dir, swtpm.tcti).public_key().public_numbers()
    assert lean._tss is None


def test_the_device_template_prefix_matches_the_template_the_key_is_made_from() -> None:
    public = bytearray(device_key_template().marshal())
    assert not _is_device_public(bytes(public))  # the template has no point yet
    point = b"\0\x20" + b"\1" * 32 + b"\0\x20" + b"\2" * 32
    filled = bytes(public[:-4]) + point
    filled = (len(filled) - 2).to_bytes(2, "big") + filled[2:]
    assert _is_device_public(filled)
    changed = bytearray(filled)
    changed[9] ^= 0x40  # another objectAttributes bit: not the device key
    assert not _is_device_public(bytes(changed))


def test_a_cleared_tpm_is_still_a_lost_identity_on_the_lean_path(swtpm, key_dir: Path) -> None:
    store = TpmKeyStore(key_dir, swtpm.tcti)
    store.create()
    swtpm.clear()
    with pytest.raises(DeviceKeyLost, match="re-enroll"):
        store.sign(b"challenge")
    assert (key_dir / KEY_FILE).exists()


def test_the_lean_probe_finds_p256_and_an_absent_tpm_still_gets_its_sentence(swtpm, closed_tcti: str) -> None:
    assert unusable_reason(swtpm.tcti) is None
    assert unusable_reason(closed_tcti) == f"no TPM found at {closed_tcti}"


def test_a_key_file_whose_point_was_changed_is_a_lost_identity_asked_once_and_nothing_left_loaded(
    counted_swtpm, key_dir: Path
) -> None:
    TpmKeyStore(key_dir, counted_swtpm.tcti).create()
    document = json.loads((key_dir / KEY_FILE).read_text())
    public = bytearray(base64.b64decode(document["public"]))
    public[-1] ^= 0x01  # the y coordinate: still shaped like a device key, no longer the TPM's
    document["public"] = base64.b64encode(bytes(public)).decode()
    (key_dir / KEY_FILE).write_text(json.dumps(document))
    store = TpmKeyStore(key_dir, counted_swtpm.tcti)
    mark = len(counted_swtpm.commands())
    with pytest.raises(DeviceKeyLost):
        store.sign(b"challenge")
    assert counted_swtpm.commands()[mark:] == [CC_CREATE_PRIMARY, CC_LOAD, CC_FLUSH_CONTEXT]
