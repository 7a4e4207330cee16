"""The standard-library HTTPS client (agent/identity/https.py) against a real TLS server on 127.0.0.1."""

from __future__ import annotations

import asyncio

import pytest

from agent.errors import EnrollmentError
from agent.identity.https import Channel
from agent.identity.tls_trust import pinned_ssl_context
from agent.proxy import DIRECT
from tests.agent.tunnel.test_tunnel_client import make_ca_and_server

SCENARIO_TIMEOUT = 20.0


async def _serve(answers: list[bytes], body: bytes) -> tuple[str, str, list[int]]:
    """A TLS server answering each request on a connection with the next of ``answers``; counts connections."""
    ca_pem, server_tls = make_ca_and_server()
    accepted: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(1)
        for head in answers:
            try:
                await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                break
            writer.write(head + body)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_tls)
    port = server.sockets[0].getsockname()[1]
    _SERVERS.append(server)
    return ca_pem, f"https://127.0.0.1:{port}", accepted


_SERVERS: list[asyncio.Server] = []


def test_a_closed_connection_is_an_error_and_never_a_second_plain_one() -> None:
    async def scenario() -> tuple[int, list[int], BaseException]:
        ca_pem, url, accepted = await _serve([b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n"],
                                             b"{}")
        channel = Channel(url, pinned_ssl_context(ca_pem), DIRECT, 5.0)
        await channel.connect()
        first = await channel.request("GET", url + "/v1/time", 1024)
        await asyncio.sleep(0.2)  # the server has closed its end
        with pytest.raises(ConnectionError) as caught:
            await channel.request("GET", url + "/v1/time", 1024)
        channel.close()
        return first.status, accepted, caught.value

    status, accepted, error = asyncio.run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))
    assert status == 200
    assert accepted == [1], "the client must not open a second connection (it could only be plain)"
    assert isinstance(error, ConnectionError)


def test_requests_in_a_row_share_one_connection_and_a_chunked_answer_is_read_whole() -> None:
    async def scenario() -> tuple[list[bytes], list[int]]:
        chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        ca_pem, url, accepted = await _serve([chunked, chunked], b"2\r\n{}\r\n0\r\n\r\n")
        channel = Channel(url, pinned_ssl_context(ca_pem), DIRECT, 5.0)
        await channel.connect()
        bodies = [(await channel.request("GET", url + "/v1/time", 1024)).body for _ in range(2)]
        channel.close()
        return bodies, accepted

    bodies, accepted = asyncio.run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))
    assert bodies == [b"{}", b"{}"]
    assert accepted == [1]


@pytest.mark.parametrize("head", [b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n",
                                  b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"])
def test_an_answer_over_the_limit_is_refused_with_a_sentence(head: bytes) -> None:
    body = b"x" * 5000 if b"Content-Length" in head else b"1388\r\n" + b"x" * 5000 + b"\r\n0\r\n\r\n"

    async def scenario() -> None:
        ca_pem, url, _ = await _serve([head], body)
        channel = Channel(url, pinned_ssl_context(ca_pem), DIRECT, 5.0)
        await channel.connect()
        try:
            await channel.request("GET", url + "/v1/ca", 1024)
        finally:
            channel.close()

    with pytest.raises(EnrollmentError, match="is larger than 1024 bytes"):
        asyncio.run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))
