"""Objects a killed process left in a TPM without a resource manager do not lock the device key out.

A process killed between loading an object and flushing it (the systemd
watchdog, the OOM killer) leaves the object in the TPM until it is reset;
swtpm in socket mode, like /dev/tpm0, has no resource manager to clean up,
and three such objects fill it.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("agent.identity.tss", reason="the TPM backend needs tpm2-pytss")

from cryptography.hazmat.primitives import hashes  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402

from agent.identity.tpm import TpmKeyStore  # noqa: E402
from tests.e2e.harness import python_env  # noqa: E402

#: More than swtpm's object slots (three), so the TPM is certainly full.
LEFTOVERS = 4
TRANSIENT_FIRST = 0x80000000


def transient_handles(swtpm) -> list[int]:  # type: ignore[no-untyped-def]
    from agent.identity.tss import TPM2_CAP

    esapi = swtpm.esapi()
    try:
        _, data = esapi.get_capability(TPM2_CAP.HANDLES, TRANSIENT_FIRST, 64)
        return [int(handle) for handle in data.data.handles]
    finally:
        esapi.close()


def fill_from_a_killed_process(swtpm, count: int) -> None:  # type: ignore[no-untyped-def]
    """A real process loads ``count`` objects, says so, and is killed before it can flush them."""
    script = (
        "import sys\n"
        "from agent.identity.tpm_objects import srk_template\n"
        "from agent.identity.tss import ESAPI, ESYS_TR, TPM2B_SENSITIVE_CREATE, TCTILdr\n"
        f"esapi = ESAPI(TCTILdr('swtpm', {swtpm.tcti.split(':', 1)[1]!r}))\n"
        "loaded = 0\n"
        f"while loaded < {count}:\n"
        "    try:\n"
        "        esapi.create_primary(TPM2B_SENSITIVE_CREATE(), srk_template(), ESYS_TR.OWNER)\n"
        "    except Exception:\n"
        "        break\n"
        "    loaded += 1\n"
        "print(loaded, flush=True)\n"
        "sys.stdin.read()\n"
    )
    process = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True, env=python_env())
    assert process.stdout is not None
    loaded = int(process.stdout.readline())
    process.send_signal(signal.SIGKILL)
    process.wait(10)
    assert loaded >= 3, "swtpm should hold at least three objects"


def test_a_tpm_full_of_a_killed_process_objects_still_signs_with_the_device_key(swtpm, key_dir: Path) -> None:
    store = TpmKeyStore(key_dir, swtpm.tcti)
    store.create()
    fill_from_a_killed_process(swtpm, LEFTOVERS)
    assert len(transient_handles(swtpm)) >= 3

    signature = store.sign(b"relay challenge")

    store.public_key().verify(signature, b"relay challenge", ec.ECDSA(hashes.SHA256()))
    assert transient_handles(swtpm) == []


def test_a_tpm_full_of_a_killed_process_objects_still_creates_a_device_key(swtpm, key_dir: Path) -> None:
    fill_from_a_killed_process(swtpm, LEFTOVERS)

    store = TpmKeyStore(key_dir, swtpm.tcti)
    store.create()

    store.public_key().verify(store.sign(b"csr"), b"csr", ec.ECDSA(hashes.SHA256()))
