"""A relay under a reconnecting fleet sheds what it cannot take before paying for it, and says when to come back.

A real controller (TLS, relay mounted) on 127.0.0.1 with its admission cap
lowered; gateways are the agent's own ``TunnelSupervisor`` with their own
enrolled keys.
"""

from __future__ import annotations

import asyncio
import random
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.tunnel.backoff import TOLD_SPREAD, Backoff
from agent.tunnel.client import TunnelOptions
from agent.tunnel.supervisor import TunnelSupervisor
from controller.listener import ListenerLimits
from tests.controller.harness import run, running_controller
from tests.controller.relay.relay_harness import SCENARIO_TIMEOUT, enrolled, relay_url

#: The come-back time is a 503 with Retry-After: the WebSocket's upgrade answer (the TLS transport has no HTTP).
PACED = "websocket"
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


async def stop_all(fleet: list[TunnelSupervisor], tasks: list[asyncio.Task[None]]) -> None:
    for supervisor in fleet:
        supervisor.stop()
    await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), ALL_BACK)


def test_a_fleet_past_the_admission_cap_is_told_to_come_back_and_all_get_in(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl") as ctl:
            relay = ctl.server.relay
            assert relay is not None
            relay.max_admitting = SMALL_CAP
            credentials = [await enrolled(ctl, f"gw-{i}") for i in range(FLEET)]
            fleet = [TunnelSupervisor([relay_url(ctl)], c, TunnelOptions(transport=PACED), backoff=Backoff(rng=random.Random(i)))
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


def test_an_agent_told_to_come_back_later_returns_within_the_told_window(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl") as ctl:
            relay = ctl.server.relay
            assert relay is not None
            relay.max_admitting = 0  # everyone is told to come back
            told: list[tuple[float, int]] = []
            original = relay._come_back_later
            loop = asyncio.get_running_loop()

            def telling():  # type: ignore[no-untyped-def]
                response = original()
                told.append((loop.time(), int(response.headers["Retry-After"])))
                relay.max_admitting = 10  # the next attempt is let in
                return response

            relay._come_back_later = telling  # type: ignore[method-assign]
            supervisor = TunnelSupervisor([relay_url(ctl)], await enrolled(ctl, "gw-told"), TunnelOptions(transport=PACED))
            task = loop.create_task(supervisor.run())
            try:
                await asyncio.wait_for(supervisor.connected.wait(), ALL_BACK)
                back = loop.time()
            finally:
                await stop_all([supervisor], [task])
            (when, seconds), = told
            assert seconds >= 1
            assert seconds <= back - when <= seconds + TOLD_SPREAD + SLACK, (seconds, back - when)

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


async def until(condition: Callable[[], bool]) -> None:
    for _ in range(int(ANSWER / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the listener did not get there in time")
