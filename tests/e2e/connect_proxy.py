"""A minimal HTTP CONNECT proxy on 127.0.0.1, as a site's outbound proxy is to a gateway.

It carries a CONNECT to 127.0.0.1 or localhost, and to the addresses in
``routes``: there it connects to another port or address instead, the way a
site proxy reaches a controller the gateway cannot reach itself. A test
points the agent at an address in 127.0.0.0/8 where nothing listens
(``PROXY_ONLY_HOST``) and maps it to the real controller, so that only the
proxy's way works. With ``login``, a CONNECT without the right Basic
credentials gets 407. It answers 403 for a target it does not carry and 502
when the far end refuses, as a real proxy does, and records every CONNECT.
It runs in the caller's event loop (``start``) or in a thread of its own
(``proxy_in_thread``, for agents run as processes).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import threading
from collections.abc import Iterator

#: An address on the loopback network where nothing listens (the controller binds 127.0.0.1 only):
#: a connection straight to it is refused, one through the proxy's route arrives.
PROXY_ONLY_HOST = "127.0.0.2"
#: The proxy gives a client this long to send its CONNECT request.
REQUEST_TIMEOUT = 10.0
#: A CONNECT request with its headers is a few hundred bytes; this bounds a confused client.
MAX_REQUEST_HEAD = 16 * 1024
#: What one read moves from one side to the other.
PIPE_CHUNK = 65536
#: How long ``proxy_in_thread`` waits for the thread's server to listen.
START_TIMEOUT = 10.0


class ConnectProxy:
    """The proxy; ``carried`` lists the ``host:port`` of every CONNECT it carried, ``refused`` those it did not."""

    def __init__(self, login: tuple[str, str] | None = None, routes: dict[str, tuple[str, int]] | None = None) -> None:
        self.expected = None if login is None else "Basic " + base64.b64encode(":".join(login).encode()).decode()
        self.routes = dict(routes or {})
        self.carried: list[str] = []
        self.refused: list[str] = []
        #: Every request head received, as text: what a proxy (and whoever runs it) gets to see.
        self.heads: list[str] = []
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    def url(self, user: str | None = None, password: str | None = None) -> str:
        """The proxy's URL, with ``user:password@`` when given."""
        login = f"{user}:{password}@" if user is not None else ""
        return f"http://{login}127.0.0.1:{self.port}"

    async def start(self) -> ConnectProxy:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0, limit=MAX_REQUEST_HEAD)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    def close(self) -> None:
        if self.server is not None:
            self.server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            writer.close()
            return
        text = head.decode("latin-1")
        self.heads.append(text)
        method, target, _ = text.split("\r\n", 1)[0].split(" ", 2)
        host, _, port = target.rpartition(":")
        upstream = self.routes.get(target) or ((host, int(port)) if host in ("127.0.0.1", "localhost") else None)
        if method != "CONNECT" or upstream is None:
            self.refused.append(target)
            await self._answer(writer, b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
            return
        headers = dict(line.split(": ", 1) for line in text.split("\r\n")[1:] if ": " in line)
        if self.expected is not None and headers.get("Proxy-Authorization") != self.expected:
            self.refused.append(target)
            await self._answer(writer, b'HTTP/1.1 407 Proxy Authentication Required\r\n'
                                       b'Proxy-Authenticate: Basic realm="site"\r\nContent-Length: 0\r\n\r\n')
            return
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*upstream)
        except OSError:
            self.refused.append(target)
            await self._answer(writer, b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
            return
        self.carried.append(target)
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await writer.drain()
        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))

    @staticmethod
    async def _answer(writer: asyncio.StreamWriter, response: bytes) -> None:
        writer.write(response)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until the sender ends (bounded by what the two ends send each other)."""
    try:
        while data := await reader.read(PIPE_CHUNK):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


@contextlib.contextmanager
def proxy_in_thread(login: tuple[str, str] | None = None,
                    routes: dict[str, tuple[str, int]] | None = None) -> Iterator[ConnectProxy]:
    """A ConnectProxy running in an event loop of its own thread, for agents run as separate processes."""
    proxy = ConnectProxy(login, routes)
    loop = asyncio.new_event_loop()
    started = threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(proxy.start())
        started.set()
        loop.run_forever()
        pending = asyncio.all_tasks(loop)  # connections still piped when the test ended
        for task in pending:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert started.wait(START_TIMEOUT), "the test proxy did not start"
    try:
        yield proxy
    finally:
        loop.call_soon_threadsafe(proxy.close)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(START_TIMEOUT)
