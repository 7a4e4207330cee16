"""A device key that lives only in this process's memory.

Used for short operator sessions (``outpostctl connect``): the key dies with
the process, and its certificate lives an hour.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from agent.errors import KeyStoreError
from agent.identity.keystore import KeyStore


class EphemeralKeyStore(KeyStore):
    """An ECDSA P-256 key held in memory only."""

    backend = "memory"

    def __init__(self) -> None:
        self._key: ec.EllipticCurvePrivateKey | None = None

    def exists(self) -> bool:
        return self._key is not None

    def create(self) -> None:
        if self._key is not None:
            raise KeyStoreError("a key already exists in this session")
        self._key = ec.generate_private_key(ec.SECP256R1())

    def public_key(self) -> ec.EllipticCurvePublicKey:
        if self._key is None:
            raise KeyStoreError("no key was created in this session")
        return self._key.public_key()

    def sign(self, data: bytes) -> bytes:
        if self._key is None:
            raise KeyStoreError("no key was created in this session")
        return self._key.sign(data, ec.ECDSA(hashes.SHA256()))

    def delete(self) -> None:
        self._key = None
