"""Every attempt's audit events share one correlation id: a dial's story, a tunnel's, an enrollment's, an action's."""

from __future__ import annotations

import asyncio
import json
import os
import socket
from pathlib import Path

from agent.tunnel.client import TunnelOptions
from shared.tunnel.channel import ChannelReset
from tests.controller.harness import Running, make_key, run, running_controller, store_snapshot
from tests.controller.relay.relay_harness import (
    AUDIT_ROW_WAIT,
    SCENARIO_TIMEOUT,
    connect,
    enrolled,
    session_credentials,
    tunnel_closed_recorded,
)
from tests.controller.relay.test_relay_decisions import DIAL_ANSWER_TIMEOUT, Echo, create

PAYLOAD = b"read holding registers 40001-40010"


def events(ctl: Running) -> list[tuple[int, str, dict]]:
    return [(row[0], row[2], json.loads(row[3])) for row in store_snapshot(ctl.context.settings.store_path)["audit"]]


async def story(ctl: Running, correlation: str, last: str) -> list[tuple[str, dict]]:
    """The events of ``correlation`` once ``last`` is among them (the relay writes some in a worker thread)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + AUDIT_ROW_WAIT
    while True:
        found = [(event, fields) for _, event, fields in events(ctl) if fields.get("correlation") == correlation]
        if any(event == last for event, _ in found) or loop.time() > deadline:
            return found
        await asyncio.sleep(0.05)


def connection_id(ctl: Running, service: str) -> str:
    [cid] = [f["correlation"] for _, e, f in events(ctl) if e == "dial_requested" and f["service"] == service][-1:]
    return cid


async def modbus_for_operators(ctl: Running) -> None:
    await create(ctl, "/api/v1/services", {"name": "modbus"})
    for kind, who in (("bind", "gw-host"), ("dial", "role:operator")):
        await create(ctl, "/api/v1/policies", {"kind": kind, "identities": [who], "services": ["modbus"]})


def test_an_allowed_dial_that_carries_bytes_is_requested_decided_served_and_closed_under_one_id(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl") as ctl, Echo() as echo:
            await modbus_for_operators(ctl)
            host = await enrolled(ctl, "gw-host")
            async with connect(ctl, host, TunnelOptions(binds={"modbus": ("127.0.0.1", echo.port)})) as (binder, _), \
                    connect(ctl, await session_credentials(ctl)) as (dialer, _):
                assert binder.bound == ("modbus",)
                channel = dialer.open_stream("modbus")
                await asyncio.wait_for(channel.wait_accepted(), DIAL_ANSWER_TIMEOUT)
                await channel.write(PAYLOAD)
                echoed = b""
                while len(echoed) < len(PAYLOAD):
                    echoed += await asyncio.wait_for(channel.read(), DIAL_ANSWER_TIMEOUT)
                await channel.end()  # the dialer ends first; the echo follows
                assert await asyncio.wait_for(channel.read(), DIAL_ANSWER_TIMEOUT) == b""
                cid = connection_id(ctl, "default/modbus")
                told = await story(ctl, cid, "dial_closed")
            assert echoed == PAYLOAD and cid.startswith("c-")
            assert [event for event, _ in told] == ["dial_requested", "dial_allowed", "dial_served", "dial_closed"]
            requested, allowed, served, closed = (fields for _, fields in told)
            assert all(f["identity"] == "default/operator" and f["service"] == "default/modbus" for _, f in told)
            assert requested["remote"] == "127.0.0.1" and requested["relay"] == f"{socket.gethostname()}/{os.getpid()}"
            assert allowed["reason"] == f"allowed by policy {allowed['policy']}"
            assert served["gateway"] == "default/gw-host" and served["relay"] == requested["relay"]
            assert (closed["bytes_up"], closed["bytes_down"]) == (len(PAYLOAD), len(PAYLOAD))
            assert closed["closed_by"] == "dialer" and closed["reason"] == "ended" and closed["duration_s"] >= 0

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))


def test_an_allowed_dial_that_then_fails_says_why_under_its_connection_id(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl") as ctl:
            await modbus_for_operators(ctl)  # allowed, but no gateway hosts it
            async with connect(ctl, await session_credentials(ctl)) as (dialer, _):
                channel = dialer.open_stream("modbus")
                try:
                    await asyncio.wait_for(channel.wait_accepted(), DIAL_ANSWER_TIMEOUT)
                    raise AssertionError("the dial was accepted")
                except ChannelReset as refused:
                    assert refused.reason == "no gateway hosting default/modbus is connected"
                told = await story(ctl, connection_id(ctl, "default/modbus"), "dial_failed")
            assert [event for event, _ in told] == ["dial_requested", "dial_allowed", "dial_failed"]
            assert told[-1][1]["reason"] == "no gateway hosting default/modbus is connected"

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))


def test_a_tunnels_events_share_its_id_and_name_the_identity_one_way(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl") as ctl:
            await create(ctl, "/api/v1/services", {"name": "modbus"})
            gateway = await enrolled(ctl, "gw-t")
            async with connect(ctl, gateway, TunnelOptions(binds={"modbus": ("127.0.0.1", 9)})) as (session, _):
                assert session.refused
            await tunnel_closed_recorded(ctl, "gw-t")
            mine = [(e, f) for _, e, f in events(ctl) if f.get("identity") == "default/gw-t"]
            by_event = {e: f for e, f in mine}
            assert {"enrollment", "tunnel_connected", "bind_denied", "tunnel_closed"} <= set(by_event)
            tunnel = by_event["tunnel_connected"]["correlation"]
            assert tunnel.startswith("t-")
            assert by_event["bind_denied"]["correlation"] == by_event["tunnel_closed"]["correlation"] == tunnel
            assert by_event["enrollment"]["correlation"].startswith("e-")
            closed = by_event["tunnel_closed"]
            assert closed["bytes_in"] > 0 and closed["bytes_out"] > 0 and closed["closed_by"] == "agent"

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))


def test_a_management_action_names_the_actor_and_the_address_it_came_from(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl") as ctl:
            await ctl.create_identity("gw-m")
            status, body = await ctl.call("POST", "/api/v1/identities/gw-m/revoke")
            assert status == 200, body
            mine = [(e, f) for _, e, f in events(ctl) if f.get("identity") == "default/gw-m"]
            assert [e for e, _ in mine] == ["identity_created", "token_created", "identity_revoked"]
            for _, fields in mine:
                assert (fields["actor"], fields["actor_kind"], fields["actor_role"], fields["remote"]) == (
                    "admin", "admin", "admin", "127.0.0.1")
                assert fields["correlation"].startswith("m-")
            # One request, one id: the identity and its first token were created by the same action.
            assert mine[0][1]["correlation"] == mine[1][1]["correlation"] != mine[2][1]["correlation"]

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))


def test_a_refused_enrollment_is_anonymous_and_carries_its_own_id(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl") as ctl:
            status, _ = await ctl.enroll("not-a-token", make_key())
            assert status == 401 or status == 400
            [(event, fields)] = [(e, f) for _, e, f in events(ctl) if e == "enrollment_refused"]
            assert fields["correlation"].startswith("e-") and "actor" not in fields

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))


def test_tunnels_closed_by_a_revocation_keep_their_own_id_and_not_the_actors_address(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl") as ctl:
            gateway = await enrolled(ctl, "gw-r")
            async with connect(ctl, gateway) as (session, _):
                status, body = await ctl.call("POST", "/api/v1/identities/gw-r/revoke")
                assert status == 200, body
                await tunnel_closed_recorded(ctl, "gw-r")
            by_event = {e: f for _, e, f in events(ctl) if f.get("identity") == "default/gw-r"}
            revoked, closed = by_event["identity_revoked"], by_event["tunnel_closed"]
            assert revoked["actor"] == "admin" and revoked["correlation"].startswith("m-")
            assert closed["correlation"] == by_event["tunnel_connected"]["correlation"]
            assert not {"actor", "remote"} & set(closed), closed

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))
