"""How TPM response codes are treated: retry when busy, never on authorization, lost on refusal.

The codes are real TSS2_Exception objects from tpm2-pytss; the retry policy is
driven by an operation that answers with them, since a real TPM cannot be
made to say RETRY on demand.
"""

from __future__ import annotations

import itertools
import time

import pytest

pytest.importorskip("agent.identity.tss", reason="the TPM backend needs tpm2-pytss")

from agent.errors import (  # noqa: E402
    EXIT_TEMPFAIL,
    EXIT_TPM_AUTH_REFUSED,
    KeyStoreBusy,
    TpmAuthorizationRefused,
    TpmLockedOut,
)
from agent.identity.tpm_errors import (  # noqa: E402
    BUSY_ATTEMPTS,
    BUSY_TOTAL_BUDGET,
    Kind,
    classify,
    to_keystore_error,
    with_busy_retry,
)
from agent.identity.tss import TPM2_RC, TSS2_RC, TSS2_Exception  # noqa: E402

TCTI = "swtpm:host=127.0.0.1,port=2321"
# Format-one codes name the handle/parameter/session that failed; these are
# what TPM2_Load really returns (parameter 1 for the private blob, session 1).
INTEGRITY_ON_PARAMETER_1 = int(TPM2_RC.INTEGRITY) | 0x100 | 0x040
BAD_AUTH_ON_SESSION_1 = int(TPM2_RC.BAD_AUTH) | 0x900


@pytest.mark.parametrize(
    "rc, kind",
    [
        (TPM2_RC.RETRY, Kind.BUSY),
        (TPM2_RC.YIELDED, Kind.BUSY),
        (TPM2_RC.TESTING, Kind.BUSY),
        (TPM2_RC.NV_RATE, Kind.BUSY),
        (TPM2_RC.LOCKOUT, Kind.LOCKOUT),
        (TPM2_RC.OBJECT_MEMORY, Kind.BUSY),
        (int(TPM2_RC.RETRY) | int(TSS2_RC.RESMGR_TPM_RC_LAYER), Kind.BUSY),
        (TPM2_RC.AUTH_FAIL, Kind.AUTH),
        (BAD_AUTH_ON_SESSION_1, Kind.AUTH),
        (INTEGRITY_ON_PARAMETER_1, Kind.LOAD_REFUSED),
        (TPM2_RC.KEY_SIZE, Kind.LOAD_REFUSED),
        (int(TSS2_RC.TCTI_RC_LAYER) | 0x0A, Kind.COMMUNICATION),
        (TPM2_RC.INITIALIZE, Kind.OTHER),
    ],
)
def test_response_codes_are_classified_by_what_the_agent_should_do(rc: int, kind: Kind) -> None:
    assert classify(TSS2_Exception(int(rc))) is kind


class Answers:
    """An operation that raises the given response codes in turn, then returns "done"."""

    def __init__(self, *codes: int) -> None:
        self.codes = list(codes)
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.codes:
            raise TSS2_Exception(int(self.codes.pop(0)))
        return "done"


def busy_error(error: TSS2_Exception) -> Exception:
    return to_keystore_error(error, TCTI, "signing")


def test_a_busy_tpm_is_asked_again_and_the_answer_comes_through() -> None:
    operation = Answers(TPM2_RC.RETRY, TPM2_RC.TESTING)
    assert with_busy_retry(operation, busy_error) == "done"
    assert operation.calls == 3


def test_a_tpm_that_stays_busy_ends_in_keystorebusy_within_the_budget() -> None:
    operation = Answers(*[TPM2_RC.NV_RATE] * 100)
    started = time.monotonic()
    with pytest.raises(KeyStoreBusy, match="busy") as caught:
        with_busy_retry(operation, busy_error)
    assert time.monotonic() - started <= BUSY_TOTAL_BUDGET
    assert operation.calls <= BUSY_ATTEMPTS
    assert caught.value.retryable


def test_the_waits_double_and_stay_inside_the_budget() -> None:
    waits: list[float] = []
    with pytest.raises(KeyStoreBusy):
        with_busy_retry(Answers(*[TPM2_RC.YIELDED] * 100), busy_error, sleep=waits.append)
    assert len(waits) == BUSY_ATTEMPTS - 1
    assert all(later == 2 * earlier for earlier, later in itertools.pairwise(waits))
    assert sum(waits) <= BUSY_TOTAL_BUDGET


@pytest.mark.parametrize("rc", [TPM2_RC.AUTH_FAIL, BAD_AUTH_ON_SESSION_1, INTEGRITY_ON_PARAMETER_1, TPM2_RC.LOCKOUT])
def test_authorization_lockout_and_other_failures_are_never_retried(rc: int) -> None:
    operation = Answers(rc)
    with pytest.raises(TSS2_Exception):
        with_busy_retry(operation, busy_error)
    assert operation.calls == 1


def test_an_authorization_failure_reads_as_a_sentence_that_says_what_to_do_and_ends_the_agent() -> None:
    error = to_keystore_error(TSS2_Exception(BAD_AUTH_ON_SESSION_1), TCTI, "signing")
    assert type(error) is TpmAuthorizationRefused
    assert str(error).startswith(f"the TPM at {TCTI} refused authorization while signing (")
    assert "remove the password someone set and restart outpost-agent" in str(error)
    assert not error.retryable and error.terminal
    assert error.exit_code == EXIT_TPM_AUTH_REFUSED


def test_a_lockout_reads_as_a_sentence_that_says_it_passes_and_leaves_the_retry_to_the_agents_loops() -> None:
    error = to_keystore_error(TSS2_Exception(int(TPM2_RC.LOCKOUT)), TCTI, "signing")
    assert type(error) is TpmLockedOut
    assert "dictionary-attack lockout" in str(error) and "unlocks by itself" in str(error)
    assert error.retryable and not error.terminal
    assert error.exit_code == EXIT_TEMPFAIL


def test_busy_is_retryable_and_not_terminal() -> None:
    error = to_keystore_error(TSS2_Exception(int(TPM2_RC.RETRY)), TCTI, "signing")
    assert type(error) is KeyStoreBusy
    assert error.retryable and not error.terminal
