"""A live dial ends when the policy that allowed it does: at its expiry, its deletion, or an update that narrows it.

A real controller, a real binder and dialer (the agent's tunnel client) and
a TCP echo service on loopback; the dial carries data before its policy
ends, and is reset with the reason after.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from agent.tunnel.client import TunnelOptions
from shared.protocol import ErrorCode
from shared.tunnel.channel import StreamChannel
from shared.tunnel.session import ChannelReset, TunnelSession
from tests.controller.harness import Running, run, running_controller, store_snapshot
from tests.controller.relay.relay_harness import SCENARIO_TIMEOUT, connect, enrolled, session_credentials
from tests.controller.relay.test_relay_decisions import DIAL_ANSWER_TIMEOUT, Echo, create

#: What the issue promises: the connections a policy allowed are closed within this of its end.
CLOSE_DEADLINE = 2.0
#: How long a test waits for the relay's queued audit rows.
AUDIT_WAIT = 5.0


async def echoing_dial(dialer: TunnelSession, service: str) -> StreamChannel:
    """An accepted dial of ``service`` that echoed one message."""
    channel = dialer.open_stream(service)
    await asyncio.wait_for(channel.wait_accepted(), DIAL_ANSWER_TIMEOUT)
    await channel.write(b"ping")
    assert await asyncio.wait_for(channel.read(), DIAL_ANSWER_TIMEOUT) == b"ping"
    return channel


async def audit_row(ctl: Running, before: dict, event: str) -> dict:
    """The first ``event`` row added since ``before`` (waits, bounded, for the relay's queued rows)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + AUDIT_WAIT
    while loop.time() < deadline:
        audit = store_snapshot(ctl.context.settings.store_path)["audit"][len(before["audit"]):]
        rows = [json.loads(row[3]) for row in audit if row[2] == event]
        if rows:
            return rows[0]
        await asyncio.sleep(0.05)
    raise AssertionError(f"no {event} row within {AUDIT_WAIT} s")


async def services_and_policies(ctl: Running, echo: Echo, dial: dict) -> int:
    await create(ctl, "/api/v1/services", {"name": "modbus"})
    await create(ctl, "/api/v1/policies", {"kind": "bind", "identities": ["gw-p"], "services": ["modbus"]})
    status, policy = await ctl.call("POST", "/api/v1/policies", {"kind": "dial", "services": ["modbus"], **dial})
    assert status == 201, policy
    return int(policy["id"])


def test_a_live_dial_is_closed_at_its_policys_expiry_and_the_audit_says_why(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl") as ctl, Echo() as echo:
            # Enrolled first: the three seconds of the policy are for the tunnels and the dial, not for
            # an enrollment that a loaded machine can make last that long.
            gateway = await enrolled(ctl, "gw-p")
            operator = await session_credentials(ctl)
            policy_id = await services_and_policies(ctl, echo, {"identities": ["role:operator"], "for": "3s"})
            status, listed = await ctl.call("GET", "/api/v1/policies")
            expires_at = next(p["expires_at"] for p in listed["policies"] if p["id"] == policy_id)
            binds = TunnelOptions(binds={"modbus": ("127.0.0.1", echo.port)})
            before = store_snapshot(ctl.context.settings.store_path)
            async with connect(ctl, gateway, binds) as (binder, _), connect(ctl, operator) as (dialer, _):
                channel = await echoing_dial(dialer, "modbus")
                await asyncio.wait_for(channel.wait_reset(), expires_at - time.time() + CLOSE_DEADLINE)
                assert time.time() < expires_at + CLOSE_DEADLINE
                assert time.time() >= expires_at
                assert channel.error is not None and channel.error.code == ErrorCode.POLICY_DENIED
                assert channel.error.reason.startswith(f"policy {policy_id} expired at ")
                # The tunnels stay: only what the policy allowed ends; a new dial is refused.
                assert not dialer.conn.closed and not binder.conn.closed
                again = dialer.open_stream("modbus")
                try:
                    await asyncio.wait_for(again.wait_accepted(), DIAL_ANSWER_TIMEOUT)
                    raise AssertionError("a dial after the expiry was accepted")
                except ChannelReset as refused:
                    assert refused.code == ErrorCode.POLICY_DENIED
            closed = await audit_row(ctl, before, "dial_closed")
            assert closed["reason"].startswith(f"policy {policy_id} expired at ")
            expired = await audit_row(ctl, before, "policy_expired")
            assert expired["id"] == policy_id and "expired at" in expired["reason"]

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))


