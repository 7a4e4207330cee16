"""When field enrollment tries a token, retries it, or waits: decisions on numbers alone."""

from __future__ import annotations

import random
from pathlib import Path

from agent.enrollment.enroll import CLOCK_TOLERANCE, clock_unset_reason
from agent.enrollment.field import MIN_RETRY_DELAY, Attempt, EnrollmentSchedule, TokenFile, Wait
from agent.tunnel.backoff import Backoff

MISSING = "no token file in /x; copy the token file from central ops to one of them"
TOKEN = TokenFile(Path("/x/enroll.token"), "sha256:aa")
CHANGED = TokenFile(Path("/x/enroll.token"), "sha256:bb")
ON_BOOT = TokenFile(Path("/boot/firmware/outpost-enroll.token"), "sha256:cc")


def schedule(initial: float = 2.0, cap: float = 60.0) -> EnrollmentSchedule:
    return EnrollmentSchedule(missing_reason=MISSING, backoff=Backoff(initial=initial, cap=cap, rng=random.Random(7)),
                              poll_interval=5.0)


def test_no_token_means_look_again_after_the_poll_interval_with_the_missing_sentence() -> None:
    assert schedule().next_step((), now=100.0) == Wait(5.0, MISSING)


def test_a_token_found_is_tried_at_once() -> None:
    assert schedule().next_step((TOKEN,), now=100.0) == Attempt(TOKEN)


def test_a_retryable_failure_waits_out_the_backoff_polling_meanwhile_then_tries_again() -> None:
    plan = schedule(initial=20.0)
    delay = plan.failed(TOKEN, "could not reach the controller", retryable=True, now=100.0)
    assert delay is not None and MIN_RETRY_DELAY <= delay <= 20.0

    waiting = plan.next_step((TOKEN,), now=100.0)
    assert isinstance(waiting, Wait) and waiting.reason == "could not reach the controller"
    assert waiting.seconds == min(5.0, delay)
    assert plan.next_step((TOKEN,), now=100.0 + delay) == Attempt(TOKEN)


def test_retry_delays_grow_up_to_the_cap_and_never_drop_below_the_floor() -> None:
    plan = schedule(initial=1.0, cap=8.0)
    delays = [plan.failed(TOKEN, "down", retryable=True, now=0.0) for _ in range(50)]
    assert all(MIN_RETRY_DELAY <= d <= 8.0 for d in delays)
    assert max(delays[10:]) > 4.0, "the bound grows past the first steps"


def test_a_refused_token_is_never_tried_again_while_its_content_is_unchanged() -> None:
    plan = schedule()
    assert plan.failed(TOKEN, "this token expired on 2020-01-01 00:00 UTC", retryable=False, now=100.0) is None
    for now in (100.0, 1000.0, 10_000_000.0):
        assert plan.next_step((TOKEN,), now) == Wait(5.0, "this token expired on 2020-01-01 00:00 UTC")


def test_a_changed_file_is_tried_at_once_after_a_refusal_or_during_a_backoff() -> None:
    plan = schedule()
    plan.failed(TOKEN, "expired", retryable=False, now=100.0)
    assert plan.next_step((CHANGED,), now=100.0) == Attempt(CHANGED)

    plan = schedule(initial=60.0)
    plan.failed(TOKEN, "down", retryable=True, now=100.0)
    assert plan.next_step((CHANGED,), now=100.0) == Attempt(CHANGED)


def test_a_refused_token_in_an_earlier_place_does_not_hide_a_new_one_in_a_later_place() -> None:
    plan = schedule()
    plan.failed(TOKEN, "This enrollment token was already used", retryable=False, now=100.0)
    assert plan.next_step((TOKEN,), now=101.0) == Wait(5.0, "This enrollment token was already used")
    assert plan.next_step((TOKEN, ON_BOOT), now=102.0) == Attempt(ON_BOOT)
    plan.failed(ON_BOOT, "expired", retryable=False, now=103.0)
    assert plan.next_step((TOKEN, ON_BOOT), now=104.0) == Wait(5.0, "This enrollment token was already used"), \
        "with every file refused, the first one's sentence is shown"


def test_an_earlier_token_in_its_backoff_still_goes_first() -> None:
    plan = schedule(initial=60.0)
    delay = plan.failed(TOKEN, "down", retryable=True, now=100.0)
    assert isinstance(plan.next_step((TOKEN, ON_BOOT), now=100.0), Wait)
    assert plan.next_step((TOKEN, ON_BOOT), now=100.0 + delay) == Attempt(TOKEN)


def test_a_new_token_starts_its_backoff_from_the_beginning() -> None:
    plan = schedule(initial=1.0, cap=1000.0)
    for _ in range(8):
        plan.failed(TOKEN, "down", retryable=True, now=0.0)
    assert plan.failed(CHANGED, "down", retryable=True, now=0.0) <= 1.0 + MIN_RETRY_DELAY


def test_an_unchecked_clock_behind_the_tokens_issue_time_is_not_set_yet() -> None:
    issued = 1_700_000_000.0
    assert clock_unset_reason(issued, now=issued) is None
    assert clock_unset_reason(issued, now=issued - CLOCK_TOLERANCE) is None, "ordinary skew is tolerated"
    reason = clock_unset_reason(issued, now=0.0)
    assert reason == (
        "this gateway's clock reads 1970-01-01 00:00 UTC, before the token was issued (2023-11-14 22:13 UTC); "
        "waiting for the clock to be set (check that NTP, UDP port 123, can get out)"
    )
