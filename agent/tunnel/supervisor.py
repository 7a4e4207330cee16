"""The tunnel supervisor: one tunnel to one of the relays kept up, reconnecting with backoff,
and ``serve_agent``, which runs it beside the dials and the certificate and clock keepers until a stop signal."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any

from agent.errors import OutpostError, RelayBusy, TrustError, TunnelRefused
from agent.identity.refusals import DISABLED, DisabledGate, identity_status
from agent.services.forward import DialListener
from agent.tunnel.backoff import Backoff
from agent.tunnel.client import AgentSession, TunnelCredentials, TunnelOptions, open_tunnel
from agent.tunnel.relays import RelayRotation, valid_relay_list
from agent.tunnel.report import Reporter
from agent.tunnel.status import OPENSSL_BACKEND, TunnelStats, clock_time, report_offline
from shared import service_manager
from shared.protocol import ErrorCode

if TYPE_CHECKING:
    from agent.identity.keeper import CertificateKeeper

log = logging.getLogger(__name__)

# status.json is rewritten at most this often while traffic flows: the state
# directory may live on an SD card that wears with every write.
STATUS_INTERVAL = 10.0
#: The wait before the next relay when the current one cannot be reached: a
#: uniform draw up to this, so a dead relay's whole fleet does not land on the
#: next relay in the same instant, yet each gateway is back within a second.
FAILOVER_JITTER = 1.0


class _LazyHttp:
    """The aiohttp session for WebSocket tunnels, made on first use and closed at the end."""

    def __init__(self) -> None:
        self.http: Any = None

    def get(self) -> Any:
        if self.http is None:
            import aiohttp

            # The environment's proxy variables are read at the edge (the CLI), never here.
            self.http = aiohttp.ClientSession(trust_env=False)
        return self.http

    async def __aenter__(self) -> _LazyHttp:
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.http is not None:
            await self.http.close()


class TunnelSupervisor:
    """Keeps one tunnel to one of the relays up, reconnecting with backoff."""

    def __init__(self, relays: list[str], credentials: TunnelCredentials, options: TunnelOptions,
                 write_status: Callable[[dict[str, Any]], None] | None = None, backoff: Backoff | None = None,
                 save_relays: Callable[[list[str]], None] | None = None,
                 gate: DisabledGate | None = None, prefer_relays: tuple[str, ...] = ()) -> None:
        if not relays:
            raise OutpostError("the enrollment gave no relay addresses; re-enroll or ask central ops")
        self.rotation = RelayRotation(relays, prefer_relays)
        self.credentials = credentials
        self.options = options
        self.backoff = backoff or Backoff()
        #: shared with the certificate keeper: a disabled identity is asked about at most once per interval
        self.gate = gate or DisabledGate()
        #: called with the controller's relay list when it changes (persisted for the next start)
        self._save_relays = save_relays
        self.stats = TunnelStats()
        self.session: AgentSession | None = None
        self.connected = asyncio.Event()
        self._write_status = write_status
        self._stop = asyncio.Event()
        self._base_in = 0
        self._base_out = 0
        #: the last tunnel, closed by the relay as revoked or disabled, was followed by an attempt without backoff
        self._asked_at_once = False
        #: sends the agent's report of itself on each tunnel and on meaningful change (agent/tunnel/report.py)
        self.reporter: Reporter | None = None

    @property
    def relays(self) -> list[str]:
        return list(self.rotation.relays)

    def current_session(self) -> AgentSession | None:
        return self.session if self.session is not None and not self.session.conn.closed else None

    def stop(self) -> None:
        self._stop.set()
        if self.session is not None:
            asyncio.get_running_loop().create_task(self.session.close())

    def _now(self) -> float:
        """Trusted time when the agent measured its clock (status is read on other clocks too)."""
        return self.options.clock.now() if self.options.clock is not None else time.time()

    def _report(self) -> None:
        self.stats.aiohttp_loaded = "aiohttp" in sys.modules
        self.stats.openssl_backend_loaded = OPENSSL_BACKEND in sys.modules
        session = self.session
        if session is not None:
            self.stats.bytes_in = self._base_in + session.conn.bytes_received
            self.stats.bytes_out = self._base_out + session.conn.bytes_sent
            if session.last_rtt is not None:
                self.stats.rtt_ms = round(session.last_rtt * 1000, 1)
            if self.reporter is not None:
                self.reporter.offer(session, self.stats)
        if self._write_status is not None:
            try:
                self._write_status(self.stats.as_json(self._now()))
            except OSError as exc:
                log.warning("cannot write status: %s", exc)

    async def run(self) -> None:
        """Until stop(): connect, serve, and reconnect after failures."""
        from agent.identity.tls_trust import pinned_ssl_context

        ssl_context = pinned_ssl_context(self.credentials.ca_pem)
        # aiohttp is loaded only if a tunnel runs over a WebSocket (agent/tunnel/client.py).
        async with _LazyHttp() as http:
            while not self._stop.is_set():
                if not await self._wait_for_turn():
                    break
                failover = False
                relay = self.rotation.current()
                self.stats.state = "connecting"
                self.stats.relay = relay
                service_manager.notify_status(f"connecting to {relay}")
                told: float | None = None
                try:
                    session, task = await self.gate.ask(
                        open_tunnel(http.get, relay, self.credentials, ssl_context, self.options))
                except OutpostError as exc:
                    if exc.terminal:
                        # A revoked identity, a lost device key or a refused TPM authorization:
                        # another attempt would only ask the controller or the TPM again. The CLI
                        # prints the sentence and exits with the error's code (77, 78, 79).
                        self.ended_by(exc)
                        raise
                    self.stats.last_error = str(exc)
                    log.log(logging.ERROR if isinstance(exc, (TrustError, TunnelRefused)) else logging.WARNING,
                            "%s", exc)
                    if identity_status(exc) == DISABLED:
                        self._report_disabled()
                        continue
                    if isinstance(exc, RelayBusy):
                        told = exc.retry_after  # the relay is up and paces us: same relay, its time
                    else:
                        self.rotation.connect_failed()
                        failover = self.rotation.untried
                else:
                    self.rotation.tunnel_up()
                    if self._stop.is_set():  # stopped while this tunnel was being opened
                        await session.close()
                        await task
                        break
                    self._adopt_relays(session, relay)
                    up_since = time.monotonic()
                    await self._serve(session, task)
                    self.backoff.tunnel_ended(time.monotonic() - up_since)
                    self.rotation.tunnel_dropped()
                    code, _, by_relay = session.close_reason or (None, "", False)
                    if by_relay and session.conn.retry_after is not None:
                        told = session.conn.retry_after  # a stopping relay spreads its fleet's returns
                    if by_relay and code in (ErrorCode.REVOKED, ErrorCode.DISABLED) and not self._asked_at_once:
                        # The identity was blocked: ask once at once, and let the answer decide
                        # (exit for revoked, the disabled interval), rather than after a backoff.
                        # Once only: a relay that admits and then closes again waits the backoff.
                        self._asked_at_once = True
                        self.stats.reconnects += 1
                        continue
                if self._stop.is_set():
                    break
                self._asked_at_once = False
                self.stats.reconnects += 1
                self.stats.state = "waiting"
                self.stats.next_ask = None
                self._report()
                if told is not None:
                    delay = self.backoff.told_delay(told)
                    log.info("the relay asked us to come back in %.1f s", delay)
                elif failover:
                    # Another relay of the list is untried: move on now, spread by a jitter (agent/tunnel/relays.py).
                    delay = self.backoff.rng.uniform(0.0, FAILOVER_JITTER)
                    log.info("trying the next relay, %s, in %.1f s", self.rotation.current(), delay)
                else:
                    delay = self.backoff.next_delay()
                    log.info("reconnecting in %.1f s", delay)
                report_offline(f"{self.stats.last_error or 'not connected'}; trying again in {delay:.0f} s")
                await self._until_stopped(asyncio.sleep(delay))
        self.stats.state = "stopped"
        self.stats.next_ask = None
        self._report()

    async def _until_stopped(self, waiting: Awaitable[Any]) -> bool:
        """Await ``waiting`` unless stop() comes first; True when it finished."""
        task = asyncio.ensure_future(waiting)
        stopping = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pending in (task, stopping):
                pending.cancel()
        return task.done() and not task.cancelled() and not self._stop.is_set()

    async def _wait_for_turn(self) -> bool:
        """Wait while the renewal asks or the identity is disabled (one ask per interval, whoever
        learned it); status says so meanwhile. False when stop() came first."""
        while not self.gate.ready:
            if self.gate.closed:
                next_ask = self._now() + self.gate.remaining()
                if self.stats.state != DISABLED or abs((self.stats.next_ask or 0.0) - next_ask) > 1.0:
                    # The certificate keeper's ask learned it (or asked again): same wait, same status.
                    self._report_disabled(self.stats.renewal_error)
            if not await self._until_stopped(self.gate.changed()):
                return False
        return not self._stop.is_set()

    def _report_disabled(self, why: str | None = None) -> None:
        """The controller said "disabled": the agent keeps running (ops may enable it again), asks
        again when the gate allows (the loop's next turn), and says so."""
        if why:
            self.stats.last_error = why
        self.stats.state = DISABLED
        self.stats.next_ask = self._now() + self.gate.remaining()
        self._report()
        sentence = f"disabled by central ops; asking again at {clock_time(self.stats.next_ask)}"
        log.warning("%s", sentence)
        service_manager.notify_ready(sentence)

    def ended_by(self, error: OutpostError) -> None:
        """Record in the status that ``error`` ends the agent (``outpost-agent status`` shows why)."""
        self.stats.state = "stopped"
        self.stats.last_error = str(error)
        self._report()

    def _adopt_relays(self, session: AgentSession, connected: str) -> None:
        """Take the relay list the controller sent in AUTH_OK, and keep it for the next start."""
        relays = valid_relay_list(session.relay_info.get("relays"))
        if relays is None:
            return
        if self.rotation.refresh(relays, connected) and self._save_relays is not None:
            try:
                self._save_relays(relays)
            except OSError as exc:
                log.warning("cannot store the relay list: %s", exc)

    async def _serve(self, session: AgentSession, task: asyncio.Task[Any]) -> None:
        self.session = session
        self.stats.state = "connected"
        self.stats.transport = session.transport_kind
        self.stats.connected_since = self._now()
        self.stats.down_since = None
        self.stats.next_ask = None
        self.stats.bound = list(session.bound)
        self.stats.refused = dict(session.refused)
        self.stats.last_error = None
        log.info("tunnel up to %s as %s", session.relay_url, self.credentials.uri,
                 extra=service_manager.journal_fields(service_manager.EVENT_CONNECTED,
                                                      identity=self.credentials.uri, relay=session.relay_url))
        # systemd's "started" means the tunnel is up (the unit is Type=notify).
        service_manager.notify_ready(f"connected to {session.relay_url}")
        self.connected.set()
        self._report()
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=STATUS_INTERVAL)
                self._report()
        finally:
            self.connected.clear()
            self._base_in += session.conn.bytes_received
            self._base_out += session.conn.bytes_sent
            self.session = None
            self.stats.rtt_ms = None  # measured on a tunnel that is gone: it says nothing about the next
            # "connected since" of a tunnel that is gone would contradict the state (status shows "down since")
            self.stats.connected_since = None
            self.stats.transport = None
            self.stats.down_since = self._now()
            code, reason, remote = session.close_reason or (None, "", False)
            self.stats.last_error = f"tunnel closed: {reason}" if reason else "tunnel closed"
            self.stats.last_drop = self.stats.last_error
            log.warning("tunnel to %s closed (%s%s)", session.relay_url, reason or "no reason",
                        ", by the relay" if remote else "",
                        extra=service_manager.journal_fields(service_manager.EVENT_DISCONNECTED,
                                                             identity=self.credentials.uri, relay=session.relay_url))
            service_manager.notify_status(f"reconnecting: {self.stats.last_error}")


