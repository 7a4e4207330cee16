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
import collections
import collections.abc
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


class TunnelReader(asyncio.StreamReader):
    """A ``StreamReader`` that, once the tunnel starts (``start_chunks``), hands on each received chunk as it came.

    ``StreamReader`` extends a ``bytearray`` with every chunk the TLS layer
    decrypted and slices a new ``bytes`` out of it for each read: two copies
    of every byte a tunnel receives, a tenth of a receiving process's time in
    a bulk transfer (py-spy). The core parses ``bytes`` of any chunking, so
    the chunk the TLS layer made is passed on untouched. Before
    ``start_chunks`` it is an ordinary ``StreamReader`` (a proxy's answer to
    CONNECT is read line-wise). It uses the base class's own state
    (``_buffer``, ``_eof``, ``_exception``, ``_paused``, ``_transport``), the
    same from Python 3.8 to 3.13, so that ``StreamReaderProtocol`` and
    ``StreamWriter`` keep driving it as they drive any reader.
    """

    def __init__(self, limit: int = STREAM_BUFFER_LIMIT) -> None:
        super().__init__(limit=limit)
        self._chunks: collections.deque[bytes] = collections.deque()
        self._held = 0
        self._chunked = False
        #: offered each chunk first while ``read_chunk`` waits with nothing queued (``StreamTransport.set_receiver``)
        self.direct: collections.abc.Callable[[bytes], bool] | None = None

    def start_chunks(self) -> None:
        """From now on ``read_chunk`` reads; what the stream already buffered comes first."""
        base: Any = self  # the base class's state is untyped
        if base._buffer:
            self._chunks.append(bytes(base._buffer))
            self._held += len(base._buffer)
            base._buffer.clear()
        self._chunked = True

    def feed_data(self, data: Any) -> None:
        if not self._chunked:
            super().feed_data(data)
            return
        if not data:
            return
        base: Any = self
        chunk = data if type(data) is bytes else bytes(data)
        direct = self.direct
        # Only while the reading task waits with nothing in hand, so these bytes cannot overtake earlier ones.
        if direct is not None and base._waiter is not None and not self._chunks and direct(chunk):
            return
        self._chunks.append(chunk)
        self._held += len(chunk)
        base._wakeup_waiter()
        # As StreamReader does past twice its limit: TCP holds back a peer that outruns the core.
        if base._transport is not None and not base._paused and self._held > 2 * base._limit:
            base._transport.pause_reading()
            base._paused = True

    def at_eof(self) -> bool:
        base: Any = self
        return bool(base._eof and not self._chunks and not base._buffer)

    async def read_chunk(self) -> bytes:
        """The next chunk as received; b"" at the end. Raises what broke the connection."""
        base: Any = self
        chunks = self._chunks
        while not chunks:
            if base._exception is not None:
                raise base._exception
            if base._eof:
                return b""
            await base._wait_for_data("read_chunk")
        chunk = chunks.popleft()
        self._held -= len(chunk)
        if base._paused and self._held <= base._limit:
            base._paused = False
            base._transport.resume_reading()
        return chunk


async def open_tunnel_connection(host: str, port: int) -> tuple[TunnelReader, asyncio.StreamWriter]:
    """``asyncio.open_connection`` with a ``TunnelReader``."""
    loop = asyncio.get_running_loop()
    reader = TunnelReader()
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    transport, _ = await loop.create_connection(lambda: protocol, host, port)
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)


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

    def unsent(self) -> int:
        """Bytes in the write buffer, not yet taken by the kernel (UNSENT_WHEN_CLOSED once closing)."""
        raise NotImplementedError

    #: True when ``write_nowait`` and ``set_receiver`` work: a WebSocket's writes are coroutines.
    writes_nowait = False

    def set_receiver(self, receiver: collections.abc.Callable[[bytes], bool] | None) -> None:
        """Offer received bytes to ``receiver`` first, in the transport's callback, while ``receive`` waits
        with nothing queued: True when it handled them (``receive`` never sees them), False queues them."""
        raise NotImplementedError

    def write_nowait(self, data: bytes) -> None:
        """Hand ``data`` to the connection now, from a callback that cannot await (see ``writes_nowait``);
        ConnectionError when it is closed."""
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


#: What a closing connection's write buffer counts as: more than any bound on one, so nothing more is queued.
UNSENT_WHEN_CLOSED = 2**62


def transport_unsent(transport: asyncio.BaseTransport | None) -> int:
    if transport is None or transport.is_closing():
        return UNSENT_WHEN_CLOSED
    try:
        return int(transport.get_write_buffer_size())  # type: ignore[attr-defined]
    except (AttributeError, NotImplementedError):
        return 0


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
        if isinstance(reader, TunnelReader):
            reader.start_chunks()
            self._read = reader.read_chunk
        else:
            self._read = self._read_stream

    async def _read_stream(self) -> bytes:
        return await self.reader.read(RECEIVE_CHUNK)

    async def receive(self) -> bytes | None:
        try:
            data = await self._read()
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

    writes_nowait = True

    def set_receiver(self, receiver: collections.abc.Callable[[bytes], bool] | None) -> None:
        if isinstance(self.reader, TunnelReader):
            self.reader.direct = receiver

    def write_nowait(self, data: bytes) -> None:
        if self.writer.transport.is_closing():
            raise ConnectionResetError("the connection is closed")
        self.writer.write(data)

    def abort(self) -> None:
        reset_connection(self.writer.transport)

    def congested(self) -> bool:
        return transport_congested(self.writer.transport)

    def unsent(self) -> int:
        return transport_unsent(self.writer.transport)

    @property
    def closed(self) -> bool:
        return self.writer.transport.is_closing()

    def get_extra_info(self, name: str) -> Any:
        return self.writer.get_extra_info(name)
