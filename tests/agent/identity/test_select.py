"""Choosing the key store: auto, tpm, software; and what each choice loads."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.errors import ConfigError, KeyStoreError
from agent.identity.select import DEFAULT_TCTI, KeyStoreSettings, open_keystore

ROOT = Path(__file__).resolve().parents[3]
#: Importing the agent and making a software key takes well under a second here.
SUBPROCESS_TIMEOUT = 60
#: A refused loopback connection is immediate; a second is generous. Timed once the TPM library is
#: loaded: importing it and loading its TCTI take about 0.2 s here, seconds under emulation.
ABSENT_DEADLINE = 1.0

needs_tpm_library = pytest.mark.skipif(
    subprocess.run([sys.executable, "-c", "import tpm2_pytss"], capture_output=True).returncode != 0,
    reason="the TPM backend needs tpm2-pytss",
)


def software_keystore_class() -> type:
    from agent.identity.software import SoftwareKeyStore

    return SoftwareKeyStore


def test_settings_default_to_auto_on_the_kernel_resource_manager() -> None:
    settings = KeyStoreSettings()
    assert (settings.backend, settings.tcti) == ("auto", "device:/dev/tpmrm0")
    assert DEFAULT_TCTI == settings.tcti


def test_an_unknown_backend_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="keystore.backend"):
        KeyStoreSettings(backend="hsm")


def test_a_bad_tcti_is_a_config_error_when_the_settings_are_built() -> None:
    with pytest.raises(ConfigError, match="swtpm:host=127.0.0.1,port=2321"):
        KeyStoreSettings(backend="tpm", tcti="swtpm@127.0.0.1")


def test_software_gives_the_software_key_store(key_dir: Path) -> None:
    store = open_keystore(key_dir, KeyStoreSettings(backend="software"))
    assert isinstance(store, software_keystore_class())
    assert store.backend == "software"


@needs_tpm_library
def test_tpm_with_a_tpm_present_gives_the_tpm_key_store(swtpm, key_dir: Path) -> None:
    from agent.identity.tpm import TpmKeyStore

    store = open_keystore(key_dir, KeyStoreSettings(backend="tpm", tcti=swtpm.tcti))
    assert isinstance(store, TpmKeyStore)


@needs_tpm_library
def test_tpm_required_but_absent_is_a_keystore_error_quickly(key_dir: Path, closed_tcti: str,
                                                            tmp_path: Path) -> None:
    # The library's first load is not what "quickly" is about: it happens once per process.
    warm = tmp_path / "warm"
    warm.mkdir(mode=0o700)
    with pytest.raises(KeyStoreError):
        open_keystore(warm, KeyStoreSettings(backend="tpm", tcti=closed_tcti))
    started = time.monotonic()
    with pytest.raises(KeyStoreError) as caught:
        open_keystore(key_dir, KeyStoreSettings(backend="tpm", tcti=closed_tcti))
    assert time.monotonic() - started < ABSENT_DEADLINE
    assert str(caught.value) == (
        f'no TPM found at {closed_tcti}; set keystore.backend = "software" or fix keystore.tcti'
    )
    assert list(key_dir.iterdir()) == []


@needs_tpm_library
def test_tpm_required_with_no_device_node_names_the_device(key_dir: Path) -> None:
    tcti = "device:/dev/outpost-test-no-such-tpm"
    with pytest.raises(KeyStoreError, match=f"^no TPM found at {tcti}; set keystore.backend"):
        open_keystore(key_dir, KeyStoreSettings(backend="tpm", tcti=tcti))


@needs_tpm_library
def test_auto_uses_a_present_tpm_and_says_so(swtpm, key_dir: Path, caplog) -> None:
    from agent.identity.tpm import TpmKeyStore

    with caplog.at_level(logging.INFO, logger="agent.identity.select"):
        store = open_keystore(key_dir, KeyStoreSettings(backend="auto", tcti=swtpm.tcti))
    assert isinstance(store, TpmKeyStore)
    assert f"using the TPM at {swtpm.tcti}" in caplog.text


def test_auto_without_a_tpm_falls_back_to_software_and_says_why(key_dir: Path, closed_tcti: str, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="agent.identity.select"):
        store = open_keystore(key_dir, KeyStoreSettings(backend="auto", tcti=closed_tcti))
    assert isinstance(store, software_keystore_class())
    assert "kept in software" in caplog.text


@needs_tpm_library
def test_auto_keeps_a_software_key_when_a_tpm_appears_later(swtpm, key_dir: Path) -> None:
    software = open_keystore(key_dir, KeyStoreSettings(backend="software"))
    software.create()
    store = open_keystore(key_dir, KeyStoreSettings(backend="auto", tcti=swtpm.tcti))
    assert isinstance(store, software_keystore_class())
    assert store.public_key().public_numbers() == software.public_key().public_numbers()


@needs_tpm_library
def test_auto_keeps_a_tpm_key_when_the_tpm_disappears(swtpm, key_dir: Path, closed_tcti: str) -> None:
    from agent.identity.tpm import TpmKeyStore

    open_keystore(key_dir, KeyStoreSettings(backend="tpm", tcti=swtpm.tcti)).create()
    swtpm.stop()
    store = open_keystore(key_dir, KeyStoreSettings(backend="auto", tcti=swtpm.tcti))
    assert isinstance(store, TpmKeyStore)  # never a silent switch to a new software identity
    with pytest.raises(KeyStoreError, match="no TPM found"):
        store.sign(b"challenge")
    assert sorted(p.name for p in key_dir.iterdir()) == ["key.tpm.json"]


def test_the_software_backend_never_imports_the_tpm_library(tmp_path: Path) -> None:
    program = f"""
import json, sys
from pathlib import Path
from agent.identity.select import KeyStoreSettings, open_keystore
store = open_keystore(Path({str(tmp_path)!r}), KeyStoreSettings(backend="software"))
store.create()
store.sign(b"challenge")
print(json.dumps(sorted(m for m in sys.modules if m.startswith(("tpm2_pytss", "agent.identity.tpm")))))
"""
    result = subprocess.run(
        [sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []


@needs_tpm_library
def test_a_tpm_missing_where_one_held_the_key_is_a_restartable_error_not_a_config_error(key_dir: Path) -> None:
    from agent.identity.select import TpmRequiredButAbsent

    settings = KeyStoreSettings(backend="tpm", tcti="device:/dev/outpost-test-no-such-tpm")
    with pytest.raises(TpmRequiredButAbsent) as never_had_one:
        open_keystore(key_dir, settings)
    assert never_had_one.value.exit_code == 64
    (key_dir / "key.tpm.json").write_text("{}")  # a TPM held this gateway's key: its driver may come up late
    with pytest.raises(KeyStoreError) as late:
        open_keystore(key_dir, settings)
    assert not isinstance(late.value, TpmRequiredButAbsent) and late.value.exit_code == 1