async def serve_agent(supervisor: TunnelSupervisor, dials: list[DialListener],
                      keeper: CertificateKeeper | None = None,
                      clock_keeper: Coroutine[Any, Any, None] | None = None) -> None:
    """Run the supervisor, the dial listeners and the certificate and clock keepers until a stop signal."""
    loop = asyncio.get_running_loop()
    renewing = loop.create_task(keeper.run()) if keeper is not None else None
    timekeeping = loop.create_task(clock_keeper) if clock_keeper is not None else None
    interval = service_manager.watchdog_interval()
    watchdog = loop.create_task(service_manager.feed_watchdog(interval)) if interval else None
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, supervisor.stop)
        except (NotImplementedError, RuntimeError):
            pass
    for dial in dials:
        await dial.start()
        supervisor.stats.dials[dial.service] = dial.port
        log.info("dial %s listening on %s:%d", dial.service, dial.host, dial.port)
    try:
        await _supervise(supervisor, renewing)
    finally:
        service_manager.notify_stopping()
        if watchdog is not None:
            watchdog.cancel()
        if renewing is not None:
            renewing.cancel()
        if timekeeping is not None:
            timekeeping.cancel()
        for dial in dials:
            await dial.close()


async def _supervise(supervisor: TunnelSupervisor, renewing: asyncio.Task[Any] | None) -> None:
    """Run the supervisor until it stops; the certificate keeper ends only by a terminal
    error (lost device key), which stops the tunnel and ends the agent with that error."""
    supervising = asyncio.ensure_future(supervisor.run())
    if renewing is not None:
        await asyncio.wait({supervising, renewing}, return_when=asyncio.FIRST_COMPLETED)
        if renewing.done() and not supervising.done():
            supervisor.stop()
            await supervising
            error = renewing.exception()
            if isinstance(error, OutpostError):
                supervisor.ended_by(error)
            renewing.result()
    await supervising
