"""The link emulator does what the link tests rely on: delay, rate, stalls, NAT, resets."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.e2e.connect_proxy import pipe
from tests.linkemu.emulator import LinkEmulator, StallSchedule
from tests.linkemu.profiles import CLEAN, GEO, LinkProfile

SCENARIO_TIMEOUT = 30.0


async def echo_server() -> tuple[asyncio.AbstractServer, int]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await pipe(reader, writer)

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def sink_server() -> tuple[asyncio.AbstractServer, int, list[int]]:
    received = [0]

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            received[0] += len(data)
        writer.write(b"done")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(sink, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], received


def run(coroutine) -> None:
    asyncio.run(asyncio.wait_for(coroutine, SCENARIO_TIMEOUT))


def test_a_round_trip_takes_twice_the_one_way_delay_after_a_handshake_round_trip() -> None:
    async def scenario() -> None:
        server, port = await echo_server()
        async with LinkEmulator("127.0.0.1", port, CLEAN.but(one_way_delay=0.15)) as emu:
            reader, writer = await asyncio.open_connection("127.0.0.1", emu.port)
            started = time.monotonic()
            writer.write(b"ping")
            assert await reader.readexactly(4) == b"ping"
            first = time.monotonic() - started
            started = time.monotonic()
            writer.write(b"pong")
            assert await reader.readexactly(4) == b"pong"
            second = time.monotonic() - started
            writer.close()
            # The first exchange waits for SYN/SYN-ACK, as on a real path.
            assert 0.6 <= first < 0.9, first
            assert 0.3 <= second < 0.6, second
            assert emu.stats.up_bytes == 8 and emu.stats.down_bytes == 8
        server.close()

    run(scenario())


def test_the_geo_path_carries_twenty_megabit_with_its_delay_and_no_faster() -> None:
    async def scenario() -> None:
        server, port, received = await sink_server()
        async with LinkEmulator("127.0.0.1", port, GEO) as emu:
            reader, writer = await asyncio.open_connection("127.0.0.1", emu.port)
            payload = bytes(5_000_000)
            started = time.monotonic()
            writer.write(payload)
            writer.write_eof()
            assert await reader.read() == b"done"
            elapsed = time.monotonic() - started
            writer.close()
        server.close()
        assert received[0] == len(payload)
        # 5 MB at 2.5 MB/s is 2 s, plus 0.6 s for the handshake and 0.6 s for the last byte and the answer.
        assert 3.0 <= elapsed <= 4.2, elapsed
        assert len(payload) * 8 / (elapsed - 4 * GEO.one_way_delay) / 1e6 >= 18

    run(scenario())


def test_an_idle_connection_is_black_holed_silently_and_a_new_one_works() -> None:
    async def scenario() -> None:
        server, port = await echo_server()
        async with LinkEmulator("127.0.0.1", port, CLEAN.but(nat_timeout=0.3)) as emu:
            reader, writer = await asyncio.open_connection("127.0.0.1", emu.port)
            writer.write(b"a")
            assert await reader.readexactly(1) == b"a"
            await asyncio.sleep(0.5)
            writer.write(b"b")
            # No answer, and no FIN or RST either: the read just waits.
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(reader.read(1), 1.0)
            assert emu.stats.blackholed == 1 and emu.stats.dropped_bytes == 1
            fresh_reader, fresh_writer = await asyncio.open_connection("127.0.0.1", emu.port)
            fresh_writer.write(b"c")
            assert await fresh_reader.readexactly(1) == b"c"
            writer.close()
            fresh_writer.close()
        server.close()

    run(scenario())


@pytest.mark.parametrize("mode, writes_block", [("discard", False), ("unread", True)])
def test_a_black_hole_either_swallows_bytes_or_leaves_the_sender_blocked(mode: str, writes_block: bool) -> None:
    async def scenario() -> None:
        server, port = await echo_server()
        async with LinkEmulator("127.0.0.1", port, CLEAN) as emu:
            reader, writer = await asyncio.open_connection("127.0.0.1", emu.port)
            writer.write(b"a")
            assert await reader.readexactly(1) == b"a"
            assert emu.blackhole_all(mode) == 1
            # Far more than every buffer on the way holds (the emulator's pipe
            # is 16 MiB without a rate limit), in bounded steps.
            blocked = False
            for _ in range(48):
                writer.write(bytes(1 << 20))
                try:
                    await asyncio.wait_for(writer.drain(), 1.0)
                except TimeoutError:
                    blocked = True
                    break
            assert blocked is writes_block
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(reader.read(1), 0.5)  # no answer, no FIN, no RST
            writer.transport.abort()
        server.close()

    run(scenario())


def test_a_connection_that_keeps_talking_is_not_black_holed() -> None:
    async def scenario() -> None:
        server, port = await echo_server()
        async with LinkEmulator("127.0.0.1", port, CLEAN.but(nat_timeout=0.3)) as emu:
            reader, writer = await asyncio.open_connection("127.0.0.1", emu.port)
            for _ in range(6):
                writer.write(b"k")
                assert await asyncio.wait_for(reader.readexactly(1), 1.0) == b"k"
                await asyncio.sleep(0.2)
            writer.close()
            assert emu.stats.blackholed == 0
        server.close()

    run(scenario())


def test_random_resets_end_connections_with_an_rst() -> None:
    async def scenario() -> None:
        server, port = await echo_server()
        async with LinkEmulator("127.0.0.1", port, CLEAN.but(reset_mean_interval=0.2, seed=3)) as emu:
            reader, writer = await asyncio.open_connection("127.0.0.1", emu.port)
            with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
                for _ in range(100):
                    writer.write(b"x")
                    await asyncio.wait_for(reader.readexactly(1), 1.0)
                    await asyncio.sleep(0.05)
            assert emu.stats.resets == 1
            writer.close()
        server.close()

    run(scenario())


def test_a_periodic_stall_closes_each_period() -> None:
    schedule = StallSchedule(LinkProfile(stall_every=15.0, stall_for=2.0), start=100.0)
    assert schedule.stalled_until(100.0) is None
    assert schedule.stalled_until(112.9) is None
    assert schedule.stalled_until(113.0) == pytest.approx(115.0)
    assert schedule.stalled_until(114.5) == pytest.approx(115.0)
    assert schedule.stalled_until(115.0) is None
    assert schedule.stalled_until(128.5) == pytest.approx(130.0)


def test_random_stalls_are_repeatable_from_the_seed() -> None:
    profile = LinkProfile(random_stall_mean_interval=5.0, random_stall_for=1.0, seed=11)

    def stalled_seconds(schedule: StallSchedule) -> list[int]:
        return [t for t in range(0, 200) if schedule.stalled_until(float(t)) is not None]

    first = stalled_seconds(StallSchedule(profile, 0.0))
    assert first == stalled_seconds(StallSchedule(profile, 0.0))
    assert 10 <= len(first) <= 70  # about one second in six
