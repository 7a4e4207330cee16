"""The controller's TLS listeners: the gateway endpoints, the relay and the management API.

One public listener by default; with ``--api-listen`` the management API moves
to a listener of its own and ``/api/`` is not served on the public one.
"""

from __future__ import annotations

import asyncio
import datetime
import inspect
import logging
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import aiohttp.http_exceptions
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization

import shared.service_manager as service_manager
from controller.admission import return_freed_memory
from controller.api import MAX_REQUEST_BODY, REFUSAL_EVENTS, GatewayApi, ManagementApi, too_large
from controller.audit_api import AuditApi
from controller.audit_chain import check_recent_at_start, log_checkpoint, log_checkpoints
from controller.blocking import API_POOL
from controller.bootstrap import listener_cert_lifetimes, server_names
from controller.ca import ensure_server_certificate, not_after_of
from controller.context import ControllerContext
from controller.dashboard.app import Dashboard
from controller.errors import BodyRefused, ControllerError, StartupError
from controller.fleet_api import FleetApi
from controller.grants_api import GrantsApi, grants_of
from controller.listener import REQUEST_BODY_DEADLINE, Listener, guarded_connection
from controller.metrics import ControllerMetrics
from controller.metrics_server import metrics_app, metrics_token
from controller.policy_admin import PolicyAdminApi
from controller.policy_api import PolicyExplainApi
from controller.relay.peering import Peering
from controller.relay.relay import Relay
from controller.relay_node import RelayIdentity, run_relay_node
from controller.relays import RELAY_LIST_REFRESH, relay_loads
from controller.relays_api import RelaysApi, relay_book
from controller.settings import host_port
from controller.signin.api import SigninApi, management_auth
from controller.signin.service import SigninService
from controller.watcher import StatusWatcher
from shared.protocol import TUNNEL_ALPN

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
API_PREFIX = "/api/"
#: Pending connections the kernel queues before the event loop accepts them;
#: a fleet reconnecting after an outage arrives in bursts.
LISTEN_BACKLOG = 512
#: Seconds given to open connections (tunnels included) to finish on shutdown.
SHUTDOWN_GRACE_SECONDS = 5.0
#: A renewal of the listener's certificate that failed (a full disk) is tried
#: again after this long, or sooner when less life is left: often enough to
#: succeed long before expiry, seldom enough not to fill the log.
CERT_RENEW_RETRY_SECONDS = 3600.0
#: Never wake sooner than this for a renewal: a clock that jumped does not spin the loop.
CERT_RENEW_MIN_WAIT = 1.0
#: Nor later than this: the wall clock may be set (NTP's first sync) while we sleep on the monotonic one.
CERT_RENEW_MAX_WAIT = 3600.0

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
            refusal = too_large()
            return error_response(refusal.code, refusal.message, refusal.status)
        code = _HTTP_ERROR_CODES.get(exception.status, "http_error")
        message = {
            404: f"There is nothing at {request.path}; check the URL.",
            405: f"{request.method} is not supported on {request.path}.",
        }.get(exception.status, exception.reason or "The request was refused.")
        return error_response(code, message, exception.status)
    except Exception:
        log.exception("unexpected error serving %s %s", request.method, request.path)
        return error_response("internal", "The controller failed on this request; see its log.", 500)


