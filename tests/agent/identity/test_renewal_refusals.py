"""The certificate keeper against a real controller that refuses: revoked stops, disabled and
other refusals are asked again slowly, even in the last minutes of the certificate."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import pytest

from agent.identity.keeper import CertificateKeeper
from agent.identity.recovery import recover_at_start
from agent.identity.refusals import DISABLED_ASK_INTERVAL, REFUSAL_RETRY_BASE_SECONDS, DisabledGate
from agent.identity.renewal import RenewalRefused
from agent.identity.select import open_keystore
from agent.identity.software import SoftwareKeyStore
from agent.identity.state import StateDir
from tests.agent.identity.test_renewal_keeper import SOFTWARE, age_certificate, enrolled_gateway
from tests.controller.harness import run, running_controller

#: How long each keeper is watched: the old rule asked about once a second this close to the expiry.
WINDOW = 6.0
#: Seconds before the certificate's expiry at which the keepers below start (inside the last-minutes margin).
BEFORE_EXPIRY = 8.0
#: Bounds the wait for two asks of a start-up recovery one second apart; each ask is a renewal on loopback,
#: several seconds under emulation.
RECOVERY_WAIT = 30.0


def refusals(running) -> list[dict]:
    return [e for e in running.context.audit.recent(500) if e["event"] == "renewal_refused"]


def refusals_of(running, name: str) -> list[dict]:
    """The renewal refusals of the identity ``name`` (its URI ends with the name)."""
    return [e for e in refusals(running) if str(e["fields"].get("identity", "")).endswith(f"/{name}")]


async def watch(keeper: CertificateKeeper, seconds: float) -> BaseException | None:
    """Run the keeper for ``seconds``; what it raised, if it ended."""
    task = asyncio.ensure_future(keeper.run())
    try:
        await asyncio.wait({task}, timeout=seconds)
    finally:
        task.cancel()
    return task.exception() if task.done() and not task.cancelled() else None


def near_expiry_clock(state: StateDir):
    """Trusted time that reads ``BEFORE_EXPIRY`` seconds before the certificate's expiry, and runs."""
    shift = state.load().not_after().timestamp() - BEFORE_EXPIRY - time.time()
    return lambda: time.time() + shift


def test_a_revoked_identity_stops_the_keeper_after_one_ask(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "c") as running:
            state = await enrolled_gateway(running, tmp_path)
            await running.call("POST", "/api/v1/identities/gw/revoke")
            keeper = CertificateKeeper(state, open_keystore(state.path, SOFTWARE), clock=near_expiry_clock(state))
            ended = await watch(keeper, WINDOW)
            assert isinstance(ended, RenewalRefused) and ended.terminal and ended.exit_code == 77
            assert "revoked" in str(ended)
            assert len(refusals(running)) == 1

    run(scenario())


def test_a_disabled_identity_and_another_refusal_are_asked_about_slowly_even_in_the_last_seconds(
        tmp_path: Path) -> None:
    """Two keepers in the last seconds of their certificates, watched through the same window: one whose
    identity is disabled (asked about once per DISABLED_ASK_INTERVAL), and one refused for another reason
    (another device's key in its state directory: backed off by minutes, not seconds). Each assertion names
    the keeper it is about."""
    async def scenario() -> None:
        async with running_controller(tmp_path / "c") as running:
            disabled = await enrolled_gateway(running, tmp_path, "gw-disabled")
            await running.call("POST", "/api/v1/identities/gw-disabled/disable")
            refused = await enrolled_gateway(running, tmp_path, "gw-other-key")
            # Another device's key in this state directory: the controller refuses it (renewal_unknown_key).
            (refused.path / "key.pem").unlink()
            other = SoftwareKeyStore(refused.path)
            other.create()

            # Both clocks set once every enrollment is done: a slow one must not spend the margin before
            # the watch, which then would run past the certificate's expiry.
            disabled_clock = near_expiry_clock(disabled)
            disabled_plans: list[tuple[float, float, str | None]] = []
            disabled_keeper = CertificateKeeper(disabled, open_keystore(disabled.path, SOFTWARE), clock=disabled_clock,
                                                on_status=lambda *plan: disabled_plans.append(plan))
            refused_clock = near_expiry_clock(refused)
            refused_plans: list[tuple[float, float, str | None]] = []
            refused_keeper = CertificateKeeper(refused, other, clock=refused_clock, rng=random.Random(1),
                                               on_status=lambda *plan: refused_plans.append(plan))

            ended = await asyncio.gather(watch(disabled_keeper, WINDOW), watch(refused_keeper, WINDOW))

            assert ended[0] is None, "disabled: the keeper keeps running"
            asked = refusals_of(running, "gw-disabled")
            assert len(asked) == 1, f"the disabled identity was asked about {len(asked)} times"
            assert asked[0]["fields"]["reason"] == "identity_disabled"
            _, next_renewal, error = disabled_plans[-1]
            assert "disabled" in error
            assert next_renewal >= disabled_clock() + DISABLED_ASK_INTERVAL - WINDOW - 1, "the disabled identity's next ask"

            assert ended[1] is None, "another refusal: the keeper keeps running"
            # The controller cannot name the identity of a key it does not know: the rest are this keeper's.
            others = [e for e in refusals(running) if e not in refusals_of(running, "gw-disabled")]
            assert [e["fields"]["reason"] for e in others] == ["renewal_unknown_key"], "another refusal asked again"
            assert refused_plans[-1][1] >= refused_clock() + REFUSAL_RETRY_BASE_SECONDS / 2 - WINDOW - 1, \
                "the next ask after another refusal is minutes away"

    run(scenario())


def test_start_up_recovery_of_a_disabled_identity_waits_and_goes_on_once_enabled(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "c") as running:
            state = await enrolled_gateway(running, tmp_path)
            age_certificate(running, state, days=2)
            await running.call("POST", "/api/v1/identities/gw/disable")
            waits: list[tuple[str, float]] = []
            # When each wait was heard, and how many refusals the controller had recorded by then: the
            # next ask is an interval away, so none is in flight while they are counted.
            heard_at: list[tuple[float, int]] = []
            gate = DisabledGate(interval=1.0)

            def disabled(why: str, wait: float) -> None:
                waits.append((why, wait))
                heard_at.append((time.monotonic(), len(refusals(running))))

            recovering = asyncio.ensure_future(recover_at_start(
                state, open_keystore(state.path, SOFTWARE), gate=gate, on_disabled=disabled))
            # Two waits heard: it waited once and asked again, whatever each ask cost a slow machine.
            deadline = time.monotonic() + RECOVERY_WAIT
            while len(waits) < 2:
                assert not recovering.done(), "disabled is not the end at start either"
                assert time.monotonic() < deadline, f"no second ask within {RECOVERY_WAIT} s: {waits}"
                await asyncio.sleep(0.02)
            assert not recovering.done(), "disabled is not the end at start either"
            assert "disabled" in waits[0][0] and waits[0][1] == pytest.approx(1.0, abs=0.2)
            assert [count for _, count in heard_at[:2]] == [1, 2], "one refusal recorded per ask"
            assert heard_at[1][0] - heard_at[0][0] >= waits[0][1] - 0.05, "the second ask waited out the interval"
            await running.call("POST", "/api/v1/identities/gw/enable")
            assert await asyncio.wait_for(recovering, 10) is True

    run(scenario())
