"""Tenants are apart at the relay: only a policy of the service's tenant opens it, and an agent's
``[[dial]]`` names another tenant's service as ``TENANT/SERVICE``.

A real controller (TLS, relay mounted) on 127.0.0.1; the binder and the
dialer are the agent's own tunnel client, the dial the agent's own listener
built from a parsed agent config, the service a real TCP echo server.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

from agent.config_file import load_config
from agent.services.forward import DialListener
from agent.tunnel.client import TunnelOptions
from shared.protocol import ErrorCode
from tests.controller.harness import Running, audit_events_added, run, running_controller
from tests.controller.relay.relay_harness import SCENARIO_TIMEOUT, connect, enrolled, redeem
from tests.controller.relay.test_relay_decisions import Echo, create, dial_refusal, snapshot

#: One echo through the dial answers within this on loopback, even on a loaded machine.
ECHO_TIMEOUT = 10.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def acme_scada(ctl: Running, echo: Echo):
    """``acme/scada``, bound by the acme gateway ``gw-b1`` (a policy of acme lets it bind)."""
    await create(ctl, "/api/v1/services", {"name": "scada", "tenant": "acme"})
    await create(ctl, "/api/v1/policies",
                 {"kind": "bind", "tenant": "acme", "identities": ["gw-b1"], "services": ["scada"]})
    created = await ctl.create_identity("gw-b1", ["gateway"], tenant="acme")
    binder = await redeem(ctl, created["token"], "gw-b1")
    return connect(ctl, binder, TunnelOptions(binds={"scada": ("127.0.0.1", echo.port)}))


async def echo_through(dial: DialListener, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(dial.host, dial.port)
    try:
        writer.write(payload)
        await writer.drain()
        return await asyncio.wait_for(reader.readexactly(len(payload)), ECHO_TIMEOUT)
    finally:
        writer.close()


def test_a_policy_of_another_tenant_cannot_open_acme_scada_and_the_dial_says_why(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl") as ctl, Echo() as echo:
            dialer = await enrolled(ctl, "gw-d")
            status, refused = await ctl.call("POST", "/api/v1/policies", {
                "kind": "dial", "tenant": "default", "identities": ["gw-d"], "services": ["acme/scada"]})
            assert status == 400 and refused["error"] == "cross_tenant_service"
            assert "outpostctl policy create --tenant acme --kind dial --identities default/gw-d" in refused["message"]
            status, listed = await ctl.call("GET", "/api/v1/policies")
            assert listed["policies"] == []
            async with await acme_scada(ctl, echo) as (binder, _), connect(ctl, dialer) as (session, _):
                assert binder.bound == ("scada",)
                before = snapshot(ctl)
                denied = await dial_refusal(session, "acme/scada")
                reason = "no policy allows identity default/gw-d to dial service acme/scada"
                assert (denied.code, denied.reason) == (ErrorCode.POLICY_DENIED, reason)
                assert audit_events_added(before, snapshot(ctl)) == [
                    ("dial_requested", {"identity": "default/gw-d", "service": "acme/scada", "requested": "acme/scada",
                                        "remote": "127.0.0.1"}),
                    ("dial_denied", {"identity": "default/gw-d", "service": "acme/scada", "reason": reason})]
            assert echo.connections == 0

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))


def test_an_agents_dial_of_acme_scada_reaches_it_when_a_policy_of_acme_lets_default_in(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl") as ctl, Echo() as echo:
            dialer = await enrolled(ctl, "gw-d")
            await create(ctl, "/api/v1/policies",
                         {"kind": "dial", "tenant": "acme", "identities": ["default/gw-d"], "services": ["scada"]})
            config_file = tmp_path / "agent.toml"
            config_file.write_text(f'[[dial]]\nservice = "acme/scada"\nlisten = "127.0.0.1:{free_port()}"\n')
            [wanted] = load_config(config_file).dials
            async with await acme_scada(ctl, echo) as _, connect(ctl, dialer) as (session, _):
                dial = DialListener(wanted.service, wanted.listen_host, wanted.listen_port, lambda: session)
                await dial.start()
                try:
                    before = snapshot(ctl)
                    assert await echo_through(dial, b"read coils 1-8") == b"read coils 1-8"
                    assert dial.last_error is None
                finally:
                    await dial.close()
                decided = [(e, f) for e, f in audit_events_added(before, snapshot(ctl)) if e == "dial_allowed"]
                assert decided == [("dial_allowed", {"identity": "default/gw-d", "service": "acme/scada",
                                                     "reason": decided[0][1]["reason"],
                                                     "policy": decided[0][1]["policy"]})]
                assert decided[0][1]["reason"] == f"allowed by policy {decided[0][1]['policy']}"
            assert echo.connections == 1

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))


def test_a_bare_service_name_means_the_dialers_own_tenant(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl") as ctl, Echo() as echo:
            dialer = await enrolled(ctl, "gw-d")
            await create(ctl, "/api/v1/policies",
                         {"kind": "dial", "tenant": "acme", "identities": ["default/gw-d"], "services": ["scada"]})
            async with await acme_scada(ctl, echo) as _, connect(ctl, dialer) as (session, _):
                denied = await dial_refusal(session, "scada")
                assert (denied.code, denied.reason) == (ErrorCode.SERVICE_UNKNOWN, "no service named default/scada")
            assert echo.connections == 0

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))
