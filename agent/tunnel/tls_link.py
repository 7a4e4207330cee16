"""The tunnel's TLS connection to a relay without WebSocket: Outpost's ALPN, directly or through the HTTPS proxy.

Through a proxy the connection is a CONNECT (with the proxy's Basic login
as a header, never in a message), then TLS end to end inside it, exactly as
for the WebSocket. The relay must choose ``TUNNEL_ALPN``; one that does not
(an older relay, or something in the path that only passes HTTP) raises
``AlpnRefused``, which ``auto`` answers by falling back to the WebSocket.
"""

from __future__ import annotations

import asyncio
import ssl
from urllib.parse import urlsplit

from agent.errors import ControllerUnreachable, ProxyFailed, TrustError
from agent.identity.tls_trust import describe_network_error
from agent.proxy import ProxyRoute, ProxySettings
from shared.protocol import TUNNEL_ALPN
from shared.tunnel.transport import StreamTransport, open_tunnel_connection

#: A proxy's answer to CONNECT is a status line and a few headers; more than this is not a proxy.
MAX_PROXY_ANSWER = 16 * 1024
#: The default port of a ``wss://`` relay URL.
HTTPS_PORT = 443


class AlpnRefused(ControllerUnreachable):
    """TLS to the relay worked, but it did not choose Outpost's ALPN: it speaks only HTTP (WebSocket)."""


class NotReached(ControllerUnreachable):
    """No TCP connection to the relay (or the proxy) at all: a WebSocket would not get further."""


def relay_address(relay_url: str) -> tuple[str, int]:
    parts = urlsplit(relay_url)
    return parts.hostname or "", parts.port or HTTPS_PORT


def tunnel_tls_context(context: ssl.SSLContext) -> ssl.SSLContext:
    """``context`` (the pinned one) offering Outpost's ALPN; set once, on a context used for nothing else."""
    context.set_alpn_protocols([TUNNEL_ALPN])
    return context


async def _connect_through(route: ProxyRoute, host: str, port: int, who: str
                           ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    proxy = urlsplit(route.url)
    try:
        reader, writer = await open_tunnel_connection(proxy.hostname or "", proxy.port or 80)
    except OSError as error:
        raise ProxyFailed(route.unreachable(describe_network_error(error))) from None
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    head = f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in route.headers)
    writer.write(head.encode("latin-1") + b"\r\n")
    try:
        answer = await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError:
        writer.close()
        raise ProxyFailed(route.unreachable("its answer to CONNECT was too long")) from None
    except (asyncio.IncompleteReadError, OSError) as error:
        writer.close()
        raise ProxyFailed(route.unreachable(describe_network_error(error))) from None
    status_line = answer.split(b"\r\n", 1)[0].split()
    status = int(status_line[1]) if len(status_line) >= 2 and status_line[1].isdigit() else 0
    if status != 200:
        writer.close()
        raise ProxyFailed(route.refused(status, who), status)
    return reader, writer


async def open_tls_link(relay_url: str, context: ssl.SSLContext, proxy: ProxySettings) -> StreamTransport:
    """TLS to the relay with ``TUNNEL_ALPN`` chosen; the caller checks the certificate (PinnedTLS.check).

    Raises NotReached (no TCP), ProxyFailed, TrustError (TLS failed), AlpnRefused
    and ControllerUnreachable (the connection broke during the handshake).
    """
    host, port = relay_address(relay_url)
    who = f"the relay at {relay_url}"
    route = proxy.route(relay_url)
    if route is not None:
        reader, writer = await _connect_through(route, host, port, who)
    else:
        try:
            reader, writer = await open_tunnel_connection(host, port)
        except OSError as error:
            raise NotReached(f"cannot reach the relay at {relay_url}: {describe_network_error(error)}") from None
    try:
        await writer.start_tls(context, server_hostname=host)
    except ssl.SSLCertVerificationError as error:
        writer.transport.abort()
        raise TrustError(
            f"the relay at {relay_url} presented a certificate not issued by the pinned controller CA "
            f"({error.verify_message}); check the relay address, or whether something intercepts TLS") from None
    except (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionError, asyncio.IncompleteReadError) as error:
        # Closed mid-handshake: what a path that passes only HTTP does to a TLS it cannot read.
        writer.transport.abort()
        raise ControllerUnreachable(
            f"the connection to the relay at {relay_url} broke during TLS: {describe_network_error(error)}") from None
    except ssl.SSLError as error:
        writer.transport.abort()
        raise TrustError(f"TLS with the relay at {relay_url} failed: {error.reason or error}") from None
    except OSError as error:
        writer.transport.abort()
        raise ControllerUnreachable(
            f"the connection to the relay at {relay_url} broke during TLS: {describe_network_error(error)}") from None
    ssl_object = writer.get_extra_info("ssl_object")
    if ssl_object is None or ssl_object.selected_alpn_protocol() != TUNNEL_ALPN:
        writer.transport.abort()
        raise AlpnRefused(f"the relay at {relay_url} does not speak {TUNNEL_ALPN} on TLS")
    return StreamTransport(reader, writer)