def test_deleting_or_narrowing_a_policy_closes_its_live_dials_and_widening_keeps_them(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl") as ctl, Echo() as echo:
            policy_id = await services_and_policies(ctl, echo, {"identities": ["role:operator"]})
            gateway = await enrolled(ctl, "gw-p")
            operator = await session_credentials(ctl)
            binds = TunnelOptions(binds={"modbus": ("127.0.0.1", echo.port)})
            async with connect(ctl, gateway, binds) as (_binder, _), connect(ctl, operator) as (dialer, _):
                channel = await echoing_dial(dialer, "modbus")
                # Widening (one more identity) leaves the dial as it is.
                status, body = await ctl.call("PATCH", f"/api/v1/policies/{policy_id}",
                                              {"identities": ["role:operator", "someone"]})
                assert status == 200 and body["version"] == 2, body
                await asyncio.sleep(0.5)
                await channel.write(b"still")
                assert await asyncio.wait_for(channel.read(), DIAL_ANSWER_TIMEOUT) == b"still"
                # Narrowing it so the operator is out closes the dial.
                status, body = await ctl.call("PATCH", f"/api/v1/policies/{policy_id}", {"identities": ["someone"]})
                assert status == 200 and body["version"] == 3, body
                await asyncio.wait_for(channel.wait_reset(), CLOSE_DEADLINE)
                assert channel.error is not None
                assert channel.error.reason.startswith(f"policy {policy_id} was changed (version 3); no policy allows")
                # Another policy allowing it: deleting the first one keeps a dial the second allows.
                status, body = await ctl.call("PATCH", f"/api/v1/policies/{policy_id}",
                                              {"identities": ["role:operator"]})
                assert status == 200
                channel = await echoing_dial(dialer, "modbus")
                status, other = await ctl.call("POST", "/api/v1/policies", {
                    "kind": "dial", "identities": ["operator"], "services": ["modbus"]})
                assert status == 201
                status, _ = await ctl.call("DELETE", f"/api/v1/policies/{policy_id}")
                assert status == 200
                await asyncio.sleep(0.5)
                await channel.write(b"kept")
                assert await asyncio.wait_for(channel.read(), DIAL_ANSWER_TIMEOUT) == b"kept"
                status, _ = await ctl.call("DELETE", f"/api/v1/policies/{other['id']}")
                assert status == 200
                await asyncio.wait_for(channel.wait_reset(), CLOSE_DEADLINE)
                assert channel.error is not None
                assert channel.error.reason.startswith(f"policy {other['id']} was deleted; no policy allows")

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))


def test_a_policy_with_a_bad_or_past_expiry_is_refused_in_one_sentence_and_one_audit_row(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl") as ctl:
            await create(ctl, "/api/v1/services", {"name": "modbus"})
            path = ctl.context.settings.store_path
            for extra, code, sentence in (
                ({"for": "a while"}, "invalid_duration", "'a while' is not a duration; write a number and a unit "
                                                         "(s, m, h, d, w), such as 30m, 8h or 7d."),
                ({"until": "2020-05-01T00:00:00Z"}, "invalid_time", "2020-05-01T00:00:00Z is in the past; give a "
                                                                   "time to come, or a duration (for)."),
            ):
                before = store_snapshot(path)
                status, body = await ctl.call("POST", "/api/v1/policies", {
                    "kind": "dial", "identities": ["ops"], "services": ["modbus"], **extra})
                assert (status, body["error"], body["message"]) == (400, code, sentence)
                after = store_snapshot(path)
                assert after["policies"] == before["policies"]
                added = after["audit"][len(before["audit"]):]
                assert [(r[2], json.loads(r[3])["reason"]) for r in added] == [("policy_refused", sentence)]
            for method in ("PATCH", "DELETE"):
                before = store_snapshot(path)
                status, body = await ctl.call(method, "/api/v1/policies/77", {"identities": ["x"]}
                                              if method == "PATCH" else None)
                assert (status, body["message"]) == (404, "There is no policy 77; outpostctl policy list shows them.")
                assert [r[2] for r in store_snapshot(path)["audit"][len(before["audit"]):]] == ["policy_refused"]

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))


class _SlowLocalConnect:
    """``asyncio`` for agent/services/forward.py, whose local connect takes ``delay`` seconds first."""

    def __init__(self, delay: float, started: asyncio.Event) -> None:
        self.delay = delay
        self.started = started

    def __getattr__(self, name: str) -> object:
        return getattr(asyncio, name)

    async def open_connection(self, host: str, port: int) -> object:
        self.started.set()
        await asyncio.sleep(self.delay)
        return await asyncio.open_connection(host, port)


def test_a_policy_deleted_while_the_gateway_accepts_still_closes_the_dial(tmp_path: Path, monkeypatch) -> None:
    import agent.services.forward as forward

    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl") as ctl, Echo() as echo:
            policy_id = await services_and_policies(ctl, echo, {"identities": ["role:operator"]})
            gateway = await enrolled(ctl, "gw-p")
            operator = await session_credentials(ctl)
            binds = TunnelOptions(binds={"modbus": ("127.0.0.1", echo.port)})
            async with connect(ctl, gateway, binds) as _, connect(ctl, operator) as (dialer, _):
                accepting = asyncio.Event()
                monkeypatch.setattr(forward, "asyncio", _SlowLocalConnect(1.0, accepting))
                channel = dialer.open_stream("modbus")
                await asyncio.wait_for(accepting.wait(), DIAL_ANSWER_TIMEOUT)
                # Decided and allowed; the gateway is still connecting its local service.
                status, _ = await ctl.call("DELETE", f"/api/v1/policies/{policy_id}")
                assert status == 200
                try:
                    await asyncio.wait_for(channel.wait_accepted(), DIAL_ANSWER_TIMEOUT)
                except ChannelReset:
                    pass  # refused outright is as good
                await asyncio.wait_for(channel.wait_reset(), CLOSE_DEADLINE + 1.0)
                assert channel.error is not None
                assert channel.error.reason.startswith(f"policy {policy_id} was deleted")

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))
