"""What ``policy explain`` says is what the relay does: the same function decides both."""

from __future__ import annotations

import asyncio
from pathlib import Path

from agent.tunnel.client import TunnelOptions
from tests.controller.harness import run, running_controller
from tests.controller.relay.relay_harness import SCENARIO_TIMEOUT, connect, enrolled


def test_the_relays_bind_decisions_match_the_explanations(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl") as ctl:
            creds = await enrolled(ctl, "gw-x", ["gateway"])
            for name, roles in (("s-role", ["plc"]), ("s-name", []), ("s-none", []), ("s-dial-only", [])):
                status, _ = await ctl.call("POST", "/api/v1/services", {"name": name, "roles": roles})
                assert status == 201
            for kind, identities, services in (("bind", ["role:gateway"], ["role:plc"]),
                                               ("bind", ["gw-x"], ["s-name"]),
                                               ("dial", ["gw-x"], ["s-dial-only"])):
                status, _ = await ctl.call("POST", "/api/v1/policies",
                                           {"kind": kind, "identities": identities, "services": services})
                assert status == 201
            names = ["s-role", "s-name", "s-none", "s-dial-only", "s-missing"]
            explained = {}
            for name in names:
                status, body = await ctl.call("GET", f"/api/v1/policies/explain?identity=gw-x&service={name}"
                                                     "&kind=bind")
                assert status == 200, body
                explained[name] = body["decisions"]["bind"]
            async with connect(ctl, creds, TunnelOptions(binds={n: ("127.0.0.1", 9) for n in names})) as (session, _):
                for name in names:
                    assert (name in session.bound) == explained[name]["allowed"], name
                    if name in session.refused:
                        assert session.refused[name] == explained[name]["reason"]
            assert set(session.bound) == {"s-role", "s-name"}
            status, body = await ctl.call("GET", "/api/v1/policies/explain?identity=gw-x&service=s-x&color=red")
            assert status == 400 and "Unknown query parameter 'color'" in body["message"]
            status, body = await ctl.call("GET", "/api/v1/policies/explain?identity=gw-x")
            assert status == 400 and "Name the identity and the service" in body["message"]
            status, body = await ctl.call("GET", "/api/v1/policies/explain?identity=gw-x&service=s&kind=open")
            assert status == 400 and body["error"] == "invalid_kind"

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))
