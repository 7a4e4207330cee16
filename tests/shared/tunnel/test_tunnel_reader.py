"""TunnelReader: the tunnel's received chunks handed on as the TLS (or TCP) layer made them, without copies.

Real loopback TCP connections, on asyncio's loop and, where installed, uvloop's.
"""

from __future__ import annotations

import asyncio

import pytest

from shared.tunnel.transport import STREAM_BUFFER_LIMIT, StreamTransport, open_tunnel_connection
from tests.shared.tunnel.test_local_reader import LOOPS, SETTLE, run_on

#: Far more than the reader may hold before it stops reading the socket, and than loopback's socket buffers take.
FLOOD = 32 * 1024 * 1024


async def _pair() -> tuple[asyncio.base_events.Server, asyncio.Queue[asyncio.StreamWriter]]:
    accepted: asyncio.Queue[asyncio.StreamWriter] = asyncio.Queue()
    server = await asyncio.start_server(lambda r, w: accepted.put_nowait(w), "127.0.0.1", 0)
    return server, accepted


@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_received_chunk_reaches_the_core_as_the_same_object(loop_name: str) -> None:
    async def scenario() -> None:
        server, accepted = await _pair()
        async with server:
            port = server.sockets[0].getsockname()[1]
            reader, writer = await open_tunnel_connection("127.0.0.1", port)
            peer = await accepted.get()
            peer.write(b"CONNECT-answer\r\n\r\nfirst frames")  # read line-wise before the tunnel starts
            assert await reader.readuntil(b"\r\n\r\n") == b"CONNECT-answer\r\n\r\n"
            await asyncio.sleep(SETTLE)
            transport = StreamTransport(reader, writer)

            assert await transport.receive() == b"first frames"  # buffered before the tunnel started: first
            chunk = b"x" * 50_000
            writer.transport.get_protocol().data_received(chunk)  # as the TLS layer hands a decrypted chunk on
            assert await transport.receive() is chunk  # not a copy
            peer.close()
            assert await transport.receive() is None
            writer.close()

    run_on(loop_name, scenario)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_peer_that_outruns_the_tunnel_is_held_back_by_tcp(loop_name: str) -> None:
    async def scenario() -> None:
        server, accepted = await _pair()
        async with server:
            port = server.sockets[0].getsockname()[1]
            reader, writer = await open_tunnel_connection("127.0.0.1", port)
            transport = StreamTransport(reader, writer)
            peer = await accepted.get()
            peer.transport.set_write_buffer_limits(high=FLOOD * 2)
            peer.write(b"y" * FLOOD)
            await asyncio.sleep(SETTLE)
            assert reader._held <= 2 * STREAM_BUFFER_LIMIT + 256 * 1024  # one read past the limit at most
            assert peer.transport.get_write_buffer_size() > 0  # the rest waits in the kernel and the sender

            received = 0
            while received < FLOOD:
                data = await transport.receive()
                assert data is not None
                received += len(data)
            assert received == FLOOD  # reading resumed once the reader caught up
            peer.close()
            writer.close()

    run_on(loop_name, scenario)
