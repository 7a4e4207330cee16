"""Dial and bind side by side: the two ways a stream meets a local TCP connection.

Dial: a local TCP port whose connections become streams to a named service
(``DialListener``). Bind: a stream the relay opens to a service this gateway
hosts becomes a connection to that service's local address (``serve_bound``).
Either way the two are then spliced until both sides are done.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping

from shared.protocol import ErrorCode
from shared.tunnel.channel import StreamChannel
from shared.tunnel.session import ChannelReset, TunnelSession, splice_socket

log = logging.getLogger(__name__)

# How long a dial waits for the far gateway to connect its local service: a
# satellite round trip or two, plus the far side's own connect timeout.
ACCEPT_TIMEOUT = 20.0
# Connecting to a bound service on the gateway itself (loopback or LAN).
LOCAL_CONNECT_TIMEOUT = 10.0


class DialListener:
    """Listens on ``host:port``; each connection is carried to ``service``."""

    def __init__(self, service: str, host: str, port: int, current_session: Callable[[], TunnelSession | None]) -> None:
        self.service = service
        self.host = host
        self.port = port
        self._current_session = current_session
        self._server: asyncio.base_events.Server | None = None
        self.last_error: str | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        sock = self._server.sockets[0]
        self.port = sock.getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session = self._current_session()
        if session is None or session.conn.closed:
            self.last_error = "no tunnel is up"
            log.warning("dial %s: refused a local connection: no tunnel is up", self.service)
            writer.close()
            return
        channel = session.open_stream(self.service)
        try:
            await asyncio.wait_for(channel.wait_accepted(), ACCEPT_TIMEOUT)
        except ChannelReset as exc:
            self.last_error = exc.reason or exc.code.name
            log.warning("dial %s refused: %s", self.service, self.last_error)
            writer.close()
            return
        except TimeoutError:
            self.last_error = "the far end did not answer in time"
            channel.reset(reason="dial timed out")
            writer.close()
            return
        await splice_socket(channel, reader, writer)


async def serve_bound(session: TunnelSession, channel: StreamChannel, binds: Mapping[str, tuple[str, int]]) -> None:
    """Bind: connect the stream the relay opened to the local address of its service, accept it, and splice.

    A service this gateway does not bind, or one that cannot be reached,
    resets the stream with the reason, which the dialer sees.
    """
    target = binds.get(channel.service)
    if target is None:
        channel.reset(ErrorCode.SERVICE_UNKNOWN, f"this gateway does not bind {channel.service}")
        return
    host, port = target
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), LOCAL_CONNECT_TIMEOUT)
    except (TimeoutError, OSError) as exc:
        log.warning("service %s: cannot connect to %s:%d: %s", channel.service, host, port, exc)
        channel.reset(ErrorCode.CONNECT_FAILED,
                      f"the gateway could not connect to {channel.service} at {host}:{port}")
        return
    if channel.error is not None or session.conn.closed:
        writer.close()  # the dialer gave up while we connected
        return
    session.conn.accept_stream(channel.stream_id)
    await session.flush()
    log.info("stream %d: %s dialled %s", channel.stream_id, channel.peer or "?", channel.service)
    await splice_socket(channel, reader, writer)
