"""A real agent's report reaches the fleet view through a real relay; a bad report harms nothing.

A real controller-plus-relay runs in-process on 127.0.0.1; agents connect
with the agent's own tunnel client and report with the agent's own Reporter.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from agent.tunnel.client import TunnelOptions
from agent.tunnel.report import Reporter, static_facts
from agent.tunnel.status import TunnelStats
from controller.relay import reports as relay_reports
from shared.protocol import Liveness
from shared.protocol.control import MAX_REPORT_BYTES
from shared.protocol.frames import FrameType, encode_frame
from tests.controller.harness import Running, run, running_controller, store_snapshot
from tests.controller.relay.relay_harness import SCENARIO_TIMEOUT, connect, enrolled

WAIT = 5.0


async def fleet_entry(ctl: Running, name: str) -> dict:
    status, body = await ctl.call("GET", f"/api/v1/fleet/{name}")
    assert status == 200, body
    return body


async def until(predicate, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    while loop.time() < deadline:
        if await predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"not within {WAIT} s: {what}")


def stats() -> TunnelStats:
    return TunnelStats(rtt_ms=None, clock_offset_s=0.25, clock_source="ntp", cert_not_after=1_900_000_000.0,
                       next_renewal=1_899_950_000.0, link="metered")


def test_a_report_shows_in_the_fleet_view_and_presence_outlives_the_tunnel(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl") as ctl:
            creds = await enrolled(ctl, "gw-1")
            assert (await fleet_entry(ctl, "gw-1"))["presence"] == "never"
            async with connect(ctl, creds, TunnelOptions(liveness=Liveness(keepalive_interval=540.0))) as (session, _):
                assert session.relay_info.get("reports") is True
                reporter = Reporter(static_facts(creds.uri, "metered", 540.0, "software"))
                assert reporter.offer(session, stats())
                assert not reporter.offer(session, stats())  # nothing changed: nothing sent

                async def reported() -> bool:
                    return (await fleet_entry(ctl, "gw-1"))["agent_version"] is not None
                await until(reported, "the report in the fleet view")
                entry = await fleet_entry(ctl, "gw-1")
                assert entry["presence"] == "online" and entry["relay"] == ctl.server.relay.presence.relay_id
                assert entry["link_profile"] == "metered" and entry["key_backend"] == "software"
                assert entry["clock_offset_s"] == 0.25 and entry["keepalive_s"] == 540.0
                assert entry["next_renewal"] == 1_899_950_000.0 and entry["remote"].startswith("127.0.0.1")
                assert entry["connected_since"] <= entry["last_seen"]
            await until(lambda: _offline(ctl), "offline after the tunnel closed")
        # A restart: the store keeps what the relay flushed at its stop.
        rows = store_snapshot(tmp_path / "ctl" / "store.sqlite3", live=True)["presence"]
        assert [(r[0], r[1], r[3]) for r in rows] == [("default", "gw-1", 0)]
        async with running_controller(tmp_path / "ctl") as again:
            entry = await fleet_entry(again, "gw-1")
            assert entry["presence"] == "offline" and entry["last_seen"] is not None
            assert entry["agent_version"] is not None and entry["rtt_ms"] is None

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))


async def _offline(ctl: Running) -> bool:
    return (await fleet_entry(ctl, "gw-1"))["presence"] == "offline"


def test_bad_reports_are_refused_counted_audited_once_and_the_tunnel_lives(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl") as ctl:
            creds = await enrolled(ctl, "gw-1")
            other = await enrolled(ctl, "gw-2")
            before = sum(relay_reports.refused_reports.values())
            async with connect(ctl, creds) as (session, _):
                bad = [
                    encode_frame(FrameType.REPORT, 0, 0, b"{" + b" " * MAX_REPORT_BYTES + b"}"),
                    encode_frame(FrameType.REPORT, 0, 0, b"not json"),
                    encode_frame(FrameType.REPORT, 0, 0, json.dumps({"identity": other.uri,
                                                                     "agent_version": "evil"}).encode()),
                ] * 20
                for frame in bad:
                    await session.transport.send(frame)
                good = Reporter(static_facts(creds.uri, "ethernet", 25.0, "software"))
                assert good.offer(session, stats())

                async def reported() -> bool:
                    return (await fleet_entry(ctl, "gw-1"))["agent_version"] is not None
                await until(reported, "the good report after the bad ones")
                assert not session.conn.closed
                entry = await fleet_entry(ctl, "gw-1")
                assert entry["agent_version"] != "evil" and entry["presence"] == "online"
                assert (await fleet_entry(ctl, "gw-2"))["agent_version"] is None
            assert sum(relay_reports.refused_reports.values()) - before == len(bad)

            async def audited() -> bool:
                rows = store_snapshot(ctl.context.settings.store_path)["audit"]
                return any(r[2] == "report_refused" for r in rows)
            await until(audited, "report_refused audited")
            rows = [r for r in store_snapshot(ctl.context.settings.store_path)["audit"] if r[2] == "report_refused"]
            fields = json.loads(rows[0][3])
            assert len(rows) == 1 and fields["identity"] == "default/gw-1" and "more than 2048" in fields["reason"]

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))


def test_a_silent_gateway_is_overdue_while_the_relay_holds_its_socket(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl") as ctl:
            creds = await enrolled(ctl, "gw-1")
            async with connect(ctl, creds, TunnelOptions(liveness=Liveness(keepalive_interval=1.0))) as (session, _):
                session.conn.set_liveness(Liveness(keepalive_interval=None))  # it announced 1 s, then goes silent
                assert (await fleet_entry(ctl, "gw-1"))["presence"] == "online"

                async def overdue() -> bool:
                    return (await fleet_entry(ctl, "gw-1"))["presence"] == "overdue"
                await until(overdue, "overdue after two keepalives of silence")
                assert not session.conn.closed  # the relay still holds it (idle timeout: 10 s)
                status, body = await ctl.call("GET", "/api/v1/fleet?presence=overdue")
                assert [e["name"] for e in body["identities"]] == ["gw-1"]

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))


def test_fleet_filters_refuse_bad_values_in_one_sentence(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl") as ctl:
            for query, code, words in [
                ("presence=asleep", "invalid_presence", "Unknown presence 'asleep'; use one or more of online"),
                ("expiring_within=soon", "invalid_expiring_within", "must be a number of seconds"),
                ("expiring_within=-5", "invalid_expiring_within", "must be a number of seconds"),
                ("expiring_within=nan", "invalid_expiring_within", "must be a number of seconds"),
                ("offline=1", "invalid_parameter", "Unknown query parameter 'offline'"),
                ("tenant=Bad%20Name", "invalid_name", ""),
            ]:
                status, body = await ctl.call("GET", f"/api/v1/fleet?{query}")
                assert status == 400, (query, body)
                assert body["error"] == code or code == "invalid_name", (query, body)
                assert words in body["message"] and "\n" not in body["message"]
            status, body = await ctl.call("GET", "/api/v1/fleet/nobody")
            assert status == 404 and "There is no identity default/nobody" in body["message"]

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))


def test_two_processes_on_one_store_see_each_others_gateways(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl") as first, running_controller(tmp_path / "ctl") as second:
            creds = await enrolled(first, "gw-1")
            async with connect(first, creds, TunnelOptions(liveness=Liveness(keepalive_interval=540.0))) as (session, _):
                Reporter(static_facts(creds.uri, "metered", 540.0, "software")).offer(session, stats())

                async def reported() -> bool:
                    return (await fleet_entry(first, "gw-1"))["agent_version"] is not None
                await until(reported, "the report on the first process")
                await first.server.relay.presence.flush()  # the batch the first process writes every 30 s
                entry = await fleet_entry(second, "gw-1")
                assert entry["presence"] == "online" and entry["relay"] == first.server.relay.presence.relay_id
                assert entry["agent_version"] is not None and entry["link_profile"] == "metered"
                assert second.server.relay.presence.relay_id != entry["relay"]
            await until(lambda: _offline(first), "offline on the first process")
            await first.server.relay.presence.flush()
            entry = await fleet_entry(second, "gw-1")
            assert entry["presence"] == "offline" and entry["last_seen"] is not None

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))
