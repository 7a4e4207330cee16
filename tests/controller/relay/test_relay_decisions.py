"""Every bind and dial is decided at the relay: refused ones say why, reach nothing, change nothing but the audit.

A real controller (TLS, relay mounted) runs in-process on 127.0.0.1; the
binder and the dialer are the agent's own tunnel client, the service a real
TCP server on loopback.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agent.errors import TunnelRefused
from agent.tunnel.client import TunnelOptions
from shared.protocol import ErrorCode
from shared.tunnel.session import ChannelReset, TunnelSession
from tests.controller.harness import (
    Running,
    audit_correlations_added,
    audit_events_added,
    run,
    running_controller,
    store_snapshot,
)
from tests.controller.relay.relay_harness import (
    SCENARIO_TIMEOUT,
    connect,
    enrolled,
    redeem,
    session_credentials,
    tunnel_closed_recorded,
)

#: A dial's answer (accept or reset) comes back within this; the relay decides at once.
DIAL_ANSWER_TIMEOUT = 10.0


class Echo:
    """A TCP service on 127.0.0.1 that echoes and counts the connections it gets."""

    def __init__(self) -> None:
        self.connections = 0
        self.server: asyncio.base_events.Server | None = None
        self.port = 0

    async def __aenter__(self) -> Echo:
        self.server = await asyncio.start_server(self._echo, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def _echo(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()


def snapshot(ctl: Running) -> dict:
    return store_snapshot(ctl.context.settings.store_path)


async def tunnels(ctl: Running) -> list[tuple[str, list[str]]]:
    """(identity, bound services) of every tunnel the relay holds."""
    status, body = await ctl.call("GET", "/api/v1/status")
    assert status == 200, body
    return sorted((t["identity"], sorted(t["bound"])) for t in body["tunnels"])


async def dial_refusal(dialer: TunnelSession, service: str) -> ChannelReset:
    """Open a stream to ``service`` and return how the relay refused it (fails if it was accepted)."""
    channel = dialer.open_stream(service)
    with pytest.raises(ChannelReset) as refused:
        await asyncio.wait_for(channel.wait_accepted(), DIAL_ANSWER_TIMEOUT)
    return refused.value


async def create(ctl: Running, path: str, body: dict) -> None:
    status, answer = await ctl.call("POST", path, body)
    assert status == 201, answer


def test_a_denied_bind_tells_the_binder_why_leaves_the_service_unreachable_and_is_audited(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl") as ctl, Echo() as echo:
            await create(ctl, "/api/v1/services", {"name": "modbus"})
            await create(ctl, "/api/v1/policies", {"kind": "dial", "identities": ["role:operator"], "services": ["modbus"]})
            gateway = await enrolled(ctl, "gw-a")
            operator = await session_credentials(ctl)
            before = snapshot(ctl)
            binds = TunnelOptions(binds={"modbus": ("127.0.0.1", echo.port)})
            async with connect(ctl, gateway, binds) as (binder, _), connect(ctl, operator) as (dialer, _):
                reason = "no policy allows identity default/gw-a to bind service default/modbus"
                assert (binder.bound, binder.refused) == ((), {"modbus": reason})
                assert await tunnels(ctl) == [(gateway.uri, []), (operator.uri, [])]
                refused = await dial_refusal(dialer, "modbus")
                assert (refused.code, refused.reason) == (
                    ErrorCode.SERVICE_UNAVAILABLE, "no gateway hosting default/modbus is connected"
                )
                assert not binder.conn.closed and not dialer.conn.closed
            added = audit_events_added(before, snapshot(ctl))
            binds_decided = [(event, fields) for event, fields in added if event.startswith("bind_")]
            assert binds_decided == [("bind_denied", {"identity": "default/gw-a", "service": "default/modbus",
                                                      "reason": reason})]
            assert echo.connections == 0

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))


@pytest.mark.parametrize(
    ("service", "dial_policy", "code", "reason"),
    [
        ("no-such-service", True, ErrorCode.SERVICE_UNKNOWN, "no service named default/no-such-service"),
        ("modbus", False, ErrorCode.POLICY_DENIED,
         "no policy allows identity default/operator to dial service default/modbus"),
    ],
    ids=["unknown_service", "no_dial_policy"],
)
def test_a_refused_dial_says_why_reaches_nothing_and_changes_nothing_but_one_audit_event(
    tmp_path: Path, service: str, dial_policy: bool, code: ErrorCode, reason: str
) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl") as ctl, Echo() as echo:
            await create(ctl, "/api/v1/services", {"name": "modbus"})
            await create(ctl, "/api/v1/policies", {"kind": "bind", "identities": ["gw-b"], "services": ["modbus"]})
            if dial_policy:
                await create(ctl, "/api/v1/policies",
                             {"kind": "dial", "identities": ["role:operator"], "services": ["modbus"]})
            gateway = await enrolled(ctl, "gw-b")
            binds = TunnelOptions(binds={"modbus": ("127.0.0.1", echo.port)})
            async with connect(ctl, gateway, binds) as (binder, _), \
                    connect(ctl, await session_credentials(ctl)) as (dialer, _):
                assert binder.bound == ("modbus",)
                before, held = snapshot(ctl), await tunnels(ctl)
                refused = await dial_refusal(dialer, service)
                assert (refused.code, refused.reason) == (code, reason)
                # The request and its decision, under one connection id; nothing served, nothing to close.
                after = snapshot(ctl)
                assert audit_events_added(before, after) == [
                    ("dial_requested", {"identity": "default/operator", "service": f"default/{service}",
                                        "requested": service, "remote": "127.0.0.1"}),
                    ("dial_denied", {"identity": "default/operator", "service": f"default/{service}",
                                     "reason": reason}),
                ]
                [(_, requested), (_, decided)] = audit_correlations_added(before, after)
                assert requested == decided and requested.startswith("c-")
                assert await tunnels(ctl) == held  # both tunnels up, the binding in place
                assert not binder.conn.closed and not dialer.conn.closed
            assert echo.connections == 0

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))


def test_a_session_certificate_may_dial_but_its_bind_is_refused_whatever_the_policies_say(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl") as ctl, Echo() as echo:
            await create(ctl, "/api/v1/services", {"name": "modbus"})
            for kind in ("bind", "dial"):
                await create(ctl, "/api/v1/policies",
                             {"kind": kind, "identities": ["role:operator"], "services": ["modbus"]})
            operator = await session_credentials(ctl)
            before = snapshot(ctl)
            async with connect(ctl, operator, TunnelOptions(binds={"modbus": ("127.0.0.1", echo.port)})) as (held, _):
                reason = ("identity default/operator holds a session certificate, which may dial but never bind; "
                          "bind from an agent enrolled with a token")
                assert (held.bound, held.refused) == ((), {"modbus": reason})
                assert await tunnels(ctl) == [(operator.uri, [])]
            decided = [(e, f) for e, f in audit_events_added(before, snapshot(ctl)) if e.startswith("bind_")]
            assert decided == [("bind_denied", {"identity": "default/operator", "service": "default/modbus",
                                                "reason": reason})]
            assert echo.connections == 0

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))


def test_a_session_certificate_issued_before_its_identity_enrolled_gets_no_tunnel_afterwards(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl") as ctl:
            token = (await ctl.create_identity("gw-c", ["gateway"]))["token"]
            early = await session_credentials(ctl, "gw-c")
            async with connect(ctl, early) as (session, _):
                assert session.relay_info["identity"] == early.uri

            gateway = await redeem(ctl, token, "gw-c")
            await tunnel_closed_recorded(ctl, "gw-c")
            before = snapshot(ctl)
            with pytest.raises(TunnelRefused, match="is enrolled with a device key; a session certificate cannot act as it"):
                async with connect(ctl, early):
                    pass
            added = audit_events_added(before, snapshot(ctl))
            assert [(e, f["reason"]) for e, f in added] == [
                ("tunnel_refused", "identity default/gw-c is enrolled with a device key; "
                                   "a session certificate cannot act as it")
            ]
            async with connect(ctl, gateway) as (session, _):  # the device key still can
                assert session.relay_info["identity"] == gateway.uri

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))
