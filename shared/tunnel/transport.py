"""What a tunnel runs over: the protocol's byte stream on TLS directly, or in WebSocket messages.

``TunnelSession`` (shared.tunnel.session) reads and writes through a
``Transport``. ``StreamTransport`` is TLS with Outpost's own ALPN
(``TUNNEL_ALPN``): the frames are the TLS stream, so neither end needs an HTTP
stack. The WebSocket one (shared.tunnel.ws_transport) is for networks and
proxies that pass only HTTP; it is imported only when used, so a process that
tunnels over TLS never loads aiohttp for it.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

from shared.tunnel.splice import reset_connection

#: One read from the TLS stream at most this much: a full TLS record is 16 KiB, and a few of
#: them a read keep the per-read cost low without holding more than the core's own buffer.
RECEIVE_CHUNK = 256 * 1024
#: asyncio's StreamReader stops reading the socket past twice this: one chunk buffered, so a peer
#: that outruns the core is held back by TCP, as aiohttp's WebSocket reader holds it back.
STREAM_BUFFER_LIMIT = RECEIVE_CHUNK // 2

# WebSocket messages are cut at this size: the receiver's aiohttp message limit
# must be above it, and smaller messages interleave streams more fairly.
WS_MESSAGE_MAX = 512 * 1024
# The receiver's limit: one full message plus slack for a frame header.
WS_RECEIVE_MAX = WS_MESSAGE_MAX + 4096


class Transport:
    """The byte stream under one tunnel; both kinds share this interface."""

    async def receive(self) -> bytes | None:
        """The next bytes from the peer; None once the peer closed (or the connection broke)."""
        raise NotImplementedError

    async def send(self, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` and wait while the connection is congested; ConnectionError when it broke."""
        raise NotImplementedError

    async def close(self) -> None:
        """An orderly close (the caller bounds how long it may take)."""
        raise NotImplementedError

    def abort(self) -> None:
        """Drop the connection now with an RST."""
        raise NotImplementedError

    def congested(self) -> bool:
        """True when the write buffer is at its high-water mark (or the connection is gone)."""
        raise NotImplementedError

    @property
    def closed(self) -> bool:
        """True once the connection is closed or closing (an orderly close would find nothing to do)."""
        raise NotImplementedError

    def get_extra_info(self, name: str) -> Any:
        """The TLS transport's extra info (``ssl_object``, ``peername``)."""
        raise NotImplementedError


def transport_congested(transport: asyncio.BaseTransport | None) -> bool:
    if transport is None or transport.is_closing():
        return True
    try:
        size = transport.get_write_buffer_size()  # type: ignore[attr-defined]
        return bool(size >= transport.get_write_buffer_limits()[1])  # type: ignore[attr-defined]
    except (AttributeError, NotImplementedError):
        return True


def abort_transport(ws: Any) -> None:
    """Drop the TCP connection under an aiohttp WebSocket now, with an RST.

    aiohttp has no public abort for a WebSocket; its writer holds the
    transport on both aiohttp 3.8 and 3.14, client and server side. The RST
    makes the kernel discard what it still holds for a dead path instead of
    retrying it for minutes as an orphaned socket.
    """
    transport = getattr(getattr(ws, "_writer", None), "transport", None)
    if transport is not None:
        reset_connection(transport)


class StreamTransport(Transport):
    """The protocol's frames directly on a TLS stream (asyncio streams, ALPN ``TUNNEL_ALPN``)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def receive(self) -> bytes | None:
        try:
            data = await self.reader.read(RECEIVE_CHUNK)
        except (ConnectionError, ssl.SSLError, OSError):
            return None
        return data or None

    async def send(self, data: bytes | bytearray | memoryview) -> None:
        writer = self.writer
        if writer.transport.is_closing():
            raise ConnectionResetError("the connection is closed")
        writer.write(data)
        await writer.drain()

    async def close(self) -> None:
        writer = self.writer
        if not writer.transport.is_closing():
            if writer.can_write_eof():
                writer.write_eof()
            writer.close()
        try:
            await writer.wait_closed()
        except (ConnectionError, ssl.SSLError, OSError):
            pass

    def abort(self) -> None:
        reset_connection(self.writer.transport)

    def congested(self) -> bool:
        return transport_congested(self.writer.transport)

    @property
    def closed(self) -> bool:
        return self.writer.transport.is_closing()

    def get_extra_info(self, name: str) -> Any:
        return self.writer.get_extra_info(name)
