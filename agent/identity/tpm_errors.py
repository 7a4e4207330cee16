"""What a TPM response code means for the agent: retry, wait long, give up, or identity lost.

A TPM answers "busy" in several ways (self-test running, NV write rate
limit, a resource manager's RETRY); those pass with a short wait. A TPM in
dictionary-attack lockout is not busy: the lockout lasts the TPM's recovery
time (minutes to hours), so a short retry loop is pointless; it is reported
at once and the agent's own loops try again after their (long) backoff. The
device key and the derived parent are noDA and the owner hierarchy is not
DA-protected, so lockout reaches the agent only through a DA-protected
storage key someone provisioned at 0x81000001. An authorization failure
never passes by retrying and, on a DA-protected object, each retry counts
toward that lockout, so it is never retried and the agent stops. A key blob
that the TPM refuses to load means the TPM that made it is gone (cleared or
replaced): that is not a crash to restart from but a lost identity.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from typing import TypeVar

from agent.errors import DeviceKeyLost, KeyStoreBusy, KeyStoreError, TpmAuthorizationRefused, TpmLockedOut
from agent.identity.tss import TPM2_RC, TSS2_RC, TSS2_Exception

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Attempts at one operation while the TPM answers "busy". Five attempts with
#: doubling waits cover a self-test or an NV rate-limit window on real chips.
BUSY_ATTEMPTS = 5
#: First wait after a busy answer; doubles on every further one.
BUSY_FIRST_DELAY = 0.05
#: Upper bound on the time spent waiting for a busy TPM in one operation, so a
#: caller (tunnel authentication has a deadline) gets an answer in bounded time.
BUSY_TOTAL_BUDGET = 2.0

LOST_SENTENCE = (
    "device key lost: the TPM no longer holds this gateway's key (was it cleared or replaced?); "
    "re-enroll with a new token"
)

# Warnings that pass with time; the TPM (or the resource manager) says "later".
# The memory ones appear when other processes hold the TPM's few object slots.
_BUSY_CODES = frozenset(
    int(code)
    for code in (
        TPM2_RC.RETRY,
        TPM2_RC.YIELDED,
        TPM2_RC.TESTING,
        TPM2_RC.NV_RATE,
        TPM2_RC.NV_UNAVAILABLE,
        TPM2_RC.CANCELED,
        TPM2_RC.OBJECT_MEMORY,
        TPM2_RC.SESSION_MEMORY,
        TPM2_RC.MEMORY,
    )
)
_AUTH_CODES = frozenset(
    int(code)
    for code in (
        TPM2_RC.AUTH_FAIL,
        TPM2_RC.BAD_AUTH,
        TPM2_RC.AUTH_MISSING,
        TPM2_RC.AUTH_TYPE,
        TPM2_RC.AUTH_UNAVAILABLE,
        TPM2_RC.POLICY_FAIL,
    )
)
# What TPM2_Load answers for a blob made by another TPM or another parent:
# the integrity HMAC fails, or the decrypted sensitive area makes no sense.
_LOAD_REFUSED_CODES = frozenset(
    int(code)
    for code in (
        TPM2_RC.INTEGRITY,
        TPM2_RC.KEY_SIZE,
        TPM2_RC.KEY,
        TPM2_RC.SIZE,
        TPM2_RC.HANDLE,
        TPM2_RC.TYPE,
        TPM2_RC.ATTRIBUTES,
        TPM2_RC.HIERARCHY,
        TPM2_RC.VALUE,
        TPM2_RC.SYMMETRIC,
        TPM2_RC.SCHEME,
        TPM2_RC.CURVE,
        TPM2_RC.KDF,
        TPM2_RC.HASH,
        TPM2_RC.BINDING,
        TPM2_RC.ECC_POINT,
        TPM2_RC.ASYMMETRIC,
        TPM2_RC.INSUFFICIENT,
    )
)
_FMT1 = 0x080
# Format-one codes carry the handle/parameter/session number above these bits.
_FMT1_ERROR_MASK = 0x03F
_TPM_CODE_MASK = 0xFFFF


class Kind(enum.Enum):
    BUSY = "busy"
    LOCKOUT = "lockout"
    AUTH = "auth"
    LOAD_REFUSED = "load-refused"
    COMMUNICATION = "communication"
    OTHER = "other"


def tpm_code(error: TSS2_Exception) -> int | None:
    """The TPM's own response code with handle/parameter numbers stripped, or None
    when the error came from the software stack (TCTI, ESAPI, marshalling)."""
    rc = int(error.rc)
    layer = rc & int(TSS2_RC.RC_LAYER_MASK)
    if layer not in (0, int(TSS2_RC.RESMGR_TPM_RC_LAYER)):
        return None
    code = rc & _TPM_CODE_MASK
    if code & _FMT1:
        return _FMT1 | (code & _FMT1_ERROR_MASK)
    return code


def classify(error: TSS2_Exception) -> Kind:
    code = tpm_code(error)
    if code is None:
        layer = int(error.rc) & int(TSS2_RC.RC_LAYER_MASK)
        return Kind.COMMUNICATION if layer == int(TSS2_RC.TCTI_RC_LAYER) else Kind.OTHER
    if code in _BUSY_CODES:
        return Kind.BUSY
    if code == int(TPM2_RC.LOCKOUT):
        return Kind.LOCKOUT
    if code in _AUTH_CODES:
        return Kind.AUTH
    if code in _LOAD_REFUSED_CODES:
        return Kind.LOAD_REFUSED
    return Kind.OTHER


def device_key_lost() -> DeviceKeyLost:
    return DeviceKeyLost(LOST_SENTENCE)


def to_keystore_error(error: TSS2_Exception, tcti: str, action: str) -> KeyStoreError:
    """The one-sentence error for a TPM failure that is not a lost key."""
    kind = classify(error)
    if kind is Kind.BUSY:
        return KeyStoreBusy(f"the TPM at {tcti} stayed busy while {action} ({error}); the agent will try again later")
    if kind is Kind.LOCKOUT:
        return TpmLockedOut(
            f"the TPM at {tcti} is in dictionary-attack lockout while {action} ({error}); it unlocks by itself "
            "after its recovery time, or at once with tpm2_dictionarylockout --clear-lockout by the TPM's owner; "
            "the agent tries again later"
        )
    if kind is Kind.AUTH:
        return TpmAuthorizationRefused(
            f"the TPM at {tcti} refused authorization while {action} ({error}); the agent uses empty passwords "
            "(owner hierarchy, storage key at 0x81000001), so remove the password someone set and restart "
            "outpost-agent; it does not retry, as wrong passwords count toward the TPM's lockout"
        )
    if kind is Kind.COMMUNICATION:
        return KeyStoreError(
            f"lost contact with the TPM at {tcti} while {action} ({error}); check the TPM device and keystore.tcti"
        )
    return KeyStoreError(f"the TPM at {tcti} failed while {action} ({error}); see the agent log and the TPM's health")


def with_busy_retry(
    operation: Callable[[], T],
    on_busy_exhausted: Callable[[TSS2_Exception], Exception],
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """Run ``operation``; rerun it while the TPM answers "busy", within the bounds above.

    Any other failure propagates at once: authorization failures in particular
    are never retried.
    """
    started = clock()
    delay = BUSY_FIRST_DELAY
    for attempt in range(1, BUSY_ATTEMPTS + 1):
        try:
            return operation()
        except TSS2_Exception as error:
            if classify(error) is not Kind.BUSY:
                raise
            out_of_time = clock() - started + delay > BUSY_TOTAL_BUDGET
            if attempt == BUSY_ATTEMPTS or out_of_time:
                raise on_busy_exhausted(error) from None
            log.info("TPM busy (%s); trying again in %.2f s", error, delay)
            sleep(delay)
            delay *= 2
    raise AssertionError("unreachable: the loop returns or raises")  # pragma: no cover
