"""The TPM 2.0 key store: the device key is created in the TPM and never leaves it.

What is on disk (``key.tpm.json``, 0600) is the key's public area, its private
part as the TPM wrapped it (encrypted and integrity-protected under the
parent's key, useless without that very TPM), and how to find the parent
again: the owner hierarchy's standard ECC storage key, derived afresh from
its template on every use, or the persistent one at 0x81000001.

A running agent only signs, once per tunnel start. That signature goes
through ``tpm_esys`` (the ESAPI library itself, through ctypes) without
loading tpm2-pytss, whose binding brings about 5 MiB of libraries an idle
agent never uses. Everything else (creating the key, a persistent parent,
and any failure of that path, which is then retried once) goes through
``tpm_tss`` on tpm2-pytss, which retries a busy TPM, flushes objects left by
a killed process and says in one sentence what went wrong.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import importlib.util
import json
import logging
import struct
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.asymmetric import ec, utils

from agent.identity import tpm_esys
from agent.identity.keystore import KeyStore, SpkiPublicKey
from agent.identity.tcti import Tcti, parse_tcti
from shared import libcrypto

if TYPE_CHECKING:
    from agent.identity.tpm_tss import TssKeyStore

log = logging.getLogger(__name__)

# The backend needs tpm2-pytss to create a key and explain failures, and the TSS
# libraries to sign: without either, select.py treats the TPM as not there.
if importlib.util.find_spec("tpm2_pytss") is None:
    raise ImportError("tpm2-pytss is not installed")
tpm_esys.libraries()

KEY_FILE = "key.tpm.json"
#: Written into the file so that a later format can be told apart (tpm_tss writes it).
KEY_FILE_FORMAT = "outpost-tpm-key/1"
#: A P-256 key file is under 1 KiB; anything far larger is not ours (tpm_tss says so).
MAX_KEY_FILE = 16 * 1024
#: The marshalled public area of a device key made from tpm_objects.device_key_template,
#: up to the point's coordinates: TPM2B size 90, ECC, SHA-256 name, the attributes
#: (fixedTPM, fixedParent, sensitiveDataOrigin, userWithAuth, noDA, sign), no policy,
#: no symmetric, ECDSA with SHA-256, NIST P-256, no KDF. tpm_tss checks the same fields.
DEVICE_PUBLIC_PREFIX = bytes.fromhex("0058" "0023" "000b" "00040472" "0000" "0010" "0018" "000b" "0003" "0010")
#: Bytes in a P-256 coordinate.
P256_COORDINATE_BYTES = 32


class TpmKeyStore(KeyStore):
    """An ECDSA P-256 device key inside a TPM 2.0, reached through ``tcti``."""

    backend = "tpm"

    def __init__(self, state_dir: Path, tcti: str) -> None:
        self.state_dir = Path(state_dir)
        self.key_path = self.state_dir / KEY_FILE
        self.tcti: Tcti = parse_tcti(tcti)
        self._tcti_text = tcti
        # A TPM without a resource manager serves one command stream at a time.
        self._lock = threading.Lock()
        self._tss: TssKeyStore | None = None

    def _full(self) -> TssKeyStore:
        """The tpm2-pytss key store, imported on first need and kept."""
        if self._tss is None:
            from agent.identity.tpm_tss import TssKeyStore

            self._tss = TssKeyStore(self.state_dir, self._tcti_text)
            self._tss._lock = self._lock  # one command stream to the TPM, whichever path
        return self._tss

    def exists(self) -> bool:
        return self.key_path.exists()

    def create(self) -> None:
        self._full().create()

    def delete(self) -> None:
        self._full().delete()

    def public_key(self) -> ec.EllipticCurvePublicKey:
        stored = self._lean_key_file()
        if stored is None:
            return self._full().public_key()
        return _point(stored["public"])

    def sign(self, data: bytes) -> bytes:
        stored = self._lean_key_file()
        if stored is not None:
            digest = hashlib.sha256(data).digest()
            try:
                with self._lock:
                    r, s = _sign_lean(self.tcti, stored, digest)
                return utils.encode_dss_signature(r, s)
            except _OtherParent:
                from agent.identity.tpm_errors import device_key_lost

                raise device_key_lost() from None
            except tpm_esys.EsysError as error:
                self._raise_final(error)
                log.debug("signing through the ESAPI failed (%s); trying again through tpm2-pytss", error)
            except OSError as error:
                log.debug("signing through the ESAPI failed (%s); trying again through tpm2-pytss", error)
        # Retried, and explained if it fails again, by the full store.
        return self._full().sign(data)

    def _raise_final(self, error: tpm_esys.EsysError) -> None:
        """Raise what the full store would for an answer that asking again cannot change.

        A refused authorization is never asked again (on a DA-protected parent
        each try counts toward lockout), nor is a lockout; a key the TPM
        refuses to load is a lost identity. Anything else returns.
        """
        if not error.rc:
            return
        from agent.identity.tpm_errors import Kind, classify, device_key_lost, to_keystore_error
        from agent.identity.tss import TSS2_Exception

        answer = TSS2_Exception(error.rc)
        kind = classify(answer)
        if kind is Kind.LOAD_REFUSED and error.what == tpm_esys.LOAD:
            raise device_key_lost() from None
        if kind in (Kind.AUTH, Kind.LOCKOUT):
            raise to_keystore_error(answer, str(self.tcti), "signing") from None

    def _lean_key_file(self) -> dict[str, bytes] | None:
        """The key file's blobs when it is one the lean path can serve, else None.

        None for anything unusual (missing, unreadable, too large, malformed,
        a persistent parent, a public area that is not exactly a device key):
        the full store reads it again and says what is wrong.
        """
        try:
            with open(self.key_path, "rb") as handle:
                raw = handle.read(MAX_KEY_FILE + 1)
            if len(raw) > MAX_KEY_FILE:
                return None
            document = json.loads(raw.decode("utf-8"))
            parent = document["parent"]
            if document.get("format") != KEY_FILE_FORMAT or parent["kind"] != "primary":
                return None
            if parent.get("hierarchy") != "owner":
                return None
            stored = {
                "public": _unb64(document["public"]),
                "private": _unb64(document["private"]),
                "template": _unb64(parent["template"]),
                "name": bytes.fromhex(parent["name"]),
            }
        except (OSError, ValueError, KeyError, TypeError, AttributeError, binascii.Error):
            return None
        if not _is_device_public(stored["public"]):
            return None
        return stored


class _OtherParent(Exception):
    """The owner seed derives another parent than the device key's: the TPM was cleared or swapped."""


