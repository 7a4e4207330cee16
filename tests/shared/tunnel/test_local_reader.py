"""LocalReader: a local TCP connection read into a buffer of its own, taken over from asyncio's StreamReader.

Real loopback TCP connections, on asyncio's loop and, where installed, uvloop's.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import pytest

from shared.tunnel.local_reader import MAX_UNREAD, READ_BUFFER_SIZE, LocalReader, take_over

T = TypeVar("T")
#: Every scenario ends well within this on a loaded machine; past it the test fails instead of hanging.
SCENARIO_DEADLINE = 30.0
#: Long enough for a sender that could still fill the reader's memory to have done so.
SETTLE = 0.3
LOOPS = ["asyncio", "uvloop"]


def run_on(loop_name: str, scenario: Callable[[], Awaitable[T]]) -> T:
    if loop_name == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        loop = uvloop.new_event_loop()  # uvloop.run is 0.18+; Debian 12 ships 0.17
        try:
            return loop.run_until_complete(asyncio.wait_for(scenario(), SCENARIO_DEADLINE))  # type: ignore[no-any-return]
        finally:
            loop.close()
    return asyncio.run(asyncio.wait_for(scenario(), SCENARIO_DEADLINE))


@contextlib.asynccontextmanager
async def connection() -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter, asyncio.StreamWriter]]:
    """(server reader, server writer, client writer) of one loopback TCP connection."""
    accepted: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()
    server = await asyncio.start_server(lambda r, w: accepted.put_nowait((r, w)), "127.0.0.1", 0)
    try:
        _, client = await asyncio.open_connection(*server.sockets[0].getsockname()[:2])
        reader, writer = await accepted.get()
        try:
            yield reader, writer, client
        finally:
            client.close()
            writer.close()
    finally:
        server.close()


async def read_all(local: LocalReader) -> bytes:
    received = bytearray()
    while chunks := await local.read_chunks():
        received += b"".join(chunks)
    return bytes(received)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_bytes_held_before_the_take_over_come_first_then_the_rest_in_order_then_the_end(loop_name: str) -> None:
    upload = bytes(range(256)) * 4096  # 1 MiB: many reads

    async def scenario() -> bytes:
        async with connection() as (reader, writer, client):
            client.write(b"early ")
            await client.drain()
            await asyncio.sleep(SETTLE)  # held by the StreamReader, as while a stream is being opened
            local = take_over(reader, writer)
            assert isinstance(local, LocalReader) and writer.transport.get_protocol() is local
            client.write(upload)
            client.write_eof()
            received = await read_all(local)
            writer.write(b"answer after the end")  # the writer still works: half-closed, not closed
            await writer.drain()
            return received

    assert run_on(loop_name, scenario) == b"early " + upload


@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_reader_nobody_takes_from_holds_a_few_reads_and_the_sender_waits(loop_name: str) -> None:
    upload = bytes(8 * 1024 * 1024)

    async def scenario() -> tuple[int, int]:
        async with connection() as (reader, writer, client):
            local = take_over(reader, writer)
            assert local is not None
            client.write(upload)
            await asyncio.sleep(SETTLE)
            held = local.unread
            sending = asyncio.ensure_future(client.drain())
            received = 0
            while received < len(upload):
                received += sum(len(chunk) for chunk in await local.read_chunks())
            await sending
            return held, received

    held, received = run_on(loop_name, scenario)
    assert held <= MAX_UNREAD + READ_BUFFER_SIZE, f"{held} bytes held for a pump that never came"
    assert received == len(upload)
