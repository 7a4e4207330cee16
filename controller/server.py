"""The controller's TLS listeners started and stopped, with the background tasks of a running process.

One public listener by default; with ``--api-listen`` the management API moves
to a listener of its own and ``/api/`` is not served on the public one. What
each serves is controller/routes.py; their certificate, controller/listener_tls.py.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import web
from cryptography import x509

import shared.service_manager as service_manager
from controller.admission import return_freed_memory
from controller.audit_chain import check_recent_at_start, log_checkpoint, log_checkpoints
from controller.blocking import API_POOL, RELAY_POOL
from controller.box_relay import box_relay, refresh, run_box_relay
from controller.context import ControllerContext
from controller.errors import ControllerError, StartupError
from controller.grants_api import grants_of
from controller.listener import Listener, guarded_connection
from controller.listener_tls import issue_certificate, renew_certificate, server_ssl_context, use_certificate
from controller.metrics import ControllerMetrics
from controller.metrics_server import metrics_app, metrics_token
from controller.relay.peering import Peering
from controller.relay.relay import Relay
from controller.relay_node import RelayIdentity, run_relay_node
from controller.relays import RELAY_LIST_REFRESH, relay_loads, relay_url
from controller.relays_api import relay_book
from controller.routes import build_app
from controller.settings import host_port
from controller.watcher import StatusWatcher

log = logging.getLogger(__name__)

#: Pending connections the kernel queues before the event loop accepts them;
#: a fleet reconnecting after an outage arrives in bursts.
LISTEN_BACKLOG = 512
#: Seconds given to open connections (tunnels included) to finish on shutdown.
SHUTDOWN_GRACE_SECONDS = 5.0


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
        #: Role all: the tunnel URL of the box's row among the relays (controller/box_relay.py).
        self._box_url: str | None = None
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
            # A full relay's next tunnels wait before their handshakes, not refused after them.
            front.hold_while(lambda handshakes: relay.admitting + handshakes >= relay.max_admitting)
        await self._serve(public, self._listener, front)
        if self._api_listener is not None:
            api = build_app(context, relay, gateway=False)
            await self._serve(api, self._api_listener, Listener("api listener", tls, context.settings.limits))
        # systemd's "started" (Type=notify) means the listeners accept.
        service_manager.notify_ready(f"serving on port {self.port}")
        loop = asyncio.get_running_loop()
        if self.relay_identity is None and context.settings.role == "all":
            await self._join_relays(relay)
        if self.relay_identity is not None:
            relay.peering = Peering(relay, self.relay_identity.name)  # dials across relays
            relay.peering.start()
            # A relay renews at the controller by its key; it holds no CA key to renew with itself.
            self._tasks.append(loop.create_task(run_relay_node(
                context, self.relay_identity, lambda: len(relay.by_identity),
                lambda cert: self.use_certificate(cert, server_ssl_context(context)), self._retire)))
        else:
            self._tasks.append(loop.create_task(renew_certificate(context, self.guards)))
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

    async def _join_relays(self, relay: Relay) -> None:
        """The box as a relay among relays of its own: registered, publishing its binds, linking both ways."""
        box = box_relay(self.context)
        self._box_url = relay_url(box.address)
        registered = True
        try:
            await RELAY_POOL.run(refresh, self.context, box, False)
        except (ControllerError, OSError) as error:  # the store away at start: the heartbeat loop tries again
            log.warning("the box is not yet registered as a relay (%s); trying again", error)
            registered = False
        relay.peering = Peering(relay, box.name, box.cert_path, box.key_path)
        relay.peering.start()
        self._tasks.append(asyncio.get_running_loop().create_task(
            run_box_relay(self.context, box, lambda: len(relay.by_identity), registered)))

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

    def issue_certificate(self) -> tuple[x509.Certificate, ssl.SSLContext]:
        """A new listener certificate, written, and a TLS context holding it (controller/listener_tls.py)."""
        return issue_certificate(self.context)

    def use_certificate(self, cert: x509.Certificate, tls: ssl.SSLContext) -> None:
        """Every new TLS handshake gets ``cert`` (controller/listener_tls.py)."""
        use_certificate(self.context, self.guards, cert, tls)

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
                # The box is in the list by its row; its own URL only while its row is not (not yet written).
                listed = any(url == self._box_url for url, _ in live)
                own = (own_url, len(relay.by_identity)) if context.settings.serves_tunnels and not listed else None
                context.relay_loads = loads = relay_loads(live, own)
                context.relay_urls[:] = [url for url, _ in loads]
            await asyncio.sleep(RELAY_LIST_REFRESH)

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
