"""A relay under a reconnecting fleet sheds what it cannot take before paying for it, and says when to come back.

A real controller (TLS, relay mounted) on 127.0.0.1 with its admission cap
lowered; gateways are the agent's own ``TunnelSupervisor`` with their own
enrolled keys, on each transport: on TLS the relay refuses with GOAWAY(BUSY)
and a come-back time instead of CHALLENGE, on the WebSocket with a 503 and
Retry-After, from the same pacer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import ssl
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.errors import RelayBusy
from agent.identity.tls_trust import pinned_ssl_context
from agent.tunnel.backoff import MAX_COME_BACK, MIN_COME_BACK, TOLD_SPREAD, Backoff
from agent.tunnel.client import TunnelOptions, open_tunnel
from agent.tunnel.supervisor import TunnelSupervisor
from controller.listener import ListenerLimits
from controller.relay.goaway import SCHEDULE_FILE
from controller.relay.pacing import FIRST_RETRY, STOP_FIRST_RETRY
from tests.controller.harness import run, running_controller
from tests.controller.relay.relay_harness import SCENARIO_TIMEOUT, enrolled, relay_url

#: Both transports say when to come back: GOAWAY(BUSY) on TLS, a 503 with Retry-After on the WebSocket.
TRANSPORTS = ("tls", "websocket")
#: Gateways reconnecting at once in the storm test.
FLEET = 12
#: The admission cap in the storm test: far below the fleet.
SMALL_CAP = 2
#: Every gateway is back within this (each told at most a few seconds).
ALL_BACK = 60.0
#: A refusal or an answer on loopback comes within this.
ANSWER = 10.0
#: Scheduling slack on a loaded machine for "came back within the told window".
SLACK = 1.5
#: These tests are about the refusal itself: a full relay answers BUSY at once, holding nobody before the
#: handshake (tests/controller/relay/test_relay_parking.py covers the holding).
NO_PARKING = ListenerLimits(park_limit=0)


async def stop_all(fleet: list[TunnelSupervisor], tasks: list[asyncio.Task[None]]) -> None:
    for supervisor in fleet:
        supervisor.stop()
    await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), ALL_BACK)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_fleet_past_the_admission_cap_is_told_to_come_back_and_all_get_in(tmp_path: Path, transport: str) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl", max_admitting=SMALL_CAP, limits=NO_PARKING) as ctl:
            relay = ctl.server.relay
            assert relay is not None and relay.max_admitting == SMALL_CAP
            credentials = [await enrolled(ctl, f"gw-{i}") for i in range(FLEET)]
            fleet = [TunnelSupervisor([relay_url(ctl)], c, TunnelOptions(transport=transport), backoff=Backoff(rng=random.Random(i)))
                     for i, c in enumerate(credentials)]
            tasks = [asyncio.get_running_loop().create_task(s.run()) for s in fleet]
            try:
                await asyncio.wait_for(asyncio.gather(*(s.connected.wait() for s in fleet)), ALL_BACK)
                assert relay.told_to_come_back > 0
                # Every failed attempt was a "come back later": none was a handshake paid for and dropped.
                assert sum(s.stats.reconnects for s in fleet) == relay.told_to_come_back
                assert relay.admitting == 0
                assert len([s for s in relay.sessions if s.identity is not None]) == FLEET
            finally:
                await stop_all(fleet, tasks)

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_an_agent_told_to_come_back_later_returns_within_the_told_window(tmp_path: Path, transport: str) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl", limits=NO_PARKING) as ctl:
            relay = ctl.server.relay
            assert relay is not None
            relay.max_admitting = 0  # everyone is told to come back
            told: list[tuple[float, float]] = []
            original = relay.pacer.come_back
            loop = asyncio.get_running_loop()

            def telling(now: float, in_flight: int = 0) -> float:
                seconds = original(now, in_flight)
                told.append((loop.time(), seconds))
                relay.max_admitting = 10  # the next attempt is let in
                return seconds

            relay.pacer.come_back = telling  # type: ignore[method-assign]
            options = TunnelOptions(transport="auto" if transport == "tls" else transport)
            supervisor = TunnelSupervisor([relay_url(ctl)], await enrolled(ctl, "gw-told"), options)
            task = loop.create_task(supervisor.run())
            try:
                await asyncio.wait_for(supervisor.connected.wait(), ALL_BACK)
                back = loop.time()
            finally:
                await stop_all([supervisor], [task])
            (when, seconds), = told
            # The WebSocket's Retry-After is in whole seconds; the GOAWAY carries milliseconds.
            expected = math.ceil(seconds) if transport == "websocket" else seconds
            assert seconds >= 1
            assert expected <= back - when <= expected + TOLD_SPREAD + SLACK, (expected, back - when)
            assert not options.fallback_until  # a busy TLS relay is no reason to fall back to the WebSocket

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize(("said", "followed"), [(0.0, MIN_COME_BACK), (3 * 86400.0, MAX_COME_BACK)])
def test_a_come_back_time_out_of_bounds_is_clamped_by_the_agent(tmp_path: Path, transport: str, said: float,
                                                                 followed: float) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl", limits=NO_PARKING) as ctl:
            relay = ctl.server.relay
            assert relay is not None
            relay.max_admitting = 0
            relay.pacer.come_back = lambda now, in_flight=0: said  # type: ignore[method-assign]
            credentials = await enrolled(ctl, "gw-hostile")
            options = TunnelOptions(transport=transport)
            async with aiohttp_session() as http:
                with pytest.raises(RelayBusy) as caught:
                    await asyncio.wait_for(open_tunnel(http, relay_url(ctl), credentials,
                                                       pinned_ssl_context(credentials.ca_pem), options), ANSWER)
            assert caught.value.retry_after == followed
            assert relay.admitting == 0 and not relay.sessions  # refused before any protocol core

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))


def test_a_graceful_stop_tells_each_tunnel_its_own_time_to_come_back(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl") as ctl:
            relay = ctl.server.relay
            assert relay is not None
            fleet = [TunnelSupervisor([relay_url(ctl)], await enrolled(ctl, f"gw-stop-{i}"),
                                      TunnelOptions(transport=transport))
                     for i, transport in enumerate(TRANSPORTS * 2)]
            tasks = [asyncio.get_running_loop().create_task(s.run()) for s in fleet]
            try:
                await asyncio.wait_for(asyncio.gather(*(s.connected.wait() for s in fleet)), ALL_BACK)
                sessions = [s.session for s in fleet]
                await relay.close()
                for session in sessions:
                    assert session is not None
                    await asyncio.wait_for(session.closed.wait(), ANSWER)
                told = sorted(session.conn.retry_after for session in sessions)  # type: ignore[union-attr]
                assert told[0] >= STOP_FIRST_RETRY
                # Spread one slot apart at the relay's pace: no two agents come back in the same moment.
                gaps = [b - a for a, b in zip(told, told[1:], strict=False)]
                assert all(math.isclose(gap, 1.0 / relay.pacer.rate(), abs_tol=0.002) for gap in gaps), told
                await until(lambda: all(s.stats.state == "waiting" for s in fleet))
            finally:
                await stop_all(fleet, tasks)

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))


def test_a_relay_started_after_a_stop_tells_refused_agents_times_after_those_its_predecessor_told(
        tmp_path: Path) -> None:
    async def scenario() -> None:
        data = tmp_path / "ctl"
        schedule = data / SCHEDULE_FILE
        async with running_controller(data) as ctl:
            relay = ctl.server.relay
            assert relay is not None
            fleet = [TunnelSupervisor([relay_url(ctl)], await enrolled(ctl, f"gw-told-{i}"), TunnelOptions())
                     for i in range(3)]
            tasks = [asyncio.get_running_loop().create_task(s.run()) for s in fleet]
            late = await enrolled(ctl, "gw-late")
            try:
                await asyncio.wait_for(asyncio.gather(*(s.connected.wait() for s in fleet)), ALL_BACK)
                stopped = time.time()
                await relay.close()
            finally:
                await stop_all(fleet, tasks)
        until = json.loads(schedule.read_text(encoding="utf-8"))["until"]
        assert schedule.stat().st_mode & 0o777 == 0o600
        assert [p.name for p in data.iterdir() if SCHEDULE_FILE in p.name] == [SCHEDULE_FILE]  # no temporary left
        # The last of them comes back at its slot plus its jitter.
        assert until >= stopped + STOP_FIRST_RETRY + 2 / relay.pacer.rate() + TOLD_SPREAD
        async with running_controller(data, limits=NO_PARKING) as ctl:
            successor = ctl.server.relay
            assert successor is not None
            assert not schedule.exists()  # followed once
            successor.max_admitting = 0
            async with aiohttp_session() as http:
                with pytest.raises(RelayBusy) as caught:
                    await asyncio.wait_for(open_tunnel(http, relay_url(ctl), late, pinned_ssl_context(late.ca_pem),
                                                       TunnelOptions()), ANSWER)
            refused = time.time()
        assert caught.value.retry_after is not None
        assert refused + caught.value.retry_after >= until

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))


@pytest.mark.parametrize("content", ["{\"until\": \"tomorrow\"}", "not json", "{}"])
def test_a_damaged_come_back_record_is_ignored_with_a_warning(tmp_path: Path, content: str,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        data = tmp_path / "ctl"
        async with running_controller(data):
            pass
        (data / SCHEDULE_FILE).write_text(content, encoding="utf-8")
        with caplog.at_level(logging.WARNING, logger="controller.relay.goaway"):
            async with running_controller(data) as ctl:
                relay = ctl.server.relay
                assert relay is not None
                told = relay.pacer.come_back(asyncio.get_running_loop().time())
        assert FIRST_RETRY <= told <= FIRST_RETRY + 1 / relay.pacer.rate() + 1e-9  # paced as the first
        assert not (data / SCHEDULE_FILE).exists()
        assert any(SCHEDULE_FILE in record.getMessage() for record in caplog.records)

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))


def test_past_the_cap_on_handshakes_in_progress_a_connection_is_reset_before_its_tls_handshake(tmp_path: Path) -> None:
    async def scenario() -> None:
        limits = ListenerLimits(max_handshakes=1)
        async with running_controller(tmp_path / "ctl", limits=limits) as ctl:
            port = int(ctl.url.rsplit(":", 1)[1])
            guard = ctl.server.guards[0]
            # A peer that connected and sends nothing holds the one handshake slot.
            _, silent = await asyncio.open_connection("127.0.0.1", port)
            await until(lambda: len(guard._handshakes) == 1)
            with pytest.raises((ConnectionError, ssl.SSLError)):
                await asyncio.wait_for(asyncio.open_connection(
                    "127.0.0.1", port, ssl=ctl.client_tls, server_hostname="localhost"), ANSWER)
            assert guard.handshakes_shed == 1
            silent.close()
            await until(lambda: not guard._handshakes)
            status, _ = await ctl.call("GET", "/api/v1/identities")  # the next one is served
            assert status == 200

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))


def aiohttp_session():  # type: ignore[no-untyped-def]
    import aiohttp

    return aiohttp.ClientSession()


async def until(condition: Callable[[], bool]) -> None:
    for _ in range(int(ANSWER / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the listener did not get there in time")