def _sign_lean(tcti: Tcti, stored: dict[str, bytes], digest: bytes) -> tuple[int, int]:
    """ECDSA (r, s) over ``digest`` by the stored key, every object flushed; EsysError on anything amiss."""
    with tpm_esys.connect(tcti.name, tcti.conf) as esys:
        parent, parent_public = esys.create_primary_owner(stored["template"])
        try:
            # Another parent name means a cleared or swapped TPM: the full store says so.
            if tpm_esys.name_of(parent_public) != stored["name"]:
                raise _OtherParent()
            key = esys.load(parent, stored["private"], stored["public"])
        finally:
            esys.flush(parent)
        try:
            return esys.sign_ecdsa_sha256(key, digest)
        finally:
            esys.flush(key)


def _is_device_public(public: bytes) -> bool:
    """True when ``public`` is a marshalled TPM2B_PUBLIC of exactly the device key template."""
    coordinates = public[len(DEVICE_PUBLIC_PREFIX):]
    size = struct.pack(">H", P256_COORDINATE_BYTES)
    return (
        public.startswith(DEVICE_PUBLIC_PREFIX)
        and len(coordinates) == 2 * (2 + P256_COORDINATE_BYTES)
        and coordinates.startswith(size)
        and coordinates[2 + P256_COORDINATE_BYTES:].startswith(size)
    )


def _point(public: bytes) -> ec.EllipticCurvePublicKey:
    coordinates = public[len(DEVICE_PUBLIC_PREFIX):]
    x = int.from_bytes(coordinates[2:2 + P256_COORDINATE_BYTES], "big")
    y = int.from_bytes(coordinates[4 + P256_COORDINATE_BYTES:], "big")
    try:
        # Through libcrypto where it can: cryptography's key object would load its OpenSSL backend (2 MiB on
        # Debian's cryptography 38) at the first renewal, for the rest of the agent's life.
        try:
            point = b"\x04" + x.to_bytes(P256_COORDINATE_BYTES, "big") + y.to_bytes(P256_COORDINATE_BYTES, "big")
            return SpkiPublicKey(libcrypto.p256_spki(point))
        except (libcrypto.Unavailable, OverflowError):
            return ec.EllipticCurvePublicNumbers(x, y, ec.SECP256R1()).public_key()
    except ValueError:
        from agent.identity.tpm_errors import device_key_lost

        raise device_key_lost() from None


def _unb64(text: object) -> bytes:
    if not isinstance(text, str):
        raise TypeError("expected base64 text")
    return base64.b64decode(text.encode("ascii"), validate=True)


def unusable_reason(tcti_text: str) -> str | None:
    """Why the TPM at ``tcti_text`` cannot hold the device key, or None when it can.

    Quick: one TPM2_GetCapability. Asked through the ESAPI directly, so that an
    agent starting with a TPM key does not load tpm2-pytss for it; a TPM that
    does not answer is asked again through tpm2-pytss, which says why.
    """
    tcti = parse_tcti(tcti_text)
    if tcti.device is None or Path(tcti.device).exists():
        try:
            with tpm_esys.connect(tcti.name, tcti.conf) as esys:
                curves = esys.ecc_curves()
        except (tpm_esys.EsysError, OSError):
            pass
        else:
            if tpm_esys.TPM2_ECC_NIST_P256 in curves:
                return None
            return f"the TPM at {tcti} does not support ECC P-256"
    from agent.identity import tpm_tss

    return tpm_tss.unusable_reason(tcti_text)
