"""The tunnel's byte stream in binary WebSocket messages (aiohttp, client or server side).

For networks and proxies that pass only HTTP; the frames may straddle
messages, since the core parses a byte stream. Only this module of the
tunnel imports aiohttp, and only a WebSocket tunnel imports it.
"""

from __future__ import annotations

from typing import Any

from aiohttp import WSMsgType

from shared.tunnel.transport import (
    WS_MESSAGE_MAX,
    Transport,
    abort_transport,
    transport_congested,
    transport_unsent,
)


class NotBinary(ValueError):
    """The peer sent a text WebSocket message, which is not part of the protocol."""


class WebSocketTransport(Transport):
    """One aiohttp WebSocket (``ClientWebSocketResponse`` or ``web.WebSocketResponse``)."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws

    async def receive(self) -> bytes | None:
        msg = await self.ws.receive()
        if msg.type == WSMsgType.BINARY:
            data: bytes = msg.data
            return data
        if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
            return None
        raise NotBinary("text WebSocket messages are not part of the protocol")

    async def send(self, data: bytes | bytearray | memoryview) -> None:
        if len(data) <= WS_MESSAGE_MAX:
            await self.ws.send_bytes(data)
            return
        view = memoryview(data)
        for start in range(0, len(data), WS_MESSAGE_MAX):
            await self.ws.send_bytes(view[start:start + WS_MESSAGE_MAX])

    async def close(self) -> None:
        await self.ws.close()

    def abort(self) -> None:
        abort_transport(self.ws)

    def congested(self) -> bool:
        return transport_congested(getattr(getattr(self.ws, "_writer", None), "transport", None))

    def unsent(self) -> int:
        return transport_unsent(getattr(getattr(self.ws, "_writer", None), "transport", None))

    @property
    def closed(self) -> bool:
        return bool(self.ws.closed)

    def get_extra_info(self, name: str) -> Any:
        return self.ws.get_extra_info(name)
