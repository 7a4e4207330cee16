"""One tunnel's asyncio glue on the relay side."""

from __future__ import annotations

from typing import Any

from aiohttp import web


class Relay:
    """Accepts tunnels at ``GET /v1/tunnel``; holds every live tunnel of this process."""

    def __init__(self, context: Any) -> None:
        self.context = context

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raise web.HTTPServiceUnavailable(text="relay not available yet")

    async def close(self) -> None:
        """Close every tunnel (process shutdown)."""
