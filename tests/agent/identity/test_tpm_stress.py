"""Thousands of signatures against a TPM with no resource manager in front of it.

swtpm holds three transient objects; one leaked per signature and the fourth
signature would fail with "out of memory for object contexts".
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

pytest.importorskip("agent.identity.tss", reason="the TPM backend needs tpm2-pytss")

from cryptography.hazmat.primitives import hashes  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402

from agent.identity.tpm import TpmKeyStore  # noqa: E402

#: Far past the TPM's object slots, and past any per-session counter a leak could hide behind.
SIGNATURES = 3000
#: About 4 ms a signature on swtpm here (derive parent, load, sign, two flushes); a generous ceiling.
TIME_LIMIT = 180.0


def transient_handles(swtpm) -> list[int]:
    from agent.identity.tss import TPM2_CAP, TPM2_HC

    esapi = swtpm.esapi()
    try:
        _, data = esapi.get_capability(TPM2_CAP.HANDLES, TPM2_HC.TRANSIENT_FIRST, 64)
        return [int(handle) for handle in data.data.handles]
    finally:
        esapi.close()


def test_thousands_of_signatures_without_a_resource_manager_all_verify_and_leak_nothing(swtpm, key_dir: Path) -> None:
    store = TpmKeyStore(key_dir, swtpm.tcti)
    store.create()
    public_key = store.public_key()
    started = time.monotonic()
    for counter in range(SIGNATURES):
        assert time.monotonic() - started < TIME_LIMIT, f"only {counter} signatures in {TIME_LIMIT} s"
        message = b"challenge %d" % counter
        public_key.verify(store.sign(message), message, ec.ECDSA(hashes.SHA256()))
    assert transient_handles(swtpm) == []
