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


@pytest.mark.parametrize(("head", "reused"), [(b"HTTP/1.1 200 OK\r\nConnection: keep-alive, Close\r\n", False),
                                              (b"HTTP/1.1 200 OK\r\nConnection: closed-ish\r\n", True),
                                              (b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\n", True),
                                              (b"HTTP/1.1 200 OK\r\n", True)])
def test_the_connection_is_kept_as_the_answer_says(head: bytes, reused: bool) -> None:
    async def scenario() -> bool:
        ca_pem, url, _ = await _serve([head + b"Content-Length: 2\r\n\r\n"] * 2, b"{}")
        channel = Channel(url, pinned_ssl_context(ca_pem), DIRECT, 5.0)
        await channel.connect()
        try:
            await channel.request("GET", url + "/v1/time", 1024)
            try:
                return (await channel.request("GET", url + "/v1/time", 1024)).body == b"{}"
            except ConnectionError:
                return False
        finally:
            channel.close()

    assert asyncio.run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT)) is reused


def test_an_answer_framed_by_length_by_chunks_or_by_the_close_is_read_whole() -> None:
    async def scenario() -> list[tuple[int, bytes]]:
        ca_pem, url, accepted = await _serve([b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\n"
                                              b"Content-Length: 2\r\nX-Twice: a\r\nx-twice: b\r\n\r\n{}",
                                              b"HTTP/1.1 204 No Content\r\nContent-Length: 9\r\n\r\n",
                                              b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                              b"1;ext=1\r\n{\r\n1\r\n}\r\n0\r\nTrailer: t\r\n\r\n",
                                              b"HTTP/1.0 200 OK\r\n\r\n[1]"], b"")
        channel = Channel(url, pinned_ssl_context(ca_pem), DIRECT, 5.0)
        await channel.connect()
        try:
            answers = [await channel.request("POST", url + "/v1/renew", 1024, {"csr": "x"}) for _ in range(4)]
            with pytest.raises(ConnectionError):  # the close ended the answer, and with it the connection
                await channel.request("GET", url + "/v1/time", 1024)
        finally:
            channel.close()
        assert accepted == [1]
        return [(a.status, a.body) for a in answers]

    # A 204 has no body whatever its Content-Length says (RFC 9112 6.3): the next answer follows its head.
    assert asyncio.run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT)) == [(201, b"{}"), (204, b""), (200, b"{}"),
                                                                            (200, b"[1]")]


@pytest.mark.parametrize("head", [b"SSH-2.0-OpenSSH_9.2\r\n\r\n", b"HTTP/1.1 2000 OK\r\n\r\n",
                                  b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
                                  b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
                                  b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-2\r\n",
                                  b"HTTP/1.1 200 OK\r\nX: " + b"a" * 20_000 + b"\r\n\r\n",
                                  b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"])
def test_an_answer_that_is_not_http_or_ends_early_is_a_connection_error(head: bytes) -> None:
    async def scenario() -> None:
        ca_pem, url, _ = await _serve([head], b"{}")
        channel = Channel(url, pinned_ssl_context(ca_pem), DIRECT, 5.0)
        await channel.connect()
        try:
            await channel.request("GET", url + "/v1/time", 1024)
        finally:
            channel.close()

    with pytest.raises(ConnectionError, match="the answer was not HTTP"):
        asyncio.run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))


def test_a_request_loads_no_http_library() -> None:
    """An idle agent keeps what its last request imported: http.client would bring the email parser with it."""
    import sys

    from tests.agent.cli_helpers import ROOT

    probe = (
        "import asyncio, sys\n"
        "from agent.identity.https import Channel\n"
        "from agent.identity.tls_trust import pinned_ssl_context\n"
        "from agent.proxy import DIRECT\n"
        "async def main(ca_pem, url):\n"
        "    channel = Channel(url, pinned_ssl_context(ca_pem), DIRECT, 5.0)\n"
        "    await channel.connect()\n"
        "    print((await channel.request('GET', url + '/v1/time', 1024)).body)\n"
        "    channel.close()\n"
        "asyncio.run(main(sys.stdin.read(), sys.argv[1]))\n"
        "print(sorted(m for m in ('http.client', 'email.parser', 'email.feedparser', 'aiohttp') if m in sys.modules))\n"
    )

    async def scenario() -> tuple[str, str]:
        ca_pem, url, _ = await _serve([b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n"], b"{}")
        child = await asyncio.create_subprocess_exec(sys.executable, "-c", probe, url, cwd=ROOT,
                                                     stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                                                     stderr=asyncio.subprocess.PIPE)
        out, err = await child.communicate(ca_pem.encode())
        return out.decode(), err.decode()

    out, err = asyncio.run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))
    assert out.splitlines() == ["b'{}'", "[]"], err
