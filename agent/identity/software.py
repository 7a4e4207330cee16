"""The software key store: a P-256 key in ``key.pem`` (PKCS#8, mode 0600).

For gateways without a TPM. The key never leaves this module as bytes: callers
sign through ``sign`` like they would with the TPM. Signatures and the public
half go through the process's libcrypto (shared/libcrypto.py), so a running
agent, renewals included, does not load cryptography's OpenSSL backend for
them; creating the key (enrollment) uses cryptography.
"""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.errors import DeviceKeyLost, KeyStoreError
from agent.identity.keystore import KeyStore, SpkiPublicKey
from shared import libcrypto
from shared.fsutil import PRIVATE_FILE_MODE, atomic_write, ensure_private_dir

KEY_FILE = "key.pem"
#: A PKCS#8 P-256 key in PEM is about 240 bytes; anything far larger is not ours.
MAX_KEY_FILE = 16 * 1024


class SoftwareKeyStore(KeyStore):
    """An ECDSA P-256 key kept in a PEM file inside the state directory."""

    backend = "software"

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self.key_path = self.state_dir / KEY_FILE
        self._key: ec.EllipticCurvePrivateKey | None = None
        self._pem_key: libcrypto.PemKey | None = None
        #: Set once libcrypto turned out unable to sign here: cryptography signs from then on.
        self._without_libcrypto = False

    def exists(self) -> bool:
        return self.key_path.exists()

    def create(self) -> None:
        if self.exists():
            raise KeyStoreError(
                f"a device key already exists in {self.key_path}; refusing to replace it"
            )
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        ensure_private_dir(self.state_dir)
        atomic_write(self.key_path, pem, PRIVATE_FILE_MODE)
        self._key = key

    def public_key(self) -> ec.EllipticCurvePublicKey:
        if self._key is None:
            pem_key = self._libcrypto_key()
            if pem_key is not None:
                return SpkiPublicKey(pem_key.spki())
        return self._load().public_key()

    def sign(self, data: bytes) -> bytes:
        if self._key is None:
            pem_key = self._libcrypto_key()
            if pem_key is not None:
                return pem_key.sign(data)
        return self._load().sign(data, ec.ECDSA(hashes.SHA256()))

    def delete(self) -> None:
        self._key = None
        self._pem_key = None
        try:
            self.key_path.unlink()
        except FileNotFoundError:
            pass

    def _libcrypto_key(self) -> libcrypto.PemKey | None:
        """The key held by libcrypto, or None where it cannot sign here."""
        if self._pem_key is None and not self._without_libcrypto:
            pem = self._read()
            try:
                self._pem_key = libcrypto.PemKey.load(pem)
            except libcrypto.Unavailable:
                self._without_libcrypto = True
            except libcrypto.NotDeviceKey as error:
                raise self._lost(str(error)) from None
        return self._pem_key

    def _load(self) -> ec.EllipticCurvePrivateKey:
        if self._key is not None:
            return self._key
        pem = self._read()
        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError):
            raise self._lost("is corrupt") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
            raise self._lost("is not an ECDSA P-256 key")
        self._key = key
        return key

    def _read(self) -> bytes:
        try:
            with open(self.key_path, "rb") as handle:
                pem = handle.read(MAX_KEY_FILE + 1)
        except FileNotFoundError:
            raise self._lost("is missing") from None
        except OSError as error:
            raise self._lost(f"cannot be read ({error.strerror or error})") from None
        if len(pem) > MAX_KEY_FILE:
            raise self._lost("is not a device key")
        return pem

    def _lost(self, what: str) -> DeviceKeyLost:
        return DeviceKeyLost(
            f"the device key {self.key_path} {what}; this gateway's identity cannot be used any more, "
            "re-enroll it with a new token from central ops (outpost-agent enroll --token FILE)"
        )
