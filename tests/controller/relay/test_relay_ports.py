"""A service declares its ports; a policy allows a subset; the gateway's bind maps each port to its own target."""

from __future__ import annotations

import asyncio
from pathlib import Path

from agent.tunnel.client import TunnelOptions
from shared.protocol import ErrorCode
from tests.controller.harness import run, running_controller
from tests.controller.relay.relay_harness import SCENARIO_TIMEOUT, connect, enrolled, session_credentials
from tests.controller.relay.test_relay_aimed import echoes
from tests.controller.relay.test_relay_decisions import Echo, create, dial_refusal


def test_a_policy_allows_a_subset_of_a_services_ports_and_each_reaches_its_own_target(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl") as ctl, Echo() as modbus, Echo() as config:
            await create(ctl, "/api/v1/services", {"name": "plc", "ports": [502, 1502]})
            await create(ctl, "/api/v1/policies", {"kind": "bind", "identities": ["role:gateway"], "services": ["plc"]})
            status, policy = await ctl.call("POST", "/api/v1/policies", {
                "kind": "dial", "identities": ["role:operator"], "services": ["plc:502"]})
            assert status == 201 and policy["services"] == ["plc:502"], policy
            gateway = await enrolled(ctl, "gw-1", ["gateway"])
            operator = await session_credentials(ctl)
            binds = TunnelOptions(binds={"plc": ("127.0.0.1", modbus.port), "plc:502": ("127.0.0.1", modbus.port),
                                         "plc:1502": ("127.0.0.1", config.port)})
            async with connect(ctl, gateway, binds) as (binder, _), connect(ctl, operator) as (dialer, _):
                assert binder.bound == ("plc",) and binder.refused == {}
                await echoes(dialer, "plc:502")
                assert (modbus.connections, config.connections) == (1, 0)
                refused = await dial_refusal(dialer, "plc:1502")
                assert (refused.code, refused.reason) == (ErrorCode.POLICY_DENIED, "no policy allows identity "
                                                          "default/operator to dial service default/plc port 1502")
                refused = await dial_refusal(dialer, "plc:9")
                assert (refused.code, refused.reason) == (ErrorCode.SERVICE_UNKNOWN,
                                                          "service default/plc has no port 9; its ports: 502, 1502")
                refused = await dial_refusal(dialer, "plc")  # the policy opens port 502 only
                assert refused.code == ErrorCode.POLICY_DENIED
                status, _ = await ctl.call("PATCH", f"/api/v1/policies/{policy['id']}",
                                           {"services": ["plc:502", "plc:1502@gw-1"]})
                assert status == 200
                await echoes(dialer, "plc:1502@gw-1")
                assert (modbus.connections, config.connections) == (1, 1)
            status, body = await ctl.call("POST", "/api/v1/services", {"name": "bad", "ports": [502, 502]})
            assert (status, body["error"]) == (400, "invalid_ports")

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))
