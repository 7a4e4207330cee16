"""A dial aimed at one gateway (``modbus@gw-2``) reaches that gateway's service only; a plain one with several
gateways bound is refused with the choices, unless the service chooses ``any``; policies may name gateways."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path

from agent.tunnel.client import TunnelOptions
from shared.protocol import ErrorCode
from shared.tunnel.session import TunnelSession
from tests.controller.harness import Running, run, running_controller, store_snapshot
from tests.controller.relay.relay_harness import SCENARIO_TIMEOUT, connect, enrolled, session_credentials
from tests.controller.relay.test_relay_decisions import DIAL_ANSWER_TIMEOUT, Echo, create, dial_refusal


async def echoes(dialer: TunnelSession, service: str) -> None:
    channel = dialer.open_stream(service)
    await asyncio.wait_for(channel.wait_accepted(), DIAL_ANSWER_TIMEOUT)
    await channel.write(b"hi")
    assert await asyncio.wait_for(channel.read(), DIAL_ANSWER_TIMEOUT) == b"hi"
    await channel.end()


async def served_gateways(ctl: Running, since: int) -> list[str]:
    """The gateway each ``dial_served`` row after the first ``since`` audit rows names (waits for the queue)."""
    for _ in range(100):
        rows = store_snapshot(ctl.context.settings.store_path)["audit"][since:]
        served = [json.loads(r[3])["gateway"] for r in rows if r[2] == "dial_served"]
        if served:
            return served
        await asyncio.sleep(0.05)
    return []


def test_aimed_dials_plain_dials_with_choices_and_policies_per_gateway(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl") as ctl, Echo() as one, Echo() as two:
            await create(ctl, "/api/v1/services", {"name": "modbus"})
            await create(ctl, "/api/v1/services", {"name": "historian", "choose": "any"})
            await create(ctl, "/api/v1/policies", {"kind": "bind", "identities": ["role:gateway"],
                                                   "services": ["modbus", "historian"]})
            # Operators reach modbus on gw-1 by name, and on every gateway of role north.
            await create(ctl, "/api/v1/policies", {"kind": "dial", "identities": ["role:operator"],
                                                   "services": ["modbus@gw-1", "modbus@role:north", "historian"]})
            gw1, gw2 = await enrolled(ctl, "gw-1", ["gateway"]), await enrolled(ctl, "gw-2", ["gateway"])
            operator = await session_credentials(ctl)
            async with contextlib.AsyncExitStack() as stack:
                for creds, echo in ((gw1, one), (gw2, two)):
                    await stack.enter_async_context(connect(ctl, creds, TunnelOptions(binds={
                        "modbus": ("127.0.0.1", echo.port), "historian": ("127.0.0.1", echo.port)})))
                dialer, _ = await stack.enter_async_context(connect(ctl, operator))
                refused = await dial_refusal(dialer, "modbus")
                assert refused.code == ErrorCode.SERVICE_UNAVAILABLE
                assert refused.reason == ("service default/modbus is served by 2 gateways; dial one of them: "
                                          "modbus@gw-1 (or let the service choose: outpostctl service create modbus "
                                          "--choose any)")
                refused = await dial_refusal(dialer, "modbus@gw-2")
                assert (refused.code, refused.reason) == (ErrorCode.POLICY_DENIED, "no policy allows identity "
                                                          "default/operator to dial service default/modbus on "
                                                          "gateway default/gw-2")
                refused = await dial_refusal(dialer, "modbus@gw-9")
                assert refused.code == ErrorCode.POLICY_DENIED
                since = len(store_snapshot(ctl.context.settings.store_path)["audit"])
                await echoes(dialer, "modbus@gw-1")
                assert (one.connections, two.connections) == (1, 0)
                assert await served_gateways(ctl, since) == ["default/gw-1"]
                # The explanation is the relay's decision.
                for target, allowed in (("modbus@gw-1", True), ("modbus@gw-2", False)):
                    status, body = await ctl.call(
                        "GET", f"/api/v1/policies/explain?identity=operator&service={target}&kind=dial")
                    assert status == 200 and body["decisions"]["dial"]["allowed"] is allowed, body
                # gw-2 joins role north: now both are choices, and gw-2 is reached by name.
                status, _ = await ctl.call("PATCH", "/api/v1/policies/2", {
                    "services": ["modbus@gw-1", "modbus@role:gateway", "historian"]})
                assert status == 200
                refused = await dial_refusal(dialer, "modbus")
                assert "dial one of them: modbus@gw-1, modbus@gw-2 " in refused.reason
                await echoes(dialer, "modbus@gw-2")
                assert (one.connections, two.connections) == (1, 1)
                # A service that chooses any: a plain dial is served by one of them.
                await echoes(dialer, "historian")
                assert one.connections + two.connections == 3

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))


def test_a_gateway_in_an_identity_selector_is_refused_in_one_sentence(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl") as ctl:
            await create(ctl, "/api/v1/services", {"name": "modbus"})
            status, body = await ctl.call("POST", "/api/v1/policies", {
                "kind": "dial", "identities": ["ops@gw-1"], "services": ["modbus"]})
            assert (status, body["error"]) == (400, "invalid_selector")
            assert body["message"] == "The selector 'ops@gw-1' names a gateway; only a service selector may " \
                                      "(SERVICE@GATEWAY)."
            status, body = await ctl.call("POST", "/api/v1/services", {"name": "x", "choose": "random"})
            assert (status, body["error"]) == (400, "invalid_choose")

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))
