"""Tunnels over emulated cellular and satellite links: stalls survived, black holes replaced.

A real controller-plus-relay runs in-process; each gateway is the agent's own
TunnelSupervisor whose path to the relay goes through the link emulator. The
profiles' timers are shrunk to seconds so the mechanisms show in a short test;
the benchmarks measure the real numbers.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import pytest

from agent.tunnel.link_profiles import plan_for
from controller.relay.tunnel_auth import RELAY_IDLE_MIN
from shared.tunnel.session import CLOSE_TIMEOUT
from tests.controller.harness import run, running_controller
from tests.e2e.link_harness import (
    ECHO_SERVICE,
    SOURCE_SERVICE,
    allow_echo,
    dial_echo,
    echo_once,
    echo_service,
    emulated,
    enrolled,
    gateway,
    operator_tunnel,
    read_all,
    relay_port,
    relay_url,
    source_service,
)
from tests.linkemu.profiles import CLEAN, FLAKY, LEO, LTE_NAT

# Seconds-scale timers: the same mechanisms as the real profiles, 100x faster.
FAST = dict(keepalive_interval=1.0, ping_timeout=2.0, reconnect_initial=0.5, reconnect_max=2.0)
# Connecting (TCP + TLS + AUTH + BIND) on loopback on a busy 2-core machine.
CONNECT_SLACK = 3.0


def scenario(coroutine, limit: float = 90.0) -> None:
    run(asyncio.wait_for(coroutine, limit))


# Streams pushing data at once when the path black-holes.
UPLOADS = 4
# Bytes each upload carries before the black hole: the data path is busy.
UPLOAD_WARMUP = 1 << 20
# What the operator sends toward a black-holed gateway at most: far more than the buffers on the way.
DOWNLOAD_MIB = 64


async def enroll_both(ctl):
    await allow_echo(ctl, SOURCE_SERVICE)
    gateway_credentials = await enrolled(ctl, "gw-link", ["gateway"])
    operator_credentials = await enrolled(ctl, "op-link", ["operator"])
    return gateway_credentials, operator_credentials


def test_a_silently_black_holed_tunnel_is_detected_within_the_bound_and_replaced(tmp_path: Path) -> None:
    plan = plan_for("cellular", **FAST)

    async def body() -> None:
        async with running_controller(tmp_path / "ctl") as ctl, echo_service() as echo_port:
            gw_creds, op_creds = await enroll_both(ctl)
            async with emulated(relay_port(ctl), LTE_NAT.but(nat_timeout=None, one_way_delay=0.03, rate=None)) as emu, \
                    gateway(gw_creds, [relay_url(emu.port)], plan, {ECHO_SERVICE: ("127.0.0.1", echo_port)}) as gw, \
                    operator_tunnel(ctl, op_creds) as operator:
                await gw.wait_connected(10)
                assert await dial_echo(operator, b"before", 5) == b"before"
                assert emu.blackhole_all() == 1  # the carrier forgot the mapping: no RST, no FIN
                dropped_at = time.monotonic()
                while gw.supervisor.connected.is_set():
                    await asyncio.sleep(0.05)
                    assert time.monotonic() - dropped_at < plan.detection_bound + 1.0, "black hole not detected"
                detected = time.monotonic() - dropped_at
                await gw.wait_connected(plan.reconnect_initial + CONNECT_SLACK)
                assert gw.supervisor.stats.reconnects == 1
                assert "PING" in (gw.supervisor.stats.last_drop or "")
                assert emu.stats.connections == 2  # the replacement went through the same path
                assert await dial_echo(operator, b"after", 5) == b"after"
        assert detected <= plan.detection_bound + 0.5

    scenario(body())


async def uploads_into_a_black_hole(emu, gw, operator) -> tuple[list[asyncio.Task], object]:
    """UPLOADS streams from the gateway's source to the operator, then an unread black hole.

    Returns the operator's readers and the gateway's tunnel session.
    """
    received = [0] * UPLOADS
    readers = []
    for index in range(UPLOADS):
        channel = operator.open_stream(SOURCE_SERVICE)
        await asyncio.wait_for(channel.wait_accepted(), 5)
        readers.append(asyncio.ensure_future(read_all(channel, received, index)))
    deadline = time.monotonic() + 20
    while min(received) < UPLOAD_WARMUP:
        assert time.monotonic() < deadline, f"the uploads did not flow: {received}"
        await asyncio.sleep(0.05)
    session = gw.supervisor.session
    assert emu.blackhole_all("unread") == 1  # no byte read, no ACK: the gateway's writes block
    return readers, session


async def longest_stuck_write(session, until) -> float:
    """The longest time one WebSocket write of ``session`` was pending, sampled until ``until()``."""
    loop = asyncio.get_running_loop()
    longest = 0.0
    while not until():
        since = session.write_pending_since
        if since is not None:
            longest = max(longest, loop.time() - since)
        await asyncio.sleep(0.05)
    return longest


@contextlib.asynccontextmanager
async def uploading_gateway(tmp_path: Path, plan):
    """A gateway binding echo and source behind a clean emulated path, and an operator tunnel: (emulator, gateway, operator)."""
    async with running_controller(tmp_path / "ctl") as ctl, echo_service() as echo_port, \
            source_service() as source_port:
        gw_creds, op_creds = await enroll_both(ctl)
        binds = {ECHO_SERVICE: ("127.0.0.1", echo_port), SOURCE_SERVICE: ("127.0.0.1", source_port)}
        async with emulated(relay_port(ctl), CLEAN.but(one_way_delay=0.01)) as emu, \
                gateway(gw_creds, [relay_url(emu.port)], plan, binds) as gw, \
                operator_tunnel(ctl, op_creds) as operator:
            await gw.wait_connected(10)
            yield emu, gw, operator


def test_a_black_hole_during_uploads_is_detected_within_the_bound_and_replaced(tmp_path: Path) -> None:
    plan = plan_for("cellular", **FAST)

    async def body() -> None:
        async with uploading_gateway(tmp_path, plan) as (emu, gw, operator):
            readers, session = await uploads_into_a_black_hole(emu, gw, operator)
            dropped_at = time.monotonic()
            limit = plan.detection_bound + 1.5

            def detected_or_late() -> bool:
                return not gw.supervisor.connected.is_set() or time.monotonic() - dropped_at > limit

            stuck = await longest_stuck_write(session, detected_or_late)
            detected = time.monotonic() - dropped_at
            assert not gw.supervisor.connected.is_set(), "a black hole during uploads was not detected"
            assert stuck >= 1.0, f"the uploads never blocked in a write ({stuck:.2f} s): the black hole did not bite"
            assert emu.released_by()["agent"] == 1  # the dead connection was let go, not left to linger
            await gw.wait_connected(plan.reconnect_max + CONNECT_SLACK)
            assert "PING" in (gw.supervisor.stats.last_drop or "")
            assert emu.stats.connections == 2
            assert await dial_echo(operator, b"after", 5) == b"after"
            for reader in readers:
                reader.cancel()
        assert detected <= plan.detection_bound + 1.0, detected

    scenario(body())


def test_stopping_the_agent_while_its_upload_is_stuck_in_a_black_hole_finishes_promptly(tmp_path: Path) -> None:
    # Detection is a minute away: only stop() can end this tunnel soon.
    plan = plan_for("cellular", keepalive_interval=60.0, ping_timeout=30.0, reconnect_initial=0.5)

    async def body() -> None:
        async with uploading_gateway(tmp_path, plan) as (emu, gw, operator):
            readers, session = await uploads_into_a_black_hole(emu, gw, operator)
            settle = time.monotonic() + 1.5
            stuck = await longest_stuck_write(session, lambda: time.monotonic() > settle)
            assert stuck >= 1.0, f"the upload never blocked in a write ({stuck:.2f} s)"
            started = time.monotonic()
            gw.supervisor.stop()
            await asyncio.wait_for(asyncio.shield(gw.task), CLOSE_TIMEOUT + 5)
            took = time.monotonic() - started
            assert session.closed.is_set()
            for reader in readers:
                reader.cancel()
        assert took <= CLOSE_TIMEOUT + 1.0, took

    scenario(body())


def test_a_relay_stuck_writing_into_a_black_hole_lets_go_of_the_tunnel_within_its_idle_bound(tmp_path: Path) -> None:
    plan = plan_for("cellular", **FAST)
    # The relay forgets a tunnel after three keepalives of silence, never sooner than this.
    relay_bound = RELAY_IDLE_MIN

    async def body() -> None:
        async with running_controller(tmp_path / "ctl") as ctl, echo_service() as echo_port:
            gw_creds, op_creds = await enroll_both(ctl)
            async with emulated(relay_port(ctl), CLEAN.but(one_way_delay=0.01)) as emu, \
                    gateway(gw_creds, [relay_url(emu.port)], plan, {ECHO_SERVICE: ("127.0.0.1", echo_port)}) as gw, \
                    operator_tunnel(ctl, op_creds) as operator:
                await gw.wait_connected(10)
                channel = operator.open_stream(ECHO_SERVICE)
                await asyncio.wait_for(channel.wait_accepted(), 5)
                echoed = [0]
                reader = asyncio.ensure_future(read_all(channel, echoed, 0))

                written = [0]

                async def download() -> None:
                    for _ in range(DOWNLOAD_MIB):
                        await channel.write(bytes(1 << 20))
                        written[0] += 1

                writer = asyncio.ensure_future(download())
                deadline = time.monotonic() + 20
                while echoed[0] < UPLOAD_WARMUP:
                    assert time.monotonic() < deadline, "the download did not flow"
                    await asyncio.sleep(0.05)
                assert emu.blackhole_all("unread") == 1  # the relay's writes toward the gateway now block
                dropped_at = time.monotonic()
                while emu.released_by()["relay"] == 0:
                    assert time.monotonic() - dropped_at < relay_bound + 3.0, "the relay held on to a dead tunnel"
                    await asyncio.sleep(0.1)
                released = time.monotonic() - dropped_at
                assert written[0] < DOWNLOAD_MIB, "the whole download went through: the relay was never stuck"
                for task in (reader, writer):
                    task.cancel()
        assert released >= relay_bound - 0.5, f"released after {released:.1f} s: before its idle bound?"

    scenario(body())


def test_a_keepalive_under_the_nat_timeout_keeps_an_idle_tunnel(tmp_path: Path) -> None:
    plan = plan_for("cellular", nat_timeout=2.5, ping_timeout=2.0, reconnect_initial=0.5)
    assert plan.liveness.keepalive_interval < 2.5

    async def body() -> None:
        async with running_controller(tmp_path / "ctl") as ctl:
            gw_creds, _ = await enroll_both(ctl)
            async with emulated(relay_port(ctl), LTE_NAT.but(nat_timeout=2.5)) as emu, \
                    gateway(gw_creds, [relay_url(emu.port)], plan) as gw:
                await gw.wait_connected(10)
                await asyncio.sleep(8.0)  # idle, three NAT timeouts long
                assert gw.supervisor.connected.is_set()
                assert gw.supervisor.stats.reconnects == 0
                assert emu.stats.blackholed == 0 and emu.stats.connections == 1

    scenario(body())


def test_a_keepalive_slower_than_the_nat_loses_the_tunnel_and_the_agent_notices(tmp_path: Path) -> None:
    plan = plan_for("cellular", keepalive_interval=2.0, ping_timeout=1.5, nat_timeout=10.0, reconnect_initial=0.5)

    async def body() -> None:
        async with running_controller(tmp_path / "ctl") as ctl:
            gw_creds, _ = await enroll_both(ctl)
            async with emulated(relay_port(ctl), LTE_NAT.but(nat_timeout=1.0)) as emu, \
                    gateway(gw_creds, [relay_url(emu.port)], plan) as gw:
                await gw.wait_connected(10)
                await asyncio.sleep(plan.detection_bound + 1.5)
                assert emu.stats.blackholed >= 1
                assert gw.supervisor.stats.reconnects >= 1
                assert "PING" in (gw.supervisor.stats.last_drop or "")

    scenario(body())


def test_a_leo_handover_stall_keeps_the_tunnel_and_a_long_lived_stream(tmp_path: Path) -> None:
    # Two 2-second stalls, one every 6 s: the ping timeout (4 s) outlasts a stall.
    plan = plan_for("satellite", keepalive_interval=1.0, ping_timeout=4.0, reconnect_initial=0.5)

    async def body() -> None:
        async with running_controller(tmp_path / "ctl") as ctl, echo_service() as echo_port:
            gw_creds, op_creds = await enroll_both(ctl)
            async with emulated(relay_port(ctl), LEO.but(stall_every=6.0, stall_for=2.0)) as emu, \
                    gateway(gw_creds, [relay_url(emu.port)], plan, {ECHO_SERVICE: ("127.0.0.1", echo_port)}) as gw, \
                    operator_tunnel(ctl, op_creds) as operator:
                await gw.wait_connected(10)
                channel = operator.open_stream(ECHO_SERVICE)
                await asyncio.wait_for(channel.wait_accepted(), 5)
                slowest = 0.0
                deadline = time.monotonic() + 14.0
                rounds = 0
                while time.monotonic() < deadline:
                    started = time.monotonic()
                    payload = f"tick {rounds}".encode()
                    assert await echo_once(channel, payload, 6.0) == payload
                    slowest = max(slowest, time.monotonic() - started)
                    rounds += 1
                    await asyncio.sleep(0.3)
                channel.reset()
                assert gw.supervisor.stats.reconnects == 0
                assert emu.stats.connections == 1
                assert slowest >= 1.0, "no echo waited out a stall: did the stalls happen?"
                assert rounds >= 10

    scenario(body())


def test_on_a_flaky_link_the_tunnel_keeps_coming_back_within_a_bounded_time(tmp_path: Path) -> None:
    plan = plan_for("cellular", **FAST)
    profile = FLAKY.but(one_way_delay=0.02, rate=None, reset_mean_interval=2.5, random_stall_mean_interval=4.0,
                        random_stall_for=1.0, seed=5)
    # Longest outage: a stall, detection, the capped backoff wait, a connect.
    outage_bound = plan.detection_bound + plan.reconnect_max + CONNECT_SLACK + 1.0

    async def body() -> None:
        async with running_controller(tmp_path / "ctl") as ctl, echo_service() as echo_port:
            gw_creds, op_creds = await enroll_both(ctl)
            async with emulated(relay_port(ctl), profile) as emu, \
                    gateway(gw_creds, [relay_url(emu.port)], plan, {ECHO_SERVICE: ("127.0.0.1", echo_port)}) as gw, \
                    operator_tunnel(ctl, op_creds) as operator:
                await gw.wait_connected(10)
                down_since: float | None = None
                longest = 0.0
                deadline = time.monotonic() + 15.0
                while time.monotonic() < deadline:
                    now = time.monotonic()
                    if gw.supervisor.connected.is_set():
                        if down_since is not None:
                            longest = max(longest, now - down_since)
                        down_since = None
                    elif down_since is None:
                        down_since = now
                    await asyncio.sleep(0.05)
                assert emu.stats.resets >= 2, "the flaky profile did not reset: the test saw nothing"
                assert gw.supervisor.stats.reconnects >= 2
                assert longest <= outage_bound, f"an outage lasted {longest:.1f} s"
                await gw.wait_connected(outage_bound)
                # Between resets the tunnel works end to end.
                for _attempt in range(5):
                    try:
                        assert await dial_echo(operator, b"still here", 3) == b"still here"
                        break
                    except Exception:
                        await gw.wait_connected(outage_bound)
                else:
                    pytest.fail("no dial succeeded between resets")

    scenario(body())


def test_a_relay_that_is_down_fails_over_to_the_next_and_the_list_is_refreshed(tmp_path: Path) -> None:
    plan = plan_for("ethernet", **FAST)
    saved: list = []

    async def body() -> None:
        async with running_controller(tmp_path / "ctl") as ctl:
            gw_creds, _ = await enroll_both(ctl)
            down = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
            dead_port = down.sockets[0].getsockname()[1]
            down.close()
            await down.wait_closed()
            dead, alive = relay_url(dead_port), relay_url(relay_port(ctl))
            async with gateway(gw_creds, [dead, alive], plan, saved=saved) as gw:
                took = await gw.wait_connected(plan.reconnect_initial + CONNECT_SLACK)
                assert gw.supervisor.stats.relay == alive
                assert "cannot reach the relay" in (gw.supervisor.stats.last_error or "") or took < 5
        # The controller's own list arrived in AUTH_OK and was handed over for storing.
        assert saved == [ctl.context.relay_urls]

    scenario(body())


def test_idle_keepalives_cost_a_bounded_number_of_bytes(tmp_path: Path) -> None:
    plan = plan_for("metered", keepalive_interval=1.0, ping_timeout=2.0)

    async def body() -> None:
        async with running_controller(tmp_path / "ctl") as ctl:
            gw_creds, _ = await enroll_both(ctl)
            async with emulated(relay_port(ctl), CLEAN) as emu, gateway(gw_creds, [relay_url(emu.port)], plan) as gw:
                await gw.wait_connected(10)
                await asyncio.sleep(1.5)  # the handshake's last bytes and TLS tickets are through
                up, down, writes = emu.stats.up_bytes, emu.stats.down_bytes, emu.stats.up_writes
                await asyncio.sleep(6.0)
                pings = emu.stats.up_writes - writes
                spent = (emu.stats.up_bytes - up) + (emu.stats.down_bytes - down)
        assert 4 <= pings <= 7, pings
        # PING 18 + WebSocket 6 + TLS 22 up; PONG 18 + 2 + 22 down: under 100 bytes a round.
        assert spent / pings <= 100, spent / pings

    scenario(body())
