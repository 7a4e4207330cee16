"""Shared by the clock tests: a controller impostor with the real controller's
certificate that reports a chosen time, and clocks that read a chosen year."""

from __future__ import annotations

import contextlib
import ssl
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from aiohttp import web

YEAR = 365 * 86400
#: 1970-01-02 00:00 UTC, where a Raspberry Pi without a real-time clock boots.
BOOTED_IN_1970 = 86_400.0


def local_clock_at(start: float) -> Callable[[], float]:
    """A wall clock that starts at ``start`` now and runs at the real rate."""
    origin = time.time()
    return lambda: start + (time.time() - origin)


def local_clock_shifted(seconds: float) -> Callable[[], float]:
    return lambda: time.time() + seconds


@contextlib.asynccontextmanager
async def time_server(controller_data: Path, body: bytes) -> AsyncIterator[str]:
    """A TLS server on 127.0.0.1 with the controller's own certificate, answering /v1/time with ``body``.

    It plays a controller whose clock is wrong (the certificate is genuine).
    """
    async def answer(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_get("/v1/time", answer)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(controller_data / "tls" / "server.pem", controller_data / "tls" / "server.key")
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"https://127.0.0.1:{port}"
    finally:
        await runner.cleanup()
