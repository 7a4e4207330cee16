"""Signing with a PEM key and checking a certificate's signature through the libcrypto the process already holds.

On Debian 12's cryptography (38) the first private or public key operation
imports its OpenSSL backend: the cffi binding's whole table of functions, a
module for every algorithm, the legacy provider and PKCS#12, SSH and PKCS#7
serialization, about 2 MiB that an agent would keep for its whole life for
one ECDSA signature per tunnel start and one certificate check per
connection (README, "Performance"). The ``ssl`` module has already mapped
libcrypto, so doing those two there costs ``ctypes`` (0.4 MiB) and a few
calls. Creating keys, CSRs and certificates stays with cryptography.

Everything here raises ``Unavailable`` where the library or a function is
missing (OpenSSL before 3.0); callers then use cryptography instead.
"""

from __future__ import annotations

import ctypes
from typing import Any

#: The libcrypto that Python's ``ssl`` module links on Debian 12 (OpenSSL 3.0): already in the process.
LIBCRYPTO = "libcrypto.so.3"
#: OpenSSL's NID of an EC key (NID_X9_62_id_ecPublicKey): what EVP_PKEY_get_base_id returns for one.
EVP_PKEY_EC = 408
#: The curve name OpenSSL gives P-256.
P256 = b"prime256v1"
#: A curve name is a few bytes; room for the longest OpenSSL knows.
GROUP_NAME_SIZE = 80
#: A DER ECDSA P-256 signature is at most 72 bytes; EVP_DigestSign says how long it is.
MAX_SIGNATURE = 80

_PASSWORD_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p)


def _no_password(_buf: Any, _size: int, _rwflag: int, _userdata: Any) -> int:
    """An encrypted key is not ours: refuse instead of OpenSSL's default, which asks the terminal."""
    return -1


_NO_PASSWORD = _PASSWORD_CALLBACK(_no_password)
_library: Any = None


class Unavailable(Exception):
    """This process's libcrypto cannot sign here (missing, or older than OpenSSL 3.0)."""


class NotDeviceKey(Exception):
    """The PEM is not an unencrypted ECDSA P-256 private key; the sentence says which."""


def _lib() -> Any:
    global _library
    if _library is not None:
        return _library
    try:
        lib = ctypes.CDLL(LIBCRYPTO)
        signatures: dict[str, tuple[Any, list[Any]]] = {
            "BIO_new_mem_buf": (ctypes.c_void_p, [ctypes.c_char_p, ctypes.c_int]),
            "BIO_free": (ctypes.c_int, [ctypes.c_void_p]),
            "PEM_read_bio_PrivateKey": (ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_void_p, _PASSWORD_CALLBACK,
                                                          ctypes.c_void_p]),
            "EVP_PKEY_get_base_id": (ctypes.c_int, [ctypes.c_void_p]),
            "EVP_PKEY_get_group_name": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t,
                                                       ctypes.POINTER(ctypes.c_size_t)]),
            "EVP_PKEY_free": (None, [ctypes.c_void_p]),
            "EVP_MD_CTX_new": (ctypes.c_void_p, []),
            "EVP_MD_CTX_free": (None, [ctypes.c_void_p]),
            "EVP_sha256": (ctypes.c_void_p, []),
            "EVP_DigestSignInit": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                                  ctypes.c_void_p]),
            "EVP_DigestSign": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_size_t),
                                              ctypes.c_char_p, ctypes.c_size_t]),
            "ERR_clear_error": (None, []),
            "d2i_X509": (ctypes.c_void_p, [ctypes.c_void_p, ctypes.POINTER(ctypes.c_char_p), ctypes.c_long]),
            "X509_get0_pubkey": (ctypes.c_void_p, [ctypes.c_void_p]),
            "X509_verify": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_void_p]),
            "X509_free": (None, [ctypes.c_void_p]),
            "d2i_PUBKEY": (ctypes.c_void_p, [ctypes.c_void_p, ctypes.POINTER(ctypes.c_char_p), ctypes.c_long]),
            "i2d_PUBKEY": (ctypes.c_int, [ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)]),
            "EVP_DigestVerifyInit": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                                    ctypes.c_void_p]),
            "EVP_DigestVerify": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p,
                                                ctypes.c_size_t]),
        }
        for name, (restype, argtypes) in signatures.items():
            function = getattr(lib, name)
            function.restype = restype
            function.argtypes = argtypes
    except (OSError, AttributeError) as error:
        raise Unavailable(f"{LIBCRYPTO}: {error}") from None
    _library = lib
    return lib


#: DER SubjectPublicKeyInfo of a P-256 key up to its point: SEQUENCE, the id-ecPublicKey and prime256v1
#: OIDs, and the BIT STRING's header; the uncompressed point (0x04, x, y) follows.
P256_SPKI_PREFIX = bytes.fromhex("3059301306072a8648ce3d020106082a8648ce3d030107034200")


def p256_spki(point: bytes) -> bytes:
    """The SubjectPublicKeyInfo of the uncompressed P-256 ``point``; ValueError when it is not on the curve."""
    lib = _lib()
    spki = P256_SPKI_PREFIX + point
    cursor = ctypes.c_char_p(spki)
    key = lib.d2i_PUBKEY(None, ctypes.byref(cursor), len(spki))
    lib.ERR_clear_error()
    if not key:
        raise ValueError("not a point on P-256")
    lib.EVP_PKEY_free(key)
    return spki


