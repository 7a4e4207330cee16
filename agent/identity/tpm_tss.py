"""The TPM 2.0 key store through tpm2-pytss: every operation, with every error said in a sentence.

``agent.identity.tpm.TpmKeyStore`` signs through ``tpm_esys`` in the steady
state and comes here to create the key, and whenever that path fails, to
retry, clean up or explain.

What is on disk (``key.tpm.json``, 0600) is the key's public area, its private
part as the TPM wrapped it (encrypted and integrity-protected under the
parent's key, useless without that very TPM), and how to find the parent
again. The parent is the owner hierarchy's standard ECC storage key, derived
afresh from its template on every use (the same owner seed always yields the
same key), or the persistent one at 0x81000001 when the TPM has one.

Every command runs in its own short ESAPI context and every transient object
(parent, loaded key) is flushed in ``finally``: without a resource manager a
TPM keeps a leaked object until reset, and three of them fill it. A process
killed mid-command (a watchdog, the OOM killer) flushes nothing, so a TPM
that answers "out of memory for objects" is emptied of leftovers once and the
command tried again.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from agent.errors import DeviceKeyLost, KeyStoreError
from agent.identity import tpm_objects as objects
from agent.identity.keystore import KeyStore
from agent.identity.tcti import Tcti, parse_tcti
from agent.identity.tpm_errors import (
    Kind,
    classify,
    device_key_lost,
    to_keystore_error,
    tpm_code,
    with_busy_retry,
)
from agent.identity.tss import (
    ESAPI,
    ESYS_TR,
    TPM2_CAP,
    TPM2_ECC,
    TPM2_RC,
    TPM2B_PRIVATE,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TCTILdr,
    TSS2_Exception,
)
from shared.fsutil import PRIVATE_FILE_MODE, atomic_write, ensure_private_dir, fsync_directory

log = logging.getLogger(__name__)

KEY_FILE = "key.tpm.json"
#: Written into the file so that a later format can be told apart.
KEY_FILE_FORMAT = "outpost-tpm-key/1"
#: A P-256 key file is under 1 KiB; anything far larger is not ours.
MAX_KEY_FILE = 16 * 1024
#: Persistent handles asked for when looking for 0x81000001: that one only.
_ONE_HANDLE = 1
#: Curves asked for in the probe; TPMs implement a handful at most.
_MAX_CURVES = 64
#: The first transient handle (TPM2_HT_TRANSIENT << 24): every loaded object's.
_TRANSIENT_FIRST = 0x80000000
#: Transient handles asked for when clearing leftovers; a TPM has a few slots, never this many.
_MAX_TRANSIENT = 64


@dataclass(frozen=True)
class _KeyFile:
    """The parsed, validated contents of key.tpm.json."""

    public: TPM2B_PUBLIC
    private: TPM2B_PRIVATE
    parent_kind: str  # "primary" (derived each time) or "persistent"
    parent_name: bytes
    parent_template: TPM2B_PUBLIC | None = None
    parent_handle: int | None = None


class TssKeyStore(KeyStore):
    """An ECDSA P-256 device key inside a TPM 2.0, reached through ``tcti``."""

    backend = "tpm"

    def __init__(self, state_dir: Path, tcti: str) -> None:
        self.state_dir = Path(state_dir)
        self.key_path = self.state_dir / KEY_FILE
        self.tcti = parse_tcti(tcti)
        # A TPM without a resource manager serves one command stream at a time.
        self._lock = threading.Lock()

    def exists(self) -> bool:
        return self.key_path.exists()

    def create(self) -> None:
        with self._lock:
            if self.exists():
                raise KeyStoreError(f"a device key already exists in {self.key_path}; refusing to replace it")
            document = self._tpm_call(self._create_once, "creating the device key")
            ensure_private_dir(self.state_dir)
            atomic_write(self.key_path, document, PRIVATE_FILE_MODE)
            log.info("created the device key in the TPM at %s", self.tcti)

    def public_key(self) -> ec.EllipticCurvePublicKey:
        stored = self._read()
        try:
            return objects.to_public_key(stored.public)
        except ValueError:
            raise device_key_lost() from None

    def sign(self, data: bytes) -> bytes:
        stored = self._read()
        digest = hashlib.sha256(data).digest()
        with self._lock:
            signature: bytes = self._tpm_call(lambda: self._sign_once(stored, digest), "signing")
            return signature

    def delete(self) -> None:
        with self._lock:
            try:
                self.key_path.unlink()
            except FileNotFoundError:
                return
            fsync_directory(self.state_dir)

    # -- one TPM conversation per operation --------------------------------

    def _tpm_call(self, operation, action: str):  # type: ignore[no-untyped-def]
        def attempt():  # type: ignore[no-untyped-def]
            try:
                return operation()
            except TSS2_Exception as error:
                if tpm_code(error) != int(TPM2_RC.OBJECT_MEMORY) or not self._flush_leftovers():
                    raise
                return operation()

        try:
            return with_busy_retry(attempt, lambda error: to_keystore_error(error, str(self.tcti), action))
        except TSS2_Exception as error:
            raise to_keystore_error(error, str(self.tcti), action) from None

    def _flush_leftovers(self) -> int:
        """Flush the transient objects in the TPM; how many there were.

        Called only when the TPM is full. Behind a resource manager the TPM
        shows each connection only its own objects (none, between our
        commands), so nothing is flushed and the answer stays "busy". Without
        one, a TPM serves one connection at a time (the kernel opens
        /dev/tpm0 once), so what is there was left by a process that died.
        """
        with self._esapi() as esapi:
            _, data = esapi.get_capability(TPM2_CAP.HANDLES, _TRANSIENT_FIRST, _MAX_TRANSIENT)
            handles = [int(handle) for handle in data.data.handles]
            for handle in handles:
                self._flush(esapi, esapi.tr_from_tpmpublic(handle))
        if handles:
            log.warning("the TPM at %s was full of %d objects left by an interrupted process; flushed them",
                        self.tcti, len(handles))
        return len(handles)

    @contextlib.contextmanager
    def _esapi(self) -> Iterator[ESAPI]:
        tcti = open_tcti(self.tcti)
        try:
            esapi = ESAPI(tcti)
            try:
                yield esapi
            finally:
                esapi.close()
        finally:
            tcti.close()

    def _flush(self, esapi: ESAPI, handle: ESYS_TR) -> None:
        try:
            esapi.flush_context(handle)
        except TSS2_Exception as error:
            # Raising here would hide the error that got us here; the log says what leaked.
            log.warning("could not flush a transient TPM object (%s); it stays until the TPM is reset", error)

    def _create_once(self) -> bytes:
        with self._esapi() as esapi:
            parent, parent_public, persistent = self._parent_for_create(esapi)
            try:
                private, public, _, _, _ = esapi.create(
                    parent, TPM2B_SENSITIVE_CREATE(), objects.device_key_template()
                )
            finally:
                if not persistent:
                    self._flush(esapi, parent)
        if not objects.is_device_key(public):
            raise KeyStoreError(f"the TPM at {self.tcti} made a key other than the one asked for; it cannot be used")
        parent_entry: dict[str, str] = {"name": objects.name_of(parent_public).hex()}
        if persistent:
            parent_entry.update(kind="persistent", handle=f"0x{objects.PERSISTENT_SRK_HANDLE:08x}")
        else:
            parent_entry.update(
                kind="primary",
                hierarchy="owner",
                template_name=objects.SRK_TEMPLATE_NAME,
                template=_b64(objects.srk_template().marshal()),
            )
        document = {
            "format": KEY_FILE_FORMAT,
            "public": _b64(public.marshal()),
            "private": _b64(private.marshal()),
            "parent": parent_entry,
        }
        return (json.dumps(document, indent=2, sort_keys=True) + "\n").encode()

    def _parent_for_create(self, esapi: ESAPI) -> tuple[ESYS_TR, TPM2B_PUBLIC, bool]:
        """The parent for a new key: the persistent SRK if usable, else the derived one."""
        if _has_persistent_srk(esapi):
            handle = esapi.tr_from_tpmpublic(objects.PERSISTENT_SRK_HANDLE)
            public, _, _ = esapi.read_public(handle)
            if objects.is_storage_parent(public):
                return handle, public, True
            log.info("the object at 0x%08x is not a storage key; deriving the standard one", objects.PERSISTENT_SRK_HANDLE)
        handle, public, _, _, _ = esapi.create_primary(TPM2B_SENSITIVE_CREATE(), objects.srk_template(), ESYS_TR.OWNER)
        return handle, public, False

    def _sign_once(self, stored: _KeyFile, digest: bytes) -> bytes:
        with self._esapi() as esapi:
            key = self._load(esapi, stored)
            try:
                signature = esapi.sign(
                    key, objects.digest(digest), objects.ecdsa_sha256_scheme(), objects.null_hashcheck()
                )
            finally:
                self._flush(esapi, key)
        return objects.to_der_signature(signature)

    def _load(self, esapi: ESAPI, stored: _KeyFile) -> ESYS_TR:
        """Load the device key; DeviceKeyLost when this TPM cannot have made it."""
        if stored.parent_kind == "persistent":
            if not _has_persistent_srk(esapi):
                raise device_key_lost()
            parent = esapi.tr_from_tpmpublic(objects.PERSISTENT_SRK_HANDLE)
            parent_public, _, _ = esapi.read_public(parent)
            transient = False
        else:
            assert stored.parent_template is not None
            parent, parent_public, _, _, _ = esapi.create_primary(
                TPM2B_SENSITIVE_CREATE(), stored.parent_template, ESYS_TR.OWNER
            )
            transient = True
        try:
            # A different parent name means a different owner seed: the TPM was
            # cleared or swapped. Saying so beats an opaque integrity error.
            if objects.name_of(parent_public) != stored.parent_name:
                raise device_key_lost()
            try:
                return esapi.load(parent, stored.private, stored.public)
            except TSS2_Exception as error:
                if classify(error) is Kind.LOAD_REFUSED:
                    raise device_key_lost() from None
                raise
        finally:
            if transient:
                self._flush(esapi, parent)

    # -- the key file -----------------------------------------------------

    def _read(self) -> _KeyFile:
        try:
            with open(self.key_path, "rb") as handle:
                raw = handle.read(MAX_KEY_FILE + 1)
        except FileNotFoundError:
            raise DeviceKeyLost(
                f"device key lost: {self.key_path} is missing; re-enroll with a new token"
            ) from None
        except OSError as error:
            raise KeyStoreError(f"cannot read {self.key_path} ({error.strerror or error}); check its owner and mode") from None
        if len(raw) > MAX_KEY_FILE:
            raise device_key_lost()
        try:
            return _parse_key_file(raw)
        except (ValueError, KeyError, TypeError, binascii.Error):
            raise device_key_lost() from None


def _parse_key_file(raw: bytes) -> _KeyFile:
    """Every field checked; ValueError/KeyError/TypeError on anything unexpected."""
    document = json.loads(raw.decode("utf-8"))
    if not isinstance(document, dict) or document.get("format") != KEY_FILE_FORMAT:
        raise ValueError("unknown key file format")
    public = objects.unmarshal_public(_unb64(document["public"]))
    private = objects.unmarshal_private(_unb64(document["private"]))
    if not objects.is_device_key(public):
        raise ValueError("the public area is not a device key")
    parent = document["parent"]
    if not isinstance(parent, dict):
        raise ValueError("parent is not an object")
    name = bytes.fromhex(parent["name"])
    if parent["kind"] == "primary":
        if parent.get("hierarchy") != "owner":
            raise ValueError("unsupported hierarchy")
        template = objects.unmarshal_public(_unb64(parent["template"]))
        if not objects.is_storage_parent(template):
            raise ValueError("the parent template is not a storage key")
        return _KeyFile(public, private, "primary", name, parent_template=template)
    if parent["kind"] == "persistent":
        if int(parent["handle"], 16) != objects.PERSISTENT_SRK_HANDLE:
            raise ValueError("unsupported persistent parent")
        return _KeyFile(public, private, "persistent", name, parent_handle=objects.PERSISTENT_SRK_HANDLE)
    raise ValueError("unknown parent kind")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: object) -> bytes:
    if not isinstance(text, str):
        raise TypeError("expected base64 text")
    return base64.b64decode(text.encode("ascii"), validate=True)


def _has_persistent_srk(esapi: ESAPI) -> bool:
    # GetCapability instead of trying the handle: a missing handle makes the
    # TSS log an error line on every start.
    _, data = esapi.get_capability(TPM2_CAP.HANDLES, objects.PERSISTENT_SRK_HANDLE, _ONE_HANDLE)
    return objects.PERSISTENT_SRK_HANDLE in [int(h) for h in data.data.handles]


def open_tcti(tcti: Tcti) -> TCTILdr:
    """Open the transport to the TPM, or KeyStoreError saying why not and what to do."""
    transport, reason = _try_open(tcti)
    if transport is None:
        raise KeyStoreError(f'{reason}; set keystore.backend = "software" or fix keystore.tcti')
    return transport


def _try_open(tcti: Tcti) -> tuple[TCTILdr | None, str]:
    if tcti.device is not None and not os.path.exists(tcti.device):
        return None, f"no TPM found at {tcti}"
    try:
        return TCTILdr(tcti.name, tcti.conf), ""
    except TSS2_Exception:
        pass
    if tcti.device is None:
        return None, f"no TPM found at {tcti}"
    # The node exists but would not open: permissions, or (on /dev/tpm0, which
    # has no resource manager) another program holding the TPM.
    if not os.access(tcti.device, os.R_OK | os.W_OK):
        return None, f"the agent may not open the TPM at {tcti} (add its user to the device's group, on Debian tss)"
    return None, f"the TPM at {tcti} is in use by another program (device:/dev/tpmrm0 shares it)"


def unusable_reason(tcti_text: str) -> str | None:
    """Why the TPM at ``tcti_text`` cannot hold the device key, or None when it can.

    Quick: a device-node check, then one TPM2_GetCapability.
    """
    tcti = parse_tcti(tcti_text)
    transport, reason = _try_open(tcti)
    if transport is None:
        return reason
    try:
        esapi = ESAPI(transport)
        try:
            _, data = esapi.get_capability(TPM2_CAP.ECC_CURVES, 0, _MAX_CURVES)
        finally:
            esapi.close()
    except TSS2_Exception as error:
        return f"the TPM at {tcti} does not answer ({error})"
    finally:
        transport.close()
    if int(TPM2_ECC.NIST_P256) not in [int(curve) for curve in data.data.eccCurves]:
        return f"the TPM at {tcti} does not support ECC P-256"
    return None
