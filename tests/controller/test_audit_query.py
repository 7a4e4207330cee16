"""``/api/v1/audit`` and ``/api/v1/connections``: filters, paging past the newest 1,000, follow, bad input."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from agent.tunnel.client import TunnelOptions
from controller.audit_api import MAX_FOLLOWERS
from controller.audit_query import parse_since
from controller.errors import ControllerError
from tests.controller.harness import Running, run, running_controller
from tests.controller.relay.relay_harness import SCENARIO_TIMEOUT, connect, enrolled, session_credentials
from tests.controller.relay.test_relay_decisions import DIAL_ANSWER_TIMEOUT, Echo, create, dial_refusal
from tests.controller.test_audit_correlation import PAYLOAD, modbus_for_operators, story

#: More events than the largest page, so the oldest are reachable only by paging.
MANY_EVENTS = 1_250


async def get(ctl: Running, path: str) -> tuple[int, dict]:
    return await ctl.call("GET", path)


def test_unknown_parameters_and_bad_values_are_one_sentence_400s(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl") as ctl:
            for path, code in [
                ("/api/v1/audit?identiy=gw", "unknown_parameter"),
                ("/api/v1/connections?correlation=c-00", "unknown_parameter"),
                ("/api/v1/audit?since=yesterday-ish", "invalid_since"),
                ("/api/v1/connections?since=2999-01-01T00:00:00Z", "since_in_future"),
                ("/api/v1/audit?limit=0", "invalid_limit"),
                ("/api/v1/audit?before=-3", "invalid_before"),
                ("/api/v1/audit?before=99999999999999999999999", "invalid_before"),
                ("/api/v1/audit?after=99999999999999999999999&wait=1", "invalid_after"),
                ("/api/v1/connections?limit=99999999999999999999999", "invalid_limit"),
                ("/api/v1/audit?since=nan", "invalid_since"),
                ("/api/v1/audit?since=inf", "invalid_since"),
                ("/api/v1/audit?denied=maybe", "invalid_denied"),
                ("/api/v1/audit?identity=../etc", "invalid_name"),
                ("/api/v1/audit?wait=5", "wait_without_after"),
                ("/api/v1/audit?after=0&wait=3600", "invalid_wait"),
                ("/api/v1/audit?correlation=DROP%20TABLE", "invalid_correlation"),
            ]:
                status, body = await get(ctl, path)
                assert (status, body["error"]) == (400, code), (path, body)
                assert body["message"].count(".") <= 3 and "\n" not in body["message"], body

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))


def test_since_takes_a_duration_an_iso_time_or_a_unix_time() -> None:
    now = 1_800_000_000.0
    assert parse_since("15m", now) == now - 900
    assert parse_since("2026-12-06T10:00:00Z", now) == parse_since("2026-12-06T10:00:00", now) == 1796551200.0
    assert parse_since("1700000000", now) == 1_700_000_000.0
    for bad in ("15 minutes", "-5m", "", "1e400x"):
        with pytest.raises(ControllerError):
            parse_since(bad, now)


def test_paging_reaches_past_the_newest_thousand_and_filters_use_the_columns(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl") as ctl:
            audit = ctl.context.audit
            audit.record_many([("service_created", {"service": f"default/s{i}", "roles": []})
                               for i in range(MANY_EVENTS)])
            seen: list[int] = []
            cursor = ""
            for _ in range(5):  # bounded: two full pages and the rest
                status, page = await get(ctl, f"/api/v1/audit?limit=1000{cursor}")
                assert status == 200, page
                seen = [e["id"] for e in page["events"]] + seen
                if page["next_before"] is None:
                    break
                cursor = f"&before={page['next_before']}"
            assert seen == sorted(set(seen)) and len(seen) >= MANY_EVENTS  # every event once, in order
            status, page = await get(ctl, "/api/v1/audit?service=s7")
            assert [e["fields"]["service"] for e in page["events"]] == ["default/s7"]
            status, page = await get(ctl, "/api/v1/audit?since=1h&identity=nobody")
            assert page["events"] == [] and page["next_before"] is None

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT * 2))


def test_follow_answers_as_soon_as_an_event_is_recorded_and_waits_no_longer_than_asked(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl") as ctl:
            status, page = await get(ctl, "/api/v1/audit?limit=1")
            last = page["last_id"]
            started = time.monotonic()
            status, page = await get(ctl, f"/api/v1/audit?after={last}&wait=1")
            assert (status, page["events"]) == (200, []) and 0.9 <= time.monotonic() - started < 5
            waiting = asyncio.ensure_future(get(ctl, f"/api/v1/audit?after={last}&wait=20"))
            await asyncio.sleep(0.3)
            started = time.monotonic()
            await ctl.create_identity("gw-followed")
            status, page = await waiting
            assert time.monotonic() - started < 5
            assert [e["event"] for e in page["events"]][:1] == ["identity_created"]
            assert page["last_id"] == page["events"][-1]["id"]

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))


def test_connections_say_who_reached_what_through_which_policy_for_how_long_and_how_many_bytes(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl") as ctl, Echo() as echo:
            await modbus_for_operators(ctl)
            await create(ctl, "/api/v1/services", {"name": "historian"})
            host = await enrolled(ctl, "gw-host")
            async with connect(ctl, host, TunnelOptions(binds={"modbus": ("127.0.0.1", echo.port)})), \
                    connect(ctl, await session_credentials(ctl)) as (dialer, _):
                channel = dialer.open_stream("modbus")
                await asyncio.wait_for(channel.wait_accepted(), DIAL_ANSWER_TIMEOUT)
                await channel.write(PAYLOAD)
                got = b""
                while len(got) < len(PAYLOAD):
                    got += await asyncio.wait_for(channel.read(), DIAL_ANSWER_TIMEOUT)
                channel.reset()
                await dial_refusal(dialer, "historian")
                status, page = await get(ctl, "/api/v1/connections")
                assert status == 200, page
                allowed = next(c for c in page["connections"] if c["service"] == "default/modbus")
                await story(ctl, allowed["id"], "dial_closed")
            status, page = await get(ctl, "/api/v1/connections?identity=operator")
            denied, closed = page["connections"]  # newest first
            assert (denied["service"], denied["outcome"], denied["policy"]) == ("default/historian", "denied", None)
            assert (closed["identity"], closed["outcome"], closed["gateway"]) == (
                "default/operator", "closed", "default/gw-host")
            assert closed["policy"] is not None and closed["bytes_up"] == closed["bytes_down"] == len(PAYLOAD)
            assert closed["closed_by"] == "dialer" and closed["duration_s"] >= 0
            status, only = await get(ctl, "/api/v1/connections?denied=true")
            assert [c["id"] for c in only["connections"]] == [denied["id"]]
            status, other = await get(ctl, "/api/v1/connections?service=modbus&identity=gw-host")
            assert other["connections"] == []
            status, story_page = await get(ctl, f"/api/v1/audit?correlation={closed['id']}")
            assert [e["event"] for e in story_page["events"]] == [
                "dial_requested", "dial_allowed", "dial_served", "dial_closed"]

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))


def test_followers_past_the_bound_are_told_to_slow_down_and_the_others_still_answer(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl") as ctl:
            status, page = await get(ctl, "/api/v1/audit?limit=1")
            after = page["last_id"]
            follows = {asyncio.ensure_future(get(ctl, f"/api/v1/audit?after={after}&wait=20"))
                       for _ in range(MAX_FOLLOWERS + 1)}
            # The others wait for an event: the first to answer is the one past the bound.
            done, waiting = await asyncio.wait(follows, timeout=10, return_when=asyncio.FIRST_COMPLETED)
            [(status, body)] = [task.result() for task in done]
            assert (status, body["error"]) == (429, "too_many_followers"), body
            assert len(waiting) == MAX_FOLLOWERS
            await ctl.create_identity("gw-wakes-them")
            answers = await asyncio.wait_for(asyncio.gather(*waiting), 10)
            assert {status for status, _ in answers} == {200}
            assert all(body["events"] for _, body in answers)
            status, body = await get(ctl, f"/api/v1/audit?after={after}&wait=0")
            assert status == 200  # the bound is free again

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))


def test_a_filtered_follow_waits_past_events_it_does_not_match_and_its_cursor_skips_them(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl") as ctl:
            status, page = await get(ctl, "/api/v1/audit?identity=gw-wanted")
            assert page["events"] == []
            cursor = page["last_id"]
            assert cursor >= 1  # the newest event, though none matched: a follow starts from now
            waiting = asyncio.ensure_future(get(ctl, f"/api/v1/audit?identity=gw-wanted&after={cursor}&wait=20"))
            await ctl.create_identity("gw-other")  # not matched: the follower keeps waiting
            await asyncio.sleep(1.5)
            assert not waiting.done()
            await ctl.create_identity("gw-wanted")
            status, page = await asyncio.wait_for(waiting, 10)
            assert [e["fields"]["identity"] for e in page["events"]] == ["default/gw-wanted"] * 2
            status, later = await get(ctl, f"/api/v1/audit?identity=gw-other&after={page['last_id']}")
            assert later["events"] == [] and later["last_id"] >= page["last_id"]

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))
