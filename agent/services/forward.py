"""Dial: a local TCP port whose connections become streams to a named service.

The gateway-side half (bind: a stream becomes a connection to a local
service) is in ``agent.tunnel.client.AgentSession.on_stream_opened``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from shared.tunnel.session import ChannelReset, TunnelSession, splice_socket

log = logging.getLogger(__name__)

# How long a dial waits for the far gateway to connect its local service: a
# satellite round trip or two, plus the far side's own connect timeout.
ACCEPT_TIMEOUT = 20.0


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
