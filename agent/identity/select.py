"""Choosing the key store backend: TPM where present, software otherwise.

The TPM backend (and with it tpm2-pytss, about 10 MB of resident memory) is
imported only when it is chosen or probed: a gateway configured for the
software backend never loads it.

A key that exists decides the backend under ``auto``: a gateway enrolled with
a software key keeps it when a TPM appears later, and one enrolled with a TPM
key never falls back to a fresh software key when the TPM disappears (that
would silently be a different identity).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from agent.errors import EXIT_USAGE, ConfigError, KeyStoreError
from agent.identity.keystore import KeyStore
from agent.identity.tcti import DEFAULT_TCTI, parse_tcti

__all__ = ["BACKENDS", "DEFAULT_TCTI", "KeyStoreSettings", "TpmRequiredButAbsent", "open_keystore"]

log = logging.getLogger(__name__)

BACKENDS = ("auto", "tpm", "software")
# File names each backend keeps in the state directory (see docs/architecture.md).
_TPM_KEY_FILE = "key.tpm.json"
_SOFTWARE_KEY_FILE = "key.pem"


@dataclass(frozen=True)
class KeyStoreSettings:
    """Which backend holds the device key, and how to reach the TPM."""

    backend: str = "auto"
    tcti: str = DEFAULT_TCTI

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(
                f"key store backend {self.backend!r} is not one of {', '.join(BACKENDS)}; fix 'keystore.backend' in the agent config"
            )
        parse_tcti(self.tcti)  # a bad TCTI is a config error now, not a TPM error later


class TpmRequiredButAbsent(KeyStoreError):
    """The config demands a TPM (``backend = "tpm"``), none is usable and none ever held this gateway's
    key: a configuration to fix, so the agent exits 64 and systemd does not restart it in a loop."""

    exit_code = EXIT_USAGE


def open_keystore(state_dir: Path, settings: KeyStoreSettings) -> KeyStore:
    """The key store for ``state_dir``, chosen by ``settings.backend``.

    ``tpm`` raises TpmRequiredButAbsent when no usable TPM answers at ``settings.tcti``;
    ``auto`` uses the TPM if one answers, else the software key store, and logs
    which one it chose.
    """
    state_dir = Path(state_dir)
    if settings.backend == "software":
        return _software(state_dir)
    if settings.backend == "tpm":
        return _tpm_required(state_dir, settings.tcti)
    return _auto(state_dir, settings.tcti)


def _software(state_dir: Path) -> KeyStore:
    from agent.identity.software import SoftwareKeyStore

    return SoftwareKeyStore(state_dir)


def _tpm_required(state_dir: Path, tcti: str) -> KeyStore:
    tpm = _import_tpm()
    if tpm is None:
        raise TpmRequiredButAbsent(
            "the TPM backend needs the tpm2-pytss library (Debian: python3-tpm2-pytss), which is not installed; "
            'install it or set keystore.backend = "software"'
        )
    reason = tpm.unusable_reason(tcti)
    if reason is not None:
        sentence = f'{reason}; set keystore.backend = "software" or fix keystore.tcti'
        if (state_dir / _TPM_KEY_FILE).exists():
            # This gateway's key is in a TPM, so one answered before: most likely its driver comes
            # up late at boot, and a restart (exit 1) finds it.
            raise KeyStoreError(sentence)
        raise TpmRequiredButAbsent(sentence)
    store: KeyStore = tpm.TpmKeyStore(state_dir, tcti)
    return store


def _auto(state_dir: Path, tcti: str) -> KeyStore:
    if (state_dir / _TPM_KEY_FILE).exists():
        log.info("key store: using the TPM at %s, which holds this gateway's key", tcti)
        tpm = _import_tpm()
        if tpm is None:
            raise KeyStoreError(
                "this gateway's key is in a TPM but the tpm2-pytss library (Debian: python3-tpm2-pytss) "
                "is not installed; install it"
            )
        store: KeyStore = tpm.TpmKeyStore(state_dir, tcti)
        return store
    if (state_dir / _SOFTWARE_KEY_FILE).exists():
        log.info("key store: using the software key in %s, which holds this gateway's key", state_dir)
        return _software(state_dir)
    tpm = _import_tpm()
    reason = "the tpm2-pytss library is not installed" if tpm is None else tpm.unusable_reason(tcti)
    if tpm is not None and reason is None:
        log.info("key store: using the TPM at %s", tcti)
        chosen: KeyStore = tpm.TpmKeyStore(state_dir, tcti)
        return chosen
    log.info("key store: %s, so the device key is kept in software in %s", reason, state_dir)
    return _software(state_dir)


def _import_tpm() -> ModuleType | None:
    """The TPM backend module, or None when tpm2-pytss (or libtss2) is missing."""
    try:
        from agent.identity import tpm
    except (ImportError, OSError):  # cffi raises OSError when libtss2 itself is absent
        return None
    return tpm
