"""One process, one TLS listener: the gateway endpoints, the management API and the relay."""

from __future__ import annotations

import asyncio
import hmac
import inspect
import logging
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web

import shared.service_manager as service_manager
from controller.api import MAX_REQUEST_BODY, REFUSAL_EVENTS, GatewayApi, ManagementApi, too_large
from controller.context import ControllerContext
from controller.errors import BodyRefused, ControllerError, StartupError
from controller.relay.session import Relay
from controller.settings import host_port
from controller.watcher import StatusWatcher

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
API_PREFIX = "/api/"
#: Pending connections the kernel queues before the event loop accepts them;
#: a fleet reconnecting after an outage arrives in bursts.
LISTEN_BACKLOG = 512
#: Seconds given to open connections (tunnels included) to finish on shutdown.
SHUTDOWN_GRACE_SECONDS = 5.0

_HTTP_ERROR_CODES = {
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
}


def error_response(code: str, message: str, status: int) -> web.Response:
    return web.json_response({"error": code, "message": message}, status=status)


@web.middleware
async def errors_as_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every refusal leaves as ``{"error": code, "message": sentence}``; no tracebacks leave."""
    try:
        return await handler(request)
    except ControllerError as error:
        return error_response(error.code, error.message, error.status)
    except web.HTTPException as exception:
        if exception.status < 400:
            raise
        if exception.status == 413:
            error = too_large()
            return error_response(error.code, error.message, error.status)
        code = _HTTP_ERROR_CODES.get(exception.status, "http_error")
        message = {
            404: f"There is nothing at {request.path}; check the URL.",
            405: f"{request.method} is not supported on {request.path}.",
        }.get(exception.status, exception.reason or "The request was refused.")
        return error_response(code, message, exception.status)
    except Exception:
        log.exception("unexpected error serving %s %s", request.method, request.path)
        return error_response("internal", "The controller failed on this request; see its log.", 500)


def admin_auth(context: ControllerContext) -> Any:
    expected = ("Bearer " + context.admin_token).encode("utf-8")

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith(API_PREFIX):
            presented = request.headers.get("Authorization", "").encode("utf-8", "replace")
            # Constant time: the comparison must not tell how much of a guess was right.
            if not hmac.compare_digest(presented, expected):
                return error_response(
                    "unauthorized",
                    "This request needs the admin token (Authorization: Bearer ...); see outpostctl.toml.",
                    401,
                )
        return await handler(request)

    return check


@web.middleware
async def refuse_large_bodies(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse a declared oversized body from its header, before a byte of it is read."""
    if request.content_length is not None and request.content_length > MAX_REQUEST_BODY:
        raise too_large()
    return await handler(request)


def audit_unread_refusals(context: ControllerContext) -> Any:
    """Audit an enrollment or renewal refused before its content was read (413, not a JSON object).

    Nobody proved to be anybody yet, so the event names the peer's address
    and the reason only, and goes through the audit log's anonymous budget,
    like the refusals judged on the content (controller/enrollment.py,
    controller/renewal.py).
    """

    @web.middleware
    async def audit(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except BodyRefused as error:
            event = REFUSAL_EVENTS.get(request.path) if request.method == "POST" else None
            if event is not None:
                context.audit.record_anonymous(event, reason=error.code, remote=request.remote)
            raise

    return audit


def build_app(context: ControllerContext) -> web.Application:
    """The aiohttp application: gateway routes, management API, and the relay at /v1/tunnel."""
    app = web.Application(
        client_max_size=MAX_REQUEST_BODY,
        middlewares=[errors_as_json, admin_auth(context), audit_unread_refusals(context), refuse_large_bodies],
    )
    relay = Relay(context)
    GatewayApi(context).add_routes(app)
    ManagementApi(context, relay.status).add_routes(app)
    app.router.add_get("/v1/tunnel", relay.handle)

    async def close_relay(_app: web.Application) -> None:
        await relay.close()

    app.on_shutdown.append(close_relay)
    app.cleanup_ctx.append(watch_status_changes(context))
    return app


def watch_status_changes(context: ControllerContext) -> Callable[[web.Application], Any]:
    """While the app runs, poll the store so revocations made by other processes close our tunnels."""

    async def watching(_app: web.Application) -> AsyncIterator[None]:
        watcher = StatusWatcher(context.store, context.registry)
        task = asyncio.get_running_loop().create_task(watcher.run())
        yield
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass

    return watching


def server_ssl_context(context: ControllerContext) -> ssl.SSLContext:
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.minimum_version = ssl.TLSVersion.TLSv1_2
    tls.load_cert_chain(str(context.settings.server_cert_path), str(context.settings.server_key_path))
    return tls


def bind_listener(host: str, port: int) -> socket.socket:
    """Bind and listen before anything else starts, so ``port`` 0 yields the real port early."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        listener = socket.create_server((host, port), family=family, backlog=LISTEN_BACKLOG)
    except OSError as error:
        where = host_port(host, port)
        if error.errno == 98:  # EADDRINUSE
            raise StartupError(
                f"Cannot listen on {where}: the port is already in use; stop the other process or choose another --listen."
            ) from None
        raise StartupError(f"Cannot listen on {where}: {error.strerror}; choose another --listen.") from None
    listener.setblocking(False)
    return listener


class ControllerServer:
    """The running listener; ``start`` serves on an already bound socket, ``stop`` shuts down cleanly."""

    def __init__(self, context: ControllerContext, listener: socket.socket) -> None:
        self.context = context
        self._listener = listener
        self._runner: web.AppRunner | None = None
        self._watchdog: asyncio.Task | None = None

    @property
    def port(self) -> int:
        return int(self._listener.getsockname()[1])

    @property
    def app(self) -> web.Application:
        """The application being served (after ``start``)."""
        if self._runner is None:
            raise RuntimeError("the server is not started")
        return self._runner.app

    async def start(self) -> None:
        app = build_app(self.context)
        # aiohttp 3.9 moved the shutdown grace from the site to the runner; 3.8
        # would hand an unknown runner keyword to every connection handler.
        runner_takes_grace = "shutdown_timeout" in inspect.signature(web.BaseRunner.__init__).parameters
        grace = {"shutdown_timeout": SHUTDOWN_GRACE_SECONDS}
        self._runner = web.AppRunner(app, access_log=None, **(grace if runner_takes_grace else {}))
        await self._runner.setup()
        site = web.SockSite(
            self._runner,
            self._listener,
            ssl_context=server_ssl_context(self.context),
            backlog=LISTEN_BACKLOG,
            **({} if runner_takes_grace else grace),
        )
        await site.start()
        # systemd's "started" (Type=notify) means the listener accepts.
        service_manager.notify_ready(f"serving on port {self.port}")
        interval = service_manager.watchdog_interval()
        if interval:
            self._watchdog = asyncio.get_running_loop().create_task(service_manager.feed_watchdog(interval))

    async def stop(self) -> None:
        service_manager.notify_stopping()
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self._listener.close()
