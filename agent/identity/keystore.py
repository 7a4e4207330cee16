"""The device key store: where the agent's private key lives.

Every place that signs (the enrollment CSR, tunnel authentication, renewal)
goes through ``KeyStore.sign``. No code path asks a backend for private key
bytes: the TPM backend could not give them, and the software backend must not
need to.
"""

from __future__ import annotations

import abc
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec


class KeyStore(abc.ABC):
    """An ECDSA P-256 device key held by one backend."""

    #: Short name shown in ``outpost-agent status`` ("software", "tpm").
    backend: str = ""

    @abc.abstractmethod
    def exists(self) -> bool:
        """True when a key has been created and its stored parts are present."""

    @abc.abstractmethod
    def create(self) -> None:
        """Create a new key and store it durably; replaces nothing that exists.

        Raises KeyStoreError if a key already exists.
        """

    @abc.abstractmethod
    def public_key(self) -> ec.EllipticCurvePublicKey:
        """The public half (raises DeviceKeyLost when the key is gone)."""

    @abc.abstractmethod
    def sign(self, data: bytes) -> bytes:
        """A DER-encoded ECDSA-with-SHA256 signature over ``data``."""

    @abc.abstractmethod
    def delete(self) -> None:
        """Remove the stored key (used when an enrollment is abandoned)."""

    def close(self) -> None:  # noqa: B027  (optional: most backends hold nothing to release)
        """Release backend resources (TPM context); the default holds none."""

    def signing_key(self) -> ec.EllipticCurvePrivateKey:
        """An object that cryptography's X.509 builders accept as a private key.

        Its ``sign`` runs in this key store, so a CSR can be built with the
        standard builder without the private key ever leaving the backend.
        """
        return _DelegatingPrivateKey(self)


class _P256:
    """What a device key's objects say of their curve: the key store holds P-256 keys only."""

    @property
    def curve(self) -> ec.EllipticCurve:
        return ec.SECP256R1()

    @property
    def key_size(self) -> int:
        return 256


class _DelegatingPrivateKey(_P256, ec.EllipticCurvePrivateKey):
    """Adapter: an EllipticCurvePrivateKey whose operations call a KeyStore."""

    def __init__(self, store: KeyStore) -> None:
        self._store = store

    def sign(self, data: bytes | bytearray | memoryview, signature_algorithm: ec.EllipticCurveSignatureAlgorithm) -> bytes:
        algorithm = getattr(signature_algorithm, "algorithm", None)
        if not isinstance(algorithm, hashes.SHA256):
            raise ValueError("the device key signs with ECDSA-SHA256 only")
        return self._store.sign(bytes(data))

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._store.public_key()

    # The rest of the interface cannot be offered without key bytes.
    def exchange(self, algorithm: ec.ECDH, peer_public_key: ec.EllipticCurvePublicKey) -> bytes:
        raise NotImplementedError("the device key does not do key exchange")

    def private_numbers(self) -> ec.EllipticCurvePrivateNumbers:
        raise NotImplementedError("the device key never leaves its key store")

    def private_bytes(self, *args: Any, **kwargs: Any) -> bytes:
        raise NotImplementedError("the device key never leaves its key store")

    # cryptography 50 copies key objects it is handed.
    def __copy__(self) -> _DelegatingPrivateKey:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> _DelegatingPrivateKey:
        return self


#: DER SubjectPublicKeyInfo of a P-256 key: a fixed 26-byte header, then the uncompressed point.
P256_SPKI_HEADER = 26
#: The uncompressed point: 0x04, then x and y of 32 bytes each.
P256_COORDINATE = 32


class SpkiPublicKey(_P256, ec.EllipticCurvePublicKey):
    """The device key's public half as its SubjectPublicKeyInfo, enough for a CSR and for comparing keys.

    cryptography's own key object would load its OpenSSL backend on Debian's
    cryptography 38 (2 MiB) at every renewal; what needs more than the bytes
    (``verify``, other encodings) gets cryptography's object then.
    """

    def __init__(self, spki: bytes) -> None:
        self._spki = spki

    def public_bytes(self, encoding: serialization.Encoding, format: serialization.PublicFormat) -> bytes:
        if encoding is serialization.Encoding.DER and format is serialization.PublicFormat.SubjectPublicKeyInfo:
            return self._spki
        return self._full().public_bytes(encoding, format)

    def public_numbers(self) -> ec.EllipticCurvePublicNumbers:
        point = self._spki[P256_SPKI_HEADER + 1:]
        return ec.EllipticCurvePublicNumbers(int.from_bytes(point[:P256_COORDINATE], "big"),
                                             int.from_bytes(point[P256_COORDINATE:], "big"), ec.SECP256R1())

    def verify(self, signature: bytes | bytearray | memoryview, data: bytes | bytearray | memoryview,
               signature_algorithm: ec.EllipticCurveSignatureAlgorithm) -> None:
        self._full().verify(signature, data, signature_algorithm)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ec.EllipticCurvePublicKey):
            return NotImplemented
        return self._spki == other.public_bytes(serialization.Encoding.DER,
                                                serialization.PublicFormat.SubjectPublicKeyInfo)

    def __hash__(self) -> int:
        return hash(self._spki)

    # cryptography 50 copies key objects it is handed.
    def __copy__(self) -> SpkiPublicKey:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> SpkiPublicKey:
        return self

    def _full(self) -> ec.EllipticCurvePublicKey:
        key = serialization.load_der_public_key(self._spki)
        assert isinstance(key, ec.EllipticCurvePublicKey)
        return key