def _spki(lib: Any, key: int) -> bytes:
    """DER SubjectPublicKeyInfo of the EVP_PKEY ``key``."""
    size = lib.i2d_PUBKEY(key, None)
    if size <= 0:
        lib.ERR_clear_error()
        raise ValueError("libcrypto cannot encode the public key")
    buffer = ctypes.create_string_buffer(size)
    cursor = ctypes.c_void_p(ctypes.addressof(buffer))
    lib.i2d_PUBKEY(key, ctypes.byref(cursor))
    return buffer.raw


def _verifies(lib: Any, key: int, signature: bytes, data: bytes) -> bool:
    """Whether ``signature`` is a valid ECDSA-SHA256 signature of ``data`` by the EVP_PKEY ``key``."""
    context = lib.EVP_MD_CTX_new()
    if not context:
        raise MemoryError("libcrypto could not start a signature check")
    try:
        return bool(lib.EVP_DigestVerifyInit(context, None, lib.EVP_sha256(), None, key) == 1
                    and lib.EVP_DigestVerify(context, signature, len(signature), data, len(data)) == 1)
    finally:
        lib.ERR_clear_error()
        lib.EVP_MD_CTX_free(context)


class PemKey:
    """An ECDSA P-256 private key held by libcrypto; freed with the object."""

    def __init__(self, handle: int) -> None:
        self._handle = handle

    @classmethod
    def load(cls, pem: bytes) -> PemKey:
        """Raises Unavailable (sign with cryptography instead) or NotDeviceKey."""
        lib = _lib()
        bio = lib.BIO_new_mem_buf(pem, len(pem))
        if not bio:
            lib.ERR_clear_error()
            raise MemoryError("libcrypto could not hold the key file")
        try:
            handle = lib.PEM_read_bio_PrivateKey(bio, None, _NO_PASSWORD, None)
        finally:
            lib.BIO_free(bio)
        # A refused PEM leaves its reasons in this thread's error queue, where the next ssl call would find them.
        lib.ERR_clear_error()
        if not handle:
            raise NotDeviceKey("is corrupt")
        key = cls(handle)
        name = ctypes.create_string_buffer(GROUP_NAME_SIZE)
        length = ctypes.c_size_t(0)
        if (lib.EVP_PKEY_get_base_id(handle) != EVP_PKEY_EC
                or lib.EVP_PKEY_get_group_name(handle, name, GROUP_NAME_SIZE, ctypes.byref(length)) != 1
                or name.value != P256):
            lib.ERR_clear_error()
            raise NotDeviceKey("is not an ECDSA P-256 key")
        return key

    def sign(self, data: bytes) -> bytes:
        """A DER ECDSA signature of SHA-256(data), as cryptography's ``sign(data, ECDSA(SHA256()))`` makes."""
        lib = _lib()
        context = lib.EVP_MD_CTX_new()
        if not context:
            raise MemoryError("libcrypto could not start a signature")
        try:
            signature = ctypes.create_string_buffer(MAX_SIGNATURE)
            length = ctypes.c_size_t(MAX_SIGNATURE)
            if (lib.EVP_DigestSignInit(context, None, lib.EVP_sha256(), None, self._handle) != 1
                    or lib.EVP_DigestSign(context, signature, ctypes.byref(length), data, len(data)) != 1):
                lib.ERR_clear_error()
                raise RuntimeError("libcrypto refused to sign with the device key")
            return signature.raw[:length.value]
        finally:
            lib.EVP_MD_CTX_free(context)

    def spki(self) -> bytes:
        """The public half as DER SubjectPublicKeyInfo."""
        return _spki(_lib(), self._handle)

    def __del__(self) -> None:
        if self._handle and _library is not None:
            _library.EVP_PKEY_free(self._handle)
            self._handle = 0


class Certificate:
    """A DER certificate held by libcrypto, to check others' signatures with its EC key; freed with the object."""

    def __init__(self, der: bytes) -> None:
        """Raises Unavailable, or ValueError for DER that libcrypto cannot read."""
        lib = _lib()
        cursor = ctypes.c_char_p(der)
        self._handle = lib.d2i_X509(None, ctypes.byref(cursor), len(der))
        lib.ERR_clear_error()
        if not self._handle:
            raise ValueError("libcrypto cannot read the certificate")
        key = lib.X509_get0_pubkey(self._handle)
        #: Whether the certificate's key is an EC key, the only kind Outpost's CAs have.
        self.has_ec_key = bool(key) and lib.EVP_PKEY_get_base_id(key) == EVP_PKEY_EC
        lib.ERR_clear_error()

    def spki(self) -> bytes:
        """The certificate's public key as DER SubjectPublicKeyInfo."""
        return _spki(_lib(), _lib().X509_get0_pubkey(self._handle))

    def verifies(self, signature: bytes, data: bytes) -> bool:
        """Whether ``signature`` is this certificate's key's ECDSA-SHA256 signature of ``data``."""
        return self.has_ec_key and _verifies(_lib(), _lib().X509_get0_pubkey(self._handle), signature, data)

    def __del__(self) -> None:
        if getattr(self, "_handle", None) and _library is not None:
            _library.X509_free(self._handle)
            self._handle = None
