"""The rules for asking a controller that refused: one ask at a time, disabled waits its interval, no tight loops."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from agent.errors import ControllerUnreachable, EnrollmentError
from agent.identity.refusals import (
    DISABLED,
    DISABLED_ASK_INTERVAL,
    REFUSAL_RETRY_BASE_SECONDS,
    REFUSAL_RETRY_MAX_SECONDS,
    DisabledGate,
    identity_status,
    refusal_delay,
)
from agent.identity.renewal import RenewalRefused


class Disabled(EnrollmentError):
    identity_status = DISABLED


def test_the_disabled_interval_is_ten_minutes() -> None:
    assert DISABLED_ASK_INTERVAL == 600.0
    assert DisabledGate().interval == DISABLED_ASK_INTERVAL


def test_refusal_waits_never_come_near_once_a_second_grow_and_stay_capped() -> None:
    rng = random.Random(3)
    for refusals in range(1, 40):
        bound = min(REFUSAL_RETRY_MAX_SECONDS, REFUSAL_RETRY_BASE_SECONDS * 2 ** (refusals - 1))
        draws = [refusal_delay(refusals, rng) for _ in range(200)]
        assert min(draws) >= bound / 2 >= REFUSAL_RETRY_BASE_SECONDS / 2
        assert max(draws) <= bound
    assert min(refusal_delay(10_000, rng) for _ in range(100)) >= REFUSAL_RETRY_MAX_SECONDS / 2


def test_renewal_refusals_name_the_identity_status_and_only_revoked_is_terminal() -> None:
    revoked = RenewalRefused("The identity default/gw was revoked", "identity_revoked")
    disabled = RenewalRefused("The identity default/gw is disabled", "identity_disabled")
    unknown = RenewalRefused("No identity is enrolled with this gateway's key", "renewal_unknown_key")
    assert (identity_status(revoked), revoked.terminal, revoked.exit_code) == ("revoked", True, 77)
    assert (identity_status(disabled), disabled.terminal) == ("disabled", False)
    assert (identity_status(unknown), unknown.terminal) == (None, False)


class FakeMonotonic:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_after_disabled_no_ask_goes_out_before_the_interval_whoever_asks() -> None:
    async def scenario() -> None:
        gate = DisabledGate(interval=0.5)
        with pytest.raises(Disabled):
            await gate.ask(_raise(Disabled("disabled")))
        disabled_at = time.monotonic()
        assert gate.closed and 0.4 < gate.remaining() <= 0.5
        asked: dict[str, float] = {}

        async def ask(who: str) -> None:
            await gate.ask(_note(asked, who))

        await asyncio.wait_for(asyncio.gather(ask("tunnel"), ask("renewal")), 5)
        assert sorted(asked) == ["renewal", "tunnel"]
        assert min(asked.values()) - disabled_at >= 0.5
        assert not gate.closed

    asyncio.run(scenario())


def test_a_second_asker_waits_for_the_first_answer_and_a_disabled_answer_holds_it_back() -> None:
    async def scenario() -> None:
        clock = FakeMonotonic()
        gate = DisabledGate(interval=600.0, monotonic=clock)
        answer = asyncio.get_running_loop().create_future()
        first = asyncio.ensure_future(gate.ask(answer))
        await asyncio.sleep(0)
        asked: list[str] = []
        request = _record(asked, "second")
        second = asyncio.ensure_future(gate.ask(request))
        await asyncio.sleep(0.05)
        assert asked == [], "one ask at a time"
        answer.set_exception(Disabled("disabled"))
        with pytest.raises(Disabled):
            await first
        await asyncio.sleep(0.05)
        assert asked == [] and not second.done(), "the first answer said disabled: the second waits its interval"
        second.cancel()
        await asyncio.gather(second, return_exceptions=True)
        request.close()

    asyncio.run(scenario())


def test_only_an_accepted_ask_opens_the_gate_and_other_answers_start_the_interval_again() -> None:
    async def scenario() -> None:
        clock = FakeMonotonic()
        gate = DisabledGate(interval=600.0, monotonic=clock)
        with pytest.raises(EnrollmentError):
            await gate.ask(_raise(EnrollmentError("a refusal while open")))
        assert not gate.closed, "an open gate stays open: only 'disabled' closes it"
        with pytest.raises(Disabled):
            await gate.ask(_raise(Disabled("disabled")))
        for error in (ControllerUnreachable("no network"), EnrollmentError("the certificate expired")):
            clock.now += 600.0
            assert gate.ready
            with pytest.raises(type(error)):
                await gate.ask(_raise(error))
            assert gate.closed and gate.remaining() == 600.0, "says nothing of the status: one ask per interval"
        clock.now += 600.0
        assert await gate.ask(_value("certificate")) == "certificate"
        assert not gate.closed and gate.ready

    asyncio.run(scenario())


def test_a_gate_used_by_start_up_works_in_the_agents_next_event_loop() -> None:
    gate = DisabledGate(interval=0.05)

    async def disabled_once() -> None:
        with pytest.raises(Disabled):
            await gate.ask(_raise(Disabled("disabled")))
        await gate.wait()  # waits on this loop

    asyncio.run(disabled_once())
    asyncio.run(gate.ask(_value(None)))  # another loop, as run() has after start-up


async def _raise(error: Exception):
    raise error


async def _value(value):
    return value


async def _note(asked: dict[str, float], who: str) -> None:
    asked[who] = time.monotonic()


async def _record(asked: list[str], who: str) -> None:
    asked.append(who)
