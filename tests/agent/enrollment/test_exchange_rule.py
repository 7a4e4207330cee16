"""One rule for a certificate that arrives already expired, on the enrollment and the renewal path.

By a clock nobody could check it is the clock's fault: ClockError (retryable,
"set the clock or allow NTP"); by a measured clock it is the controller's:
EnrollmentError ("ask central ops"). Either way nothing is stored.
"""

from __future__ import annotations

import asyncio
import datetime
import time
from pathlib import Path

import pytest

from agent.enrollment.enroll import enroll
from agent.errors import ClockError, EnrollmentError, OutpostError
from agent.identity.pinned_tls import LOCAL_TIME, FixedTime, TimeSource
from agent.identity.renewal import renew_certificate
from agent.identity.select import KeyStoreSettings, open_keystore
from agent.identity.state import StateDir

SOFTWARE = KeyStoreSettings(backend="software")
EXPIRED = datetime.timedelta(minutes=-1)
UNCHECKED_CLOCK = "already expired by this gateway's clock, which could not be checked; set the clock or allow NTP"
MEASURED_CLOCK = "already expired; ask central ops"
RULE = [
    pytest.param(False, ClockError, UNCHECKED_CLOCK, id="unmeasured-clock"),
    pytest.param(True, EnrollmentError, MEASURED_CLOCK, id="measured-clock"),
]


def judged_by(measured: bool) -> TimeSource:
    return FixedTime(time.time()) if measured else LOCAL_TIME


@pytest.mark.parametrize(("measured", "error", "sentence"), RULE)
def test_enrollment_applies_the_one_rule(controller, state_dir, token_file, measured: bool,
                                         error: type[OutpostError], sentence: str) -> None:
    controller.behaviour.leaf_lifetime = EXPIRED
    now = time.time() if measured else None

    with pytest.raises(error, match=sentence) as raised:
        enroll(token_file(controller.token()), state_dir, SOFTWARE, now=now)

    assert raised.value.retryable is (not measured)
    assert not StateDir(state_dir).is_enrolled()


@pytest.mark.parametrize(("measured", "error", "sentence"), RULE)
def test_renewal_applies_the_same_rule(controller, state_dir, token_file, measured: bool,
                                       error: type[OutpostError], sentence: str) -> None:
    enroll(token_file(controller.token()), state_dir, SOFTWARE)
    state = StateDir(state_dir)
    before = state.load().cert_pem
    controller.behaviour.leaf_lifetime = EXPIRED
    keystore = open_keystore(Path(state_dir), SOFTWARE)
    try:
        with pytest.raises(error, match=sentence) as raised:
            asyncio.run(renew_certificate(state, keystore, judged_by(measured)))
    finally:
        keystore.close()

    assert raised.value.retryable is (not measured)
    assert state.load().cert_pem == before


def test_renewal_through_the_same_exchange_stores_a_fresh_certificate(controller, state_dir, token_file) -> None:
    enroll(token_file(controller.token()), state_dir, SOFTWARE)
    state = StateDir(state_dir)
    before = state.load().cert_pem
    keystore = open_keystore(Path(state_dir), SOFTWARE)
    try:
        cert = asyncio.run(renew_certificate(state, keystore, FixedTime(time.time())))
    finally:
        keystore.close()

    assert state.load().cert_pem != before
    assert state.load().certificate().serial_number == cert.serial_number