@web.middleware
async def request_deadlines(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The request head is complete: stop its deadline, and read any body within the body deadline.

    The body is read here, whole and bounded by MAX_REQUEST_BODY, so that the
    handlers' own read gets it at once; a body that trickles is cut off, and
    a client that goes away during it costs one log line.
    """
    connection = guarded_connection(request)
    if connection is not None:
        connection.request_started()
    try:
        if request.body_exists:
            deadline = connection.listener.limits.body_deadline if connection is not None else REQUEST_BODY_DEADLINE
            try:
                await asyncio.wait_for(request.read(), deadline)
            except TimeoutError:
                log.info("%s did not send the body of %s %s within %g s; connection closed",
                         request.remote, request.method, request.path, deadline)
                if connection is not None:
                    connection.abort()
                raise BodyRefused("body_timeout", f"The request body did not arrive within {deadline:g} s; "
                                  "send it at once or check the link.", 408) from None
            except web.HTTPRequestEntityTooLarge:
                raise too_large() from None
            except (ConnectionError, aiohttp.ClientConnectionError, aiohttp.http_exceptions.HttpProcessingError,
                    asyncio.IncompleteReadError) as error:
                log.info("%s went away during the body of %s %s (%s)", request.remote, request.method,
                         request.path, error.__class__.__name__)
                if connection is not None:
                    connection.abort()
                raise BodyRefused("body_incomplete", "The request body was cut off; send it again.", 400) from None
        return await handler(request)
    finally:
        if connection is not None:
            connection.request_finished()


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
                # An fsynced row: in a worker thread, like every other store write (controller/blocking.py).
                try:
                    await API_POOL.run(context.audit.record_anonymous, event, reason=error.code, remote=request.remote)
                except ControllerError:
                    log.warning("audit: %s not recorded (the controller is busy)", event)
            raise

    return audit


def build_app(context: ControllerContext, relay: Relay, *, gateway: bool = True, api: bool = True) -> web.Application:
    """An aiohttp application: the gateway routes and the relay, the management API, or both.

    ``--role controller`` serves no tunnels; ``--role relay`` serves tunnels alone (it holds no CA key).
    """
    settings = context.settings
    api = api and settings.serves_controller
    middlewares = [errors_as_json]
    if api:
        if context.signin is None:
            context.signin = SigninService(context.settings.signin, context.store, context.registry, context.audit)
        middlewares.append(management_auth(context))
    middlewares += [audit_unread_refusals(context), refuse_large_bodies, request_deadlines]
    app = web.Application(client_max_size=MAX_REQUEST_BODY, middlewares=middlewares)
    if gateway and settings.serves_controller:
        GatewayApi(context).add_routes(app)
        RelaysApi(context).add_gateway_routes(app)
    if gateway and settings.serves_tunnels:
        app.router.add_get("/v1/tunnel", relay.handle)
    if api:
        RelaysApi(context).add_management_routes(app)
        ManagementApi(context, relay.status).add_routes(app)
        FleetApi(context, relay.presence).add_routes(app)
        PolicyExplainApi(context).add_routes(app)
        PolicyAdminApi(context).add_routes(app)
        GrantsApi(context).add_routes(app)
        SigninApi(context).add_routes(app)
        AuditApi(context).add_routes(app)
        Dashboard(context, relay).add_routes(app)
    elif gateway and settings.serves_controller:
        async def api_elsewhere(request: web.Request) -> web.Response:
            return error_response(
                "not_found", "The management API is not served here but on its own listener (--api-listen); "
                "see outpostctl.toml for its URL.", 404)

        app.router.add_route("*", API_PREFIX + "{tail:.*}", api_elsewhere)
    return app


def watch_status_changes(context: ControllerContext) -> Callable[[web.Application], Any]:
    """While the app runs, poll the store so revocations made by other processes close our tunnels."""

    async def watching(_app: web.Application) -> AsyncIterator[None]:
        watcher = StatusWatcher(context.store, context.registry, policies=context.policy)
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
    # The server's order wins: a client offering Outpost's ALPN gets a tunnel on TLS directly
    # (controller/listener.py); HTTP clients (browsers, aiohttp, curl) get HTTP as before. A
    # controller-only process does not offer it: an agent's auto transport then goes elsewhere.
    tunnels = [TUNNEL_ALPN] if context.settings.serves_tunnels else []
    tls.set_alpn_protocols([*tunnels, "http/1.1"])
    return tls


class GuardedSite(web.SockSite):
    """A site whose connections are accepted by a Listener (caps, TLS handshake, deadlines), then served by aiohttp."""

    def __init__(self, runner: web.BaseRunner, sock: socket.socket, guard: Listener, **kwargs: Any) -> None:
        super().__init__(runner, sock, **kwargs)
        self.guard = guard

    @property
    def name(self) -> str:
        host, port = self._sock.getsockname()[:2]
        return "https://" + host_port(host, port)

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with its runner
        server = self._runner.server
        assert server is not None
        self.guard.start(self._sock, server)
        self._server = self.guard  # type: ignore[assignment]  # what stop() closes


def bind_listener(host: str, port: int, flag: str = "--listen") -> socket.socket:
    """Bind and listen before anything else starts, so ``port`` 0 yields the real port early."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        listener = socket.create_server((host, port), family=family, backlog=LISTEN_BACKLOG)
    except OSError as error:
        where = host_port(host, port)
        if error.errno == 98:  # EADDRINUSE
            raise StartupError(
                f"Cannot listen on {where}: the port is already in use; stop the other process or choose another {flag}."
            ) from None
        raise StartupError(f"Cannot listen on {where}: {error.strerror}; choose another {flag}.") from None
    listener.setblocking(False)
    return listener


class ControllerServer:
    """The running listeners; ``start`` serves on already bound sockets, ``stop`` shuts down cleanly."""

    def __init__(self, context: ControllerContext, listener: socket.socket,
                 api_listener: socket.socket | None = None, relay_identity: RelayIdentity | None = None) -> None:
        self.context = context
        #: ``--role relay``: who this relay is (controller/relay_node.py).
        self.relay_identity = relay_identity
        #: Set when this relay was retired: its tunnels are closed and the process stops.
        self.retired = asyncio.Event()
        self._listener = listener
        self._api_listener = api_listener
        self._runners: list[web.AppRunner] = []
        self.guards: list[Listener] = []
        self._tasks: list[asyncio.Task[None]] = []
        self.relay: Relay | None = None
        self._metrics_listener: socket.socket | None = None
        #: Reads the store in a thread: awaited, never cancelled, before the store may close.
        self._startup_check: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        return int(self._listener.getsockname()[1])

    @property
    def api_port(self) -> int | None:
        return int(self._api_listener.getsockname()[1]) if self._api_listener is not None else None

    @property
    def app(self) -> web.Application:
        """The application serving the management API (after ``start``)."""
        if not self._runners:
            raise RuntimeError("the server is not started")
        return self._runners[-1].app

    async def start(self) -> None:
        context = self.context
        self.relay = relay = Relay(context)
        relay.on_admitted = _mark_authenticated
        separate = self._api_listener is not None
        public = build_app(context, relay, api=not separate)
        public.on_shutdown.append(lambda _app: relay.close())
        public.cleanup_ctx.append(watch_status_changes(context))
        tls = server_ssl_context(context)
        front = Listener("listener", tls, context.settings.limits)
        if context.settings.serves_tunnels:
            # A controller-only process (--role controller) carries no tunnels on either transport.
            front.tunnel_handler = relay.serve_stream
        await self._serve(public, self._listener, front)
        if self._api_listener is not None:
            api = build_app(context, relay, gateway=False)
            await self._serve(api, self._api_listener, Listener("api listener", tls, context.settings.limits))
        # systemd's "started" (Type=notify) means the listeners accept.
        service_manager.notify_ready(f"serving on port {self.port}")
        loop = asyncio.get_running_loop()
        if self.relay_identity is not None:
            relay.peering = Peering(relay, self.relay_identity.name)  # dials across relays
            relay.peering.start()
            # A relay renews at the controller by its key; it holds no CA key to renew with itself.
            self._tasks.append(loop.create_task(run_relay_node(
                context, self.relay_identity, lambda: len(relay.by_identity),
                lambda cert: self.use_certificate(cert, server_ssl_context(context)), self._retire)))
        else:
            self._tasks.append(loop.create_task(self._renew_certificate()))
            self._tasks.append(loop.create_task(self._keep_relay_list(relay)))
        self._tasks.append(loop.create_task(return_freed_memory(self.guards)))
        self._tasks.append(loop.create_task(relay.presence.run()))
        chores = (context.policy.record_expiries, grants_of(context).expire_pending)
        self._tasks.append(loop.create_task(context.policy.counters.run(chores=chores)))
        if context.settings.metrics_listen_host is not None:
            await self._serve_metrics(relay, tls)
        self._tasks.append(loop.create_task(log_checkpoints(context.store)))
        self._startup_check = loop.create_task(check_recent_at_start(context.store, context.audit.chain_key))
        interval = service_manager.watchdog_interval()
        if interval:
            self._tasks.append(loop.create_task(service_manager.feed_watchdog(interval)))

    async def _serve(self, app: web.Application, sock: socket.socket, guard: Listener) -> None:
        # aiohttp 3.9 moved the shutdown grace from the site to the runner; 3.8
        # would hand an unknown runner keyword to every connection handler.
        runner_takes_grace = "shutdown_timeout" in inspect.signature(web.BaseRunner.__init__).parameters
        if runner_takes_grace:
            runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_GRACE_SECONDS)
        else:
            runner = web.AppRunner(app, access_log=None)
        site_grace = {} if runner_takes_grace else {"shutdown_timeout": SHUTDOWN_GRACE_SECONDS}
        await runner.setup()
        self._runners.append(runner)
        self.guards.append(guard)
        site = GuardedSite(runner, sock, guard, backlog=LISTEN_BACKLOG, **site_grace)
        await site.start()

    async def _serve_metrics(self, relay: Relay, tls: ssl.SSLContext) -> None:
        """``/metrics`` on its own listener, for the bearer of the metrics credential."""
        settings = self.context.settings
        assert settings.metrics_listen_host is not None
        token = metrics_token(settings.data_dir)
        self._metrics_listener = bind_listener(settings.metrics_listen_host, settings.metrics_listen_port or 0,
                                               "--metrics-listen")
        metrics = ControllerMetrics(self.context, relay.presence, self.guards, relay.traffic)
        self._tasks.append(asyncio.get_running_loop().create_task(metrics.lag.run()))
        await self._serve(metrics_app(metrics, token), self._metrics_listener,
                          Listener("metrics listener", tls, settings.limits))
        self._runners.insert(0, self._runners.pop())  # ``app`` stays the management API's

    @property
    def metrics_port(self) -> int | None:
        sock = self._metrics_listener
        return int(sock.getsockname()[1]) if sock is not None else None

    def _retire(self, reason: str) -> None:
        log.error("%s: closing every tunnel and stopping; agents move to the other relays", reason)
        if self.relay is not None:
            self.relay.retiring = True  # its agents move on at once, not at a come-back time
        self.retired.set()

    async def _keep_relay_list(self, relay: Relay) -> None:
        """The relay list agents get (enrollment, renewal, AUTH_OK): the live relays, and this process in role all."""
        context = self.context
        own_url = context.settings.relay_urls[0]
        while True:
            try:
                live = await API_POOL.run(relay_book(context).live)
            except ControllerError:
                live = None  # the store is away: keep the last list
            if live is not None:
                own = (own_url, len(relay.by_identity)) if context.settings.serves_tunnels else None
                context.relay_loads = loads = relay_loads(live, own)
                context.relay_urls[:] = [url for url, _ in loads]
            await asyncio.sleep(RELAY_LIST_REFRESH)

    async def _renew_certificate(self) -> None:
        """Renew the listeners' certificate while running, well before it expires; live tunnels keep theirs."""
        settings = self.context.settings
        lifetime, renew_before = listener_cert_lifetimes(settings)
        while True:
            current = x509.load_der_x509_certificate(self.context.server_certificate_der)
            due = not_after_of(current) - renew_before
            wait = (due - datetime.datetime.now(datetime.UTC)).total_seconds()
            if wait > CERT_RENEW_MAX_WAIT:
                await asyncio.sleep(CERT_RENEW_MAX_WAIT)
                continue
            await asyncio.sleep(max(CERT_RENEW_MIN_WAIT, wait))
            try:
                self.use_certificate(*await asyncio.to_thread(self.issue_certificate))
            except Exception as error:  # a full disk must not end the controller; it is retried
                left = (not_after_of(current) - datetime.datetime.now(datetime.UTC)).total_seconds()
                retry = max(CERT_RENEW_MIN_WAIT, min(CERT_RENEW_RETRY_SECONDS, left / 10))
                log.error("renewing the listener's certificate failed (%s); trying again in %g s, %g s before "
                          "it expires", error, retry, left)
                await asyncio.sleep(retry)

    def issue_certificate(self) -> tuple[x509.Certificate, ssl.SSLContext]:
        """A new listener certificate for the same key, written, and a TLS context holding it (a worker thread)."""
        settings = self.context.settings
        lifetime, renew_before = listener_cert_lifetimes(settings)
        cert, _ = ensure_server_certificate(
            self.context.ca, settings.server_cert_path, settings.server_key_path, server_names(settings),
            lifetime, renew_before, force=True,
        )
        return cert, server_ssl_context(self.context)

    def use_certificate(self, cert: x509.Certificate, tls: ssl.SSLContext) -> None:
        """Every new TLS handshake gets ``cert``; live connections keep theirs (the event loop)."""
        self.context.previous_server_certificate_der = self.context.server_certificate_der
        self.context.server_certificate_der = cert.public_bytes(serialization.Encoding.DER)
        for guard in self.guards:
            guard.tls = tls
        log.info("renewed the listener's certificate (serial %x, valid until %s UTC)", cert.serial_number,
                 not_after_of(cert).strftime("%Y-%m-%d %H:%M"))

    async def stop(self) -> None:
        service_manager.notify_stopping()
        for task in self._tasks:
            task.cancel()
        self._tasks = []
        if self._startup_check is not None:
            await self._startup_check  # a tenth of a second at most (STARTUP_VERIFY_EVENTS)
            self._startup_check = None
        # The API first: the public runner's shutdown closes the relay the API reports on.
        for runner in reversed(self._runners):
            await runner.cleanup()
        self._runners = []
        try:
            self.context.policy.counters.flush()  # the last interval's decisions, before the store closes
        except Exception as error:
            log.error("the policies' last decision counts were not written: %r", error)
        log_checkpoint(self.context.store)  # the head as this process leaves it
        self._listener.close()
        if self._api_listener is not None:
            self._api_listener.close()
        if self._metrics_listener is not None:
            self._metrics_listener.close()


def _mark_authenticated(request: web.Request) -> None:
    connection = guarded_connection(request)
    if connection is not None:
        connection.mark_authenticated()
