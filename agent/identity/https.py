"""A small HTTPS client on the standard library, for the agent's few requests a day.

Enrollment (the CA fetch included), renewal, recovery and the controller's
time are a handful of small requests; an HTTP stack resident for them would
outweigh the agent's own code. Here one ``Channel`` is one connection
(agent.identity.http1 over a socket this module connects and wraps, in a
worker thread so the event loop never blocks): straight to the host, or through the
HTTPS proxy's CONNECT with the TLS end to end inside it. The caller checks
the TLS session (``ssl_object``) before it sends anything
(agent.identity.pinned_tls). The socket never reconnects by itself: a
second connection could only be a plain one, so a dropped one is an error.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
from typing import Any
from urllib.parse import urlsplit

from agent.identity.http1 import Answer, Connection
from agent.proxy import ProxyRoute, ProxySettings

#: A proxy's answer to CONNECT is a status line and a few headers; more than this is not a proxy.
MAX_PROXY_ANSWER = 16 * 1024
#: The default ports of the URLs the agent is given.
HTTPS_PORT = 443
HTTP_PROXY_PORT = 80


class ProxyUnreachable(OSError):
    """No connection to the proxy itself (the reason is the OSError's)."""


class ProxyRefused(OSError):
    """The proxy answered the CONNECT with ``status`` (not 200)."""

    def __init__(self, status: int) -> None:
        super().__init__(f"the proxy answered CONNECT with HTTP {status}")
        self.status = status


def _connect_through(route: ProxyRoute, host: str, port: int, timeout: float) -> socket.socket:
    proxy = urlsplit(route.url)
    try:
        sock = socket.create_connection((proxy.hostname or "", proxy.port or HTTP_PROXY_PORT), timeout)
    except OSError as error:
        raise ProxyUnreachable(error.errno, error.strerror or str(error)) from None
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    head = f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in route.headers)
    try:
        sock.sendall(head.encode("latin-1") + b"\r\n")
        answer = b""
        # Byte by byte up to the blank line: nothing of the far end's TLS may be read here.
        while not answer.endswith(b"\r\n\r\n"):
            byte = sock.recv(1)
            if not byte or len(answer) >= MAX_PROXY_ANSWER:
                raise ProxyUnreachable(0, "it did not answer the CONNECT")
            answer += byte
    except BaseException:
        sock.close()
        raise
    words = answer.split(b"\r\n", 1)[0].split()
    status = int(words[1]) if len(words) >= 2 and words[1].isdigit() else 0
    if status != 200:
        sock.close()
        raise ProxyRefused(status)
    return sock


class Channel:
    """One HTTPS connection to ``url``'s host: ``connect`` (returns the TLS session to check), then requests."""

    def __init__(self, url: str, context: ssl.SSLContext, proxy: ProxySettings, timeout: float) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or ""
        self.port = parts.port or HTTPS_PORT
        self.url = url
        self.context = context
        self.route = proxy.route(url)
        self.timeout = timeout
        self._http: Connection | None = None

    async def connect(self) -> ssl.SSLSocket:
        return await asyncio.to_thread(self._connect)

    def _connect(self) -> ssl.SSLSocket:
        if self.route is not None:
            raw = _connect_through(self.route, self.host, self.port, self.timeout)
        else:
            raw = socket.create_connection((self.host, self.port), self.timeout)
        try:
            tls = self.context.wrap_socket(raw, server_hostname=self.host)
        except BaseException:
            raw.close()
            raise
        name = f"[{self.host}]" if ":" in self.host else self.host
        self._http = Connection(tls, name if self.port == HTTPS_PORT else f"{name}:{self.port}")
        return tls

    async def request(self, method: str, url: str, limit: int, body: Any = None) -> Answer:
        """One request on the connection; the answer's body is refused past ``limit`` bytes."""
        return await asyncio.to_thread(self._exchange, method, url, limit, body)

    def _exchange(self, method: str, url: str, limit: int, body: Any) -> Answer:
        if self._http is None:
            raise ConnectionError("not connected")
        parts = urlsplit(url)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        payload = None if body is None else json.dumps(body).encode()
        return self._http.exchange(method, target, url, limit, payload)

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None
