"""The device key's steady-state TPM commands, straight through libtss2-esys.

An agent signs with its TPM key at every tunnel start and otherwise sits idle.
tpm2-pytss serves that signature by loading its whole binding, which on Debian
12 is linked against the FAPI library and through it libcurl with GnuTLS,
Kerberos, LDAP and SSH: about 5 MiB of an idle agent's memory, for three TPM
commands. This module reaches the same ESAPI functions of the same system
libraries (libtss2-esys, -tctildr and -mu, which tpm2-pytss needs anyway)
through ctypes, and nothing else.

Structures never get a Python layout here: they travel as the TPM's own
marshalled bytes and the TSS's MU functions turn them into its C structures
and back, so a layout difference between TSS versions cannot misplace a
field. Anything that goes wrong raises :class:`EsysError`; the key store then
runs the same operation through tpm2-pytss, which says what happened in a
sentence (this module never guesses at meanings of return codes).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

#: ESYS_TR values of the ESAPI (tss2_esys.h).
ESYS_TR_PASSWORD = 0x0FF
ESYS_TR_NONE = 0xFFF
ESYS_TR_RH_OWNER = 0x101
#: TPM 2.0 constants (TPM 2.0 Part 2) used in the marshalled inputs below.
TPM2_ALG_SHA256 = 0x000B
TPM2_ALG_ECDSA = 0x0018
TPM2_ST_HASHCHECK = 0x8024
TPM2_RH_NULL = 0x40000007
TPM2_CAP_ECC_CURVES = 0x00000008
TPM2_ECC_NIST_P256 = 0x0003
#: Room for any unmarshalled input structure: the largest used, TPM2B_PRIVATE,
#: is 1,552 bytes in tpm2-tss 3.x and 4.x; MU writes no more than its size.
STRUCT_ROOM = 4096
#: Room for a marshalled output (a TPMS_CAPABILITY_DATA is at most 1,032 bytes).
MARSHAL_ROOM = 4096
#: Curves asked for; TPMs implement a handful at most.
MAX_CURVES = 64
#: The sonames of tpm2-tss 2.x to 4.x (Debian 12: 3.2); the ABI of these calls has not changed.
#: TSS2_LOG value that turns every TSS log module off (the same as tss.py's).
TSS_LOG_SILENT = "all+NONE"
LIBRARIES = {"esys": "libtss2-esys.so.0", "tctildr": "libtss2-tctildr.so.0", "mu": "libtss2-mu.so.0"}


#: What a failed TPM2_Load says it was (a refused blob is a lost key).
LOAD = "TPM2_Load"


class EsysError(Exception):
    """A TSS call failed (its return code is in ``rc``), or returned something unexpected."""

    def __init__(self, what: str, rc: int = 0) -> None:
        super().__init__(f"{what} failed (TSS return code 0x{rc:x})" if rc else what)
        #: The call that failed, e.g. "TPM2_Load".
        self.what = what
        self.rc = rc


_libraries: dict[str, Any] | None = None


def libraries() -> dict[str, Any]:
    """The three TSS libraries, loaded once; OSError when they are not installed."""
    global _libraries
    if _libraries is None:
        # As tss.py does for tpm2-pytss: the agent says what failed in one sentence,
        # TSS2_LOG=all+debug still brings the TSS's own lines back.
        os.environ.setdefault("TSS2_LOG", TSS_LOG_SILENT)
        _libraries = {name: ctypes.CDLL(soname) for name, soname in LIBRARIES.items()}
    return _libraries


def _check(rc: int, what: str) -> None:
    if rc:
        raise EsysError(what, rc)


def _unmarshal(kind: str, blob: bytes) -> ctypes.Array[ctypes.c_char]:
    """The C structure ``kind`` (a TSS type name) of exactly the marshalled ``blob``."""
    dest = ctypes.create_string_buffer(STRUCT_ROOM)
    offset = ctypes.c_size_t(0)
    _check(getattr(libraries()["mu"], f"Tss2_MU_{kind}_Unmarshal")(
        blob, ctypes.c_size_t(len(blob)), ctypes.byref(offset), dest), f"unmarshalling a {kind}")
    if offset.value != len(blob):
        raise EsysError(f"a {kind} with {len(blob) - offset.value} trailing bytes")
    return dest


def _marshal(kind: str, pointer: ctypes.c_void_p) -> bytes:
    """The marshalled bytes of the C structure ``kind`` at ``pointer``."""
    out = ctypes.create_string_buffer(MARSHAL_ROOM)
    offset = ctypes.c_size_t(0)
    _check(getattr(libraries()["mu"], f"Tss2_MU_{kind}_Marshal")(
        pointer, out, ctypes.c_size_t(MARSHAL_ROOM), ctypes.byref(offset)), f"marshalling a {kind}")
    return out.raw[:offset.value]


class Esys:
    """One ESAPI context on one TCTI connection (see :func:`connect`)."""

    def __init__(self, context: ctypes.c_void_p) -> None:
        self._context = context
        self._esys = libraries()["esys"]

    def _owned(self, pointer: ctypes.c_void_p, kind: str) -> bytes:
        """Marshal an output the ESAPI allocated, then free it."""
        try:
            return _marshal(kind, pointer)
        finally:
            self._esys.Esys_Free(pointer)

    def create_primary_owner(self, template: bytes) -> tuple[int, bytes]:
        """CreatePrimary in the owner hierarchy from a marshalled TPM2B_PUBLIC: the handle and its public area."""
        handle = ctypes.c_uint32(0)
        public = ctypes.c_void_p()
        _check(self._esys.Esys_CreatePrimary(
            self._context, ESYS_TR_RH_OWNER, ESYS_TR_PASSWORD, ESYS_TR_NONE, ESYS_TR_NONE,
            ctypes.create_string_buffer(STRUCT_ROOM),  # an empty TPM2B_SENSITIVE_CREATE
            _unmarshal("TPM2B_PUBLIC", template),
            ctypes.create_string_buffer(STRUCT_ROOM),  # no outside info
            ctypes.create_string_buffer(STRUCT_ROOM),  # no creation PCRs
            ctypes.byref(handle), ctypes.byref(public), None, None, None), "TPM2_CreatePrimary")
        return handle.value, self._owned(public, "TPM2B_PUBLIC")

    def load(self, parent: int, private: bytes, public: bytes) -> int:
        handle = ctypes.c_uint32(0)
        _check(self._esys.Esys_Load(
            self._context, ctypes.c_uint32(parent), ESYS_TR_PASSWORD, ESYS_TR_NONE, ESYS_TR_NONE,
            _unmarshal("TPM2B_PRIVATE", private), _unmarshal("TPM2B_PUBLIC", public), ctypes.byref(handle)),
            LOAD)
        return handle.value

    def sign_ecdsa_sha256(self, key: int, digest: bytes) -> tuple[int, int]:
        """ECDSA-SHA256 of a 32-byte digest the TPM did not make: (r, s)."""
        signature = ctypes.c_void_p()
        _check(self._esys.Esys_Sign(
            self._context, ctypes.c_uint32(key), ESYS_TR_PASSWORD, ESYS_TR_NONE, ESYS_TR_NONE,
            _unmarshal("TPM2B_DIGEST", struct.pack(">H", len(digest)) + digest),
            _unmarshal("TPMT_SIG_SCHEME", struct.pack(">HH", TPM2_ALG_ECDSA, TPM2_ALG_SHA256)),
            # The null ticket: allowed because the device key is not restricted.
            _unmarshal("TPMT_TK_HASHCHECK", struct.pack(">HIH", TPM2_ST_HASHCHECK, TPM2_RH_NULL, 0)),
            ctypes.byref(signature)), "TPM2_Sign")
        return parse_ecdsa_signature(self._owned(signature, "TPMT_SIGNATURE"))

    def flush(self, handle: int) -> None:
        _check(self._esys.Esys_FlushContext(self._context, ctypes.c_uint32(handle)), "TPM2_FlushContext")

    def ecc_curves(self) -> list[int]:
        more = ctypes.c_uint8(0)
        data = ctypes.c_void_p()
        _check(self._esys.Esys_GetCapability(
            self._context, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, ctypes.c_uint32(TPM2_CAP_ECC_CURVES),
            ctypes.c_uint32(0), ctypes.c_uint32(MAX_CURVES), ctypes.byref(more), ctypes.byref(data)),
            "TPM2_GetCapability")
        blob = self._owned(data, "TPMS_CAPABILITY_DATA")
        capability, count = struct.unpack_from(">II", blob)
        if capability != TPM2_CAP_ECC_CURVES or len(blob) != 8 + 2 * count:
            raise EsysError("the TPM answered a question about its curves with something else")
        return list(struct.unpack_from(f">{count}H", blob, 8))


@contextmanager
def connect(name: str, conf: str) -> Iterator[Esys]:
    """An ESAPI context on TCTI ``name`` with ``conf``, finalized on leaving."""
    libs = libraries()
    tcti = ctypes.c_void_p()
    _check(libs["tctildr"].Tss2_TctiLdr_Initialize_Ex(name.encode(), conf.encode(), ctypes.byref(tcti)),
           f"opening the TCTI {name}")
    try:
        context = ctypes.c_void_p()
        _check(libs["esys"].Esys_Initialize(ctypes.byref(context), tcti, None), "Esys_Initialize")
        try:
            yield Esys(context)
        finally:
            libs["esys"].Esys_Finalize(ctypes.byref(context))
    finally:
        libs["tctildr"].Tss2_TctiLdr_Finalize(ctypes.byref(tcti))


def parse_ecdsa_signature(blob: bytes) -> tuple[int, int]:
    """(r, s) of a marshalled TPMT_SIGNATURE that must be ECDSA."""
    algorithm, _hash, r_size = struct.unpack_from(">HHH", blob)
    if algorithm != TPM2_ALG_ECDSA:
        raise EsysError("the TPM returned a signature that is not ECDSA")
    r = blob[6:6 + r_size]
    (s_size,) = struct.unpack_from(">H", blob, 6 + r_size)
    s = blob[8 + r_size:8 + r_size + s_size]
    if len(s) != s_size or 8 + r_size + s_size != len(blob):
        raise EsysError("the TPM returned a malformed signature")
    return int.from_bytes(r, "big"), int.from_bytes(s, "big")


def name_of(public: bytes) -> bytes:
    """The marshalled TPM2B_NAME (nameAlg || digest of TPMT_PUBLIC) of a marshalled SHA-256 TPM2B_PUBLIC."""
    area = public[2:]
    (name_alg,) = struct.unpack_from(">H", area, 2)
    if name_alg != TPM2_ALG_SHA256:
        raise EsysError("the parent's name is not a SHA-256 name")
    name = struct.pack(">H", name_alg) + hashlib.sha256(area).digest()
    return struct.pack(">H", len(name)) + name
