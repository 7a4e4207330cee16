"""The relay: accepts tunnels at ``GET /v1/tunnel`` and brokers streams between them."""

from __future__ import annotations

import asyncio
import contextvars
import datetime as dt
import functools
import logging
import math
import os
import secrets
import socket
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, cast

from aiohttp import web
from cryptography import x509

from controller.blocking import RELAY_POOL
from controller.correlation import TUNNEL, new_id
from controller.presence import PresenceBook, TunnelPresence
from controller.registry import Identity
from controller.relay import peering, reports
from controller.relay.admit import AdmissionRefused, admit, admit_here, spiffe_uri
from controller.relay.admit_cache import AdmissionCache
from controller.relay.aiming import DialChoice, choose, split_aim
from controller.relay.broker import Broker, ServiceKey, service_key
from controller.relay.pacing import MAX_ADMITTING, ComeBackPacer
from controller.relay.policy_watch import LiveDial, watch_for
from controller.relay.records import DialRecord, QueuedAudit, label_of_uri
from controller.relays import relays_for
from controller.store import StoreUnavailable
from shared.protocol import (
    NONCE_SIZE,
    SUBPROTOCOL,
    AuthReceived,
    BindRequested,
    Connection,
    ErrorCode,
    Liveness,
    ProtocolLimits,
    ReportReceived,
    Role,
    goaway_frame,
)
from shared.trust import verify_leaf_issued_by

# The session module is the agent's shared tunnel glue the relay may use (tests/test_layering.py).
from shared.tunnel.channel import ChannelReset, StreamChannel
from shared.tunnel.session import WS_RECEIVE_MAX, TunnelSession
from shared.tunnel.splice import splice_streams
from shared.tunnel.transport import StreamTransport

if TYPE_CHECKING:
    from controller.context import ControllerContext

log = logging.getLogger(__name__)
T = TypeVar("T")
P = ParamSpec("P")
#: (allowed, reason, service key, deciding policy id) of one named service.
Decision = tuple[bool, str, ServiceKey, int | None]

# The relay never pings (the agent pays for keepalives and keeps the NAT
# mapping open); it forgets a tunnel that sent nothing for this long, well
# above the longest keepalive interval a link profile uses.
RELAY_IDLE_TIMEOUT = 1800.0
RELAY_LIVENESS = Liveness(keepalive_interval=None, idle_timeout=RELAY_IDLE_TIMEOUT)
# Once the agent says how often it pings, the relay forgets its tunnel after
# this many keepalive intervals of silence: two lost PINGs are tolerated, and a
# gateway whose carrier NAT black-holed the tunnel is dropped in minutes
# (freeing its binds) instead of half an hour.
RELAY_IDLE_KEEPALIVES = 3
# Never sooner than this: a test's seconds-long keepalive must not make a
# relay drop tunnels over a short stall.
RELAY_IDLE_MIN = 10.0


def relay_liveness_for(keepalive: object) -> Liveness:
    """The relay's timers for an agent announcing ``keepalive`` seconds in AUTH (anything else: the default)."""
    if isinstance(keepalive, bool) or not isinstance(keepalive, (int, float)) or not keepalive > 0:
        return RELAY_LIVENESS
    idle = min(RELAY_IDLE_TIMEOUT, max(RELAY_IDLE_MIN, RELAY_IDLE_KEEPALIVES * float(keepalive)))
    return Liveness(keepalive_interval=None, idle_timeout=idle)


# The relay's per-stream receive window, what a gateway can send before credit
# returns: it must cover the slowest uplink's bandwidth-delay product twice
# (20 Mbit/s x 600 ms GEO = 1.5 MB; credit returns in half-window batches).
# The relay is a server with memory to spare; a stream still holds at most this.
RELAY_LIMITS = ProtocolLimits(initial_window=8 * 1024 * 1024)
# A dial waits this long for the binder gateway to connect its local service.
BINDER_ACCEPT_TIMEOUT = 20.0
# A stop waits this long, in all, for its tunnels' closing handshakes (GOAWAY, then the WebSocket close);
# the rest are reset. Closing each in turn took 8-9 s at 10,000 tunnels, all of it CPU, and an agent
# reconnects on GOAWAY or a reset alike: the GOAWAY leaves in the first write, and waiting longer for
# the rest of the handshake helps no one. Half a second, and a loaded loop overruns it (1.9 s measured
# for 1.0 at 7,000 tunnels), which keeps a stop under the 2 s goal.
SHUTDOWN_CLOSE_GRACE = 0.5
BUSY_REASON = "this relay is admitting as many tunnels as it can; come back after the time it gives"


class RelaySession(TunnelSession):
    """One agent's tunnel, relay side.

    Admission, decisions and their audit rows read and write the store, so
    they run in the relay's worker threads (controller/blocking.py), one job
    of this tunnel at a time: a peer flooding BIND or OPEN frames waits for
    its own answers and holds one worker, never the event loop.
    """

    def __init__(self, relay: Relay, conn: Connection, ws: web.WebSocketResponse | StreamTransport, nonce: bytes,
                 remote: str) -> None:
        super().__init__(conn, ws)
        self.relay = relay
        self.nonce = nonce
        self.remote = remote
        self.identity: Identity | None = None
        self.session_certificate = False
        self.connected_at = time.time()
        #: The correlation id of this tunnel's audit events (controller/correlation.py).
        self.tunnel_id = new_id(TUNNEL)
        self._worker_turn = asyncio.Lock()
        #: The upgrade request this tunnel came in on (set by Relay.handle).
        self.request: web.Request | None = None
        #: What marks a tunnel on TLS directly as authenticated at its listener (set by Relay.serve_stream).
        self.mark_admitted: Callable[[], None] | None = None
        self.presence: TunnelPresence | None = None
        self.reports_refused = 0
        #: Counted in Relay.admitting (upgraded, AUTH not answered yet).
        self.admitting = False
        #: The relay at the other end when this is a link from another relay (controller/relay/peering.py).
        self.link_from: str | None = None

    @property
    def context(self) -> ControllerContext:
        return self.relay.context

    @property
    def admitted(self) -> Identity:
        """The identity admission proved; asked only once admitted (the core refuses BIND and OPEN before AUTH_OK)."""
        if self.identity is None:
            raise RuntimeError("the tunnel is not admitted yet")
        return self.identity

    async def in_worker(self, function: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """``function`` in a relay worker thread, after this tunnel's earlier jobs."""
        async with self._worker_turn:
            return await RELAY_POOL.run(function, *args, **kwargs)

    async def on_auth(self, event: AuthReceived) -> None:
        if await peering.on_auth(self, event):  # a link from another relay
            return
        now = dt.datetime.now(dt.UTC)
        # Taken before admission reads the store: a change announced after it may have been missed.
        changes = self.relay.identity_changes
        cache = self.relay.admission_cache
        generation = cache.generation
        try:
            # A gateway seen before is admitted here, with no worker job and no store read (admit_cache.py).
            admitted = admit_here(self.context, cache, event.chain, event.signature, self.nonce, now)
            if admitted is None:
                read = await self.in_worker(peering.admit_gateway, functools.partial(admit, cache=cache), self.context,
                                            event.chain, event.signature, self.nonce, now)
                if not read.session_certificate:  # people's roles change at sign-in, unannounced
                    cache.remember_identity(read.identity, generation)
                admitted = read
        except AdmissionRefused as refused:
            log.warning("tunnel from %s refused: %s", self.remote, refused.reason)
            if not self.conn.closed:
                self.conn.close(refused.code, refused.reason)
            await self.in_worker(self._record_refusal, event.chain, refused.reason)
            return
        except StoreUnavailable as unavailable:
            # Nothing to decide with: the agent comes back on its own backoff once the store answers.
            log.warning("tunnel from %s refused: the store is unavailable", self.remote)
            if not self.conn.closed:
                self.conn.close(ErrorCode.SERVICE_UNAVAILABLE, unavailable.message)
            return
        if self.conn.closed:  # the AUTH deadline passed while the worker checked it
            return
        self.identity = identity = admitted.identity
        self.session_certificate = admitted.session_certificate
        self.conn.set_liveness(relay_liveness_for(event.info.get("keepalive")))
        self.relay.register(self)
        self.presence = reports.tunnel_up(self, event.info.get("keepalive"))
        # Which certificate opened the tunnel: after a renewal, new tunnels name the new one.
        serial = admitted.serial
        self.conn.accept_auth({
            "identity": identity.uri,
            "name": identity.name,
            "tenant": identity.tenant,
            "time": time.time(),
            "relays": relays_for(self.context, identity.uri),
            "reports": True,
        })
        try:
            async with self._worker_turn:
                # Queued, not a transaction of its own: under a reconnecting fleet one commit (an fsync)
                # per tunnel was half the relay's CPU per admission; queued rows share commits. This
                # tunnel's next jobs wait for it, so its rows stay in order.
                written = self.relay.audit_queue.put_and_wait("tunnel_connected", {
                    "identity": identity.label, "remote": self.remote, "serial": serial,
                    "correlation": self.tunnel_id, "relay": self.relay.name})
                # Only a revocation, disabling or re-enrollment announced since admission began can have
                # found this tunnel unregistered; without one, the store has nothing newer to say and the
                # second read (a worker job and a query per admission) is skipped.
                still = (await RELAY_POOL.run(self._confirm_admission)
                         if self.relay.identity_changes != changes else None)
                await asyncio.wrap_future(written)
        except StoreUnavailable as unavailable:  # admitted, but whether it was revoked meanwhile cannot be read
            await self.close(ErrorCode.SERVICE_UNAVAILABLE, unavailable.message)
            return
        if still is not None:
            await self.close(ErrorCode.REVOKED, still)

    def _confirm_admission(self) -> str | None:
        """Read the identity again, once ``tunnel_connected`` is queued: None, or why the tunnel must close.

        Admission read the identity in a worker thread before this tunnel was
        registered; a revocation or re-enrollment the store watcher announced
        in that gap found no tunnel to close. Read after registering, the
        store shows every change the watcher will not announce to us.
        """
        identity = self.admitted
        now = self.context.registry.identity_by_uri(identity.uri)
        if now is None or now.status in ("revoked", "disabled"):
            return f"identity {identity.tenant}/{identity.name} was {now.status if now else 'deleted'}"
        if now.key_sha256 != identity.key_sha256:
            return f"the key of identity {identity.tenant}/{identity.name} was replaced by re-enrollment"
        return None

    def _record_refusal(self, chain: Sequence[str], reason: str) -> None:
        """``tunnel_refused``: by the identity's budget when our CA issued the certificate, else anonymous."""
        uri = verified_identity_uri(self.context, chain)
        fields = {"remote": self.remote, "reason": reason, "correlation": self.tunnel_id, "relay": self.relay.name}
        if uri is None:
            self.context.audit.record_anonymous("tunnel_refused", **fields)
        else:
            self.context.audit.record("tunnel_refused", identity=label_of_uri(uri), **fields)

    async def on_bind_requested(self, event: BindRequested) -> None:
        if self.link_from is not None and self.relay.peering is not None:
            return self.relay.peering.refuse_bind(self, event)
        # The protocol core already refused a BIND past MAX_BIND_SERVICES names.
        held = self.relay.broker.keys_bound_by(self)
        try:
            decisions = await self.in_worker(self._decide_all, "bind", event.services, held)
        except StoreUnavailable as unavailable:
            # Closed rather than refused: the agent binds again when it reconnects, once the store answers.
            await self.close(ErrorCode.SERVICE_UNAVAILABLE, unavailable.message)
            return
        if self.conn.closed:
            return
        bound: list[str] = []
        refused: dict[str, str] = {}
        for requested, (allowed, reason, key, _policy) in zip(event.services, decisions, strict=True):
            if allowed:
                self.relay.broker.bind(key, self)
                bound.append(requested)
            else:
                refused[requested] = reason
        self.conn.send_bind_result(bound, refused)

    def _decide_all(self, kind: str, requested: Sequence[str], held: frozenset[ServiceKey] = frozenset()
                    ) -> list[Decision]:
        """Decide every name (reads only), then audit them all in one transaction (worker thread).

        A bind this tunnel already holds and may keep changes nothing, so it
        is not recorded again: repeating an allowed BIND cannot grow the log.
        """
        decisions = [self._decide(kind, name) for name in requested]
        self.context.audit.record_many([
            (f"{kind}_{'allowed' if allowed else 'denied'}",
             {"identity": self.admitted.label, "service": f"{key[0]}/{key[1]}", "reason": reason,
              "correlation": self.tunnel_id, **({} if policy is None else {"policy": policy})})
            for allowed, reason, key, policy in decisions
            if not (allowed and key in held)
        ])
        return decisions

    def _decide_dial(self, record: DialRecord, candidates: list[RelaySession]) -> DialChoice:
        """Decide one dial, and the gateway serving it; record its request and decision (worker thread)."""
        choice = choose(self, record.requested, candidates)
        key = choice.key
        groups = [record.decided(choice.allowed, choice.reason, f"{key[0]}/{key[1]}", choice.policy)]
        grant = None if choice.policy is None else self.context.policy.grant_of(choice.policy)
        if choice.allowed and grant is not None:
            # The grant's story names each connection it allowed, under the grant's own correlation id.
            groups.append([("grant_used", {"correlation": grant, "connection": record.id, "policy": choice.policy,
                                           "identity": record.identity, "service": f"{key[0]}/{key[1]}"})])
        self.context.audit.record_groups(groups)
        return choice

    def _decide(self, kind: str, requested: str) -> Decision:
        """(allowed, reason, service key) for this identity and a named service."""
        key = service_key(requested, self.admitted.tenant)
        service = self.context.registry.get_service(*key)
        if service is None:
            return False, f"no service named {key[0]}/{key[1]}", key, None
        decision = self.context.policy.decide(kind, self.admitted, service, session_certificate=self.session_certificate)
        return decision.allowed, decision.reason, key, decision.policy_id

    async def on_stream_opened(self, channel: StreamChannel) -> None:
        if self.link_from is not None and self.relay.peering is not None:
            return await self.relay.peering.serve_link_stream(self, channel)
        record = DialRecord(self, channel)
        candidates = self.relay.broker.binders(split_aim(channel.service, self.admitted.tenant)[0])
        if not candidates and self.relay.peering is not None:  # bound at another relay, if anywhere
            candidates = cast(list[RelaySession], await self.relay.peering.remote_binders(
                self, channel.service, record.id))
        watch = self.relay.policy_watch
        changes_seen = None if watch is None else watch.changes
        try:
            choice = await self.in_worker(self._decide_dial, record, candidates)
        except StoreUnavailable as unavailable:
            channel.reset(ErrorCode.SERVICE_UNAVAILABLE, unavailable.message)
            return
        key, policy = choice.key, choice.policy
        if channel.error is not None or self.conn.closed:
            if choice.allowed:
                self.relay.record_soon(*record.failed("the dialer went away"))
            return
        if not choice.allowed:
            channel.reset(choice.code, choice.reason)
            return
        binder = choice.binder
        if binder is None or binder.conn.closed:
            failure = None if self.relay.peering is None else self.relay.peering.failure_of(record.id)
            channel.reset(ErrorCode.SERVICE_UNAVAILABLE,
                          failure or choice.unavailable or f"no gateway hosting {key[0]}/{key[1]} is connected")
            self.relay.record_soon(*record.failed(channel.error.reason if channel.error else "no gateway"))
            return
        try:
            await self._serve_dial(channel, binder, key, record, policy, choice.port, changes_seen)
        except ChannelReset as exc:
            self.relay.record_soon(*record.failed(exc.reason or exc.code.name))

    async def _serve_dial(self, channel: StreamChannel, binder: RelaySession, key: ServiceKey,
                          record: DialRecord, policy: int | None = None, port: int | None = None,
                          changes_seen: int | None = None) -> None:
        """Open the dial's stream to ``binder`` and splice the two; a ChannelReset says why it failed."""
        # The binder resolves the name in its own tenant: send it the bare name
        # when tenants match, the qualified one otherwise.
        name = key[1] if binder.admitted.tenant == key[0] else f"{key[0]}/{key[1]}"
        if port is not None:
            name = f"{name}:{port}"  # the binder's [[bind]] maps each declared port to its own target
        upstream = binder.open_stream(name, peer=self.admitted.uri)
        try:
            await asyncio.wait_for(upstream.wait_accepted(), BINDER_ACCEPT_TIMEOUT)
        except ChannelReset as exc:
            channel.reset(exc.code, exc.reason)
            raise
        except TimeoutError:
            upstream.reset(ErrorCode.TIMEOUT, "dial timed out")
            reason = f"the gateway hosting {key[0]}/{key[1]} did not answer in time"
            channel.reset(ErrorCode.TIMEOUT, reason)
            raise ChannelReset(ErrorCode.TIMEOUT, reason) from None
        if channel.error is not None or self.conn.closed:
            upstream.reset(ErrorCode.CANCEL, "the dialer went away")
            raise ChannelReset(ErrorCode.CANCEL, "the dialer went away")
        self.conn.accept_stream(channel.stream_id)
        loop = asyncio.get_running_loop()
        self.relay.record_soon(*record.served(binder, loop.time()))
        await self.flush()
        # Kept under the policy that allowed it: its expiry, deletion or narrowing ends the dial.
        live = LiveDial(self, binder, key, channel, upstream, port)
        watch = self.relay.policy_watch
        if watch is not None and policy is not None:
            watch.add(policy, live, changes_seen)
        try:
            await splice_streams(channel, upstream)
        finally:
            if watch is not None:
                watch.remove(live)
            self.relay.record_soon(*record.closed(channel, upstream, loop.time()))

    def on_report(self, event: ReportReceived) -> None:
        if self.link_from is not None:
            return  # a relay reports through its heartbeat; nothing on its link is a gateway's report
        reports.on_report(self, self.presence, event)

    def leave_at_stop(self) -> bool:
        """At a stop, on TLS directly: write the queued GOAWAY now and end TCP without the TLS goodbye.

        The goodbye (close_notify, then waiting for the peer's) cost ~0.5 ms of the event loop per
        tunnel, 5 s and more at 10,000, and tells the agent nothing the GOAWAY did not. The close is
        a FIN, not a reset: the kernel still sends the GOAWAY it holds. False on a WebSocket.
        """
        link = self.transport
        if not isinstance(link, StreamTransport):
            return False
        transport = link.writer.transport
        data = self.conn.data_to_send()
        if data and not transport.is_closing():
            transport.write(data)
        self._terminate(ErrorCode.NO_ERROR, "relay shutting down", False)
        transport.abort()
        return True

    def on_closed(self, code: ErrorCode, reason: str, remote: bool) -> None:
        if self.link_from is not None and self.relay.peering is not None:
            self.relay.peering.link_closed(self, reason or code.name)
        if self.presence is not None:
            self.relay.presence.down(self.presence)
        self.relay.unregister(self)
        if self.identity is not None:
            self.relay.record_soon(
                "tunnel_closed", identity=self.identity.label, reason=reason or code.name, correlation=self.tunnel_id,
                closed_by="agent" if remote else "relay", relay=self.relay.name, bytes_in=self.conn.bytes_received,
                bytes_out=self.conn.bytes_sent, duration_s=round(time.time() - self.connected_at, 3))


def verified_identity_uri(context: ControllerContext, chain: Sequence[str]) -> str | None:
    """The identity URI of ``chain``'s leaf when this controller's CA issued it, else None."""
    try:
        leaf = x509.load_pem_x509_certificate(chain[0].encode())
    except (ValueError, TypeError, IndexError):
        return None
    if not verify_leaf_issued_by(leaf, context.ca.certificate):
        return None
    return spiffe_uri(leaf)


class Relay:
    """Accepts tunnels at ``GET /v1/tunnel``; holds every live tunnel of this process."""

    def __init__(self, context: ControllerContext) -> None:
        self.context = context
        self.broker = Broker()
        #: this process's tunnels' presence, written to the store in batches (controller/presence.py)
        self.presence = PresenceBook(context.store)
        #: This relay process as audit events name it: which host and process served or refused.
        self.name = f"{socket.gethostname()}/{os.getpid()}"
        self.sessions: set[RelaySession] = set()
        self.by_identity: dict[str, set[RelaySession]] = {}
        #: Audit rows from callbacks, written in order by one worker job at a time (drained at shutdown).
        self.audit_queue = QueuedAudit(context.audit, RELAY_POOL)
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None
        #: Grows with every revocation, disabling or re-enrollment announced (admission compares it).
        self.identity_changes = 0
        #: Certificates and gateway identities admission already read, forgotten at each announcement.
        self.admission_cache = AdmissionCache()
        if self._loop is not None and hasattr(context.registry, "list_identities"):
            RELAY_POOL.submit(self.admission_cache.preload, context.registry)
        hook = getattr(context.registry, "on_revoked", None)
        if hook is not None:
            hook(self.identity_revoked)
        rekeyed = getattr(context.registry, "on_rekeyed", None)
        if rekeyed is not None:
            rekeyed(self.identity_rekeyed)
        #: The live dials by the policy that allowed them (controller/relay/policy_watch.py).
        self.policy_watch = watch_for(context, self._loop)
        #: Told about each tunnel's request once it authenticated: the listener stops counting it as anonymous.
        self.on_admitted: Any = None
        #: How long a stop waits for the tunnels' closing handshakes (tests shorten it).
        self.shutdown_grace = SHUTDOWN_CLOSE_GRACE
        #: Tunnels upgraded whose AUTH is not answered yet, and the cap on them (tests lower it).
        self.admitting = 0
        self.max_admitting: int = getattr(context.settings, "max_admitting", MAX_ADMITTING)
        #: Come-back times for refused and stopped tunnels, paced by the admissions measured.
        self.pacer = ComeBackPacer()
        #: Retired: the stop tells no come-back time (this relay will not be back; agents move on).
        self.retiring = False
        #: Links to and from other relays (``serve --role relay`` only; set by the server).
        self.peering: peering.Peering | None = None

    @property
    def told_to_come_back(self) -> int:
        return self.pacer.told

    def register(self, session: RelaySession) -> None:
        self._done_admitting(session)
        self.pacer.admitted(asyncio.get_running_loop().time())
        self.by_identity.setdefault(session.admitted.uri, set()).add(session)
        if session.mark_admitted is not None:
            session.mark_admitted()
        elif self.on_admitted is not None and session.request is not None:
            self.on_admitted(session.request)

    def _done_admitting(self, session: RelaySession) -> None:
        if session.admitting:
            session.admitting = False
            self.admitting -= 1

    def _come_back_later(self) -> web.Response:
        """503 with the whole seconds after which this agent gets a slot: the told agents return paced."""
        seconds = self.pacer.come_back(asyncio.get_running_loop().time(), self.admitting)
        return web.Response(status=503, headers={"Retry-After": str(math.ceil(seconds))},
                            text="this relay is admitting as many tunnels as it can; come back after Retry-After\n")

    def _tell_busy(self, link: StreamTransport) -> None:
        """Refuse a tunnel on TLS before its CHALLENGE: one GOAWAY(BUSY) with its come-back time, then a FIN.

        No TLS goodbye: waiting for the peer's close_notify costs a busy relay more than the
        GOAWAY did, and tells the agent nothing more. The kernel still sends what it holds.
        """
        seconds = self.pacer.come_back(asyncio.get_running_loop().time(), self.admitting)
        transport = link.writer.transport
        if not transport.is_closing():
            transport.write(goaway_frame(ErrorCode.BUSY, BUSY_REASON, seconds))
        transport.abort()

    def unregister(self, session: RelaySession) -> None:
        self._done_admitting(session)
        self.broker.unbind_all(session)
        self.sessions.discard(session)
        if session.identity is not None:
            peers = self.by_identity.get(session.identity.uri)
            if peers is not None:
                peers.discard(session)
                if not peers:
                    del self.by_identity[session.identity.uri]

    def traffic(self) -> tuple[int, int]:
        """Bytes (in, out) on this process's live tunnels."""
        return (sum(s.conn.bytes_received for s in self.sessions), sum(s.conn.bytes_sent for s in self.sessions))

    def record_soon(self, event: str, fields: dict[str, Any] | None = None, /, **more: Any) -> None:
        """Write an audit row in a worker thread, from code that cannot await (controller/relay/records.py)."""
        self.audit_queue.put(event, {**(fields or {}), **more})

    def identity_revoked(self, identity: Identity) -> None:
        """Close every live tunnel of ``identity`` at once (from the event loop or a worker thread)."""
        self.identity_changes += 1  # any thread: a lost increment still changes the value a tunnel took
        self.admission_cache.forget(identity.uri)  # before its tunnels close: none is admitted from the cache after
        self._on_loop(self._close_tunnels_of, identity)

    def identity_rekeyed(self, identity: Identity) -> None:
        """Close every live tunnel of ``identity`` on a key other than its current one (re-enrollment).

        Called from the enrollment's worker thread in this process, or from the
        store watcher on the event loop for a re-enrollment in another.
        """
        self.identity_changes += 1
        self.admission_cache.forget(identity.uri)
        self._on_loop(self._close_tunnels_on_old_keys, identity)

    def _on_loop(self, callback: Callable[[Identity], None], identity: Identity) -> None:
        loop = self._loop
        if loop is None:
            return  # not serving yet: no tunnel to close
        try:
            on_loop = asyncio.get_running_loop() is loop
        except RuntimeError:
            on_loop = False
        # A fresh context: the tunnels' own audit events must not carry the caller's scope (an actor's address).
        if on_loop:
            contextvars.Context().run(callback, identity)
        elif not loop.is_closed():
            loop.call_soon_threadsafe(callback, identity, context=contextvars.Context())

    def _close_tunnels_of(self, identity: Identity) -> None:
        for session in list(self.by_identity.get(identity.uri, ())):
            self._loop.create_task(  # type: ignore[union-attr]
                session.close(ErrorCode.REVOKED, f"identity {identity.tenant}/{identity.name} was {identity.status}")
            )

    def _close_tunnels_on_old_keys(self, identity: Identity) -> None:
        # A tunnel's key is the one admission saw as the identity's (controller/relay/admit.py).
        for session in list(self.by_identity.get(identity.uri, ())):
            if session.admitted.key_sha256 != identity.key_sha256:
                self._loop.create_task(session.close(  # type: ignore[union-attr]
                    ErrorCode.REVOKED, f"the key of identity {identity.tenant}/{identity.name} was replaced by "
                    "re-enrollment"))

    def status(self) -> list[dict[str, object]]:
        return [
            {
                "identity": s.identity.uri,
                "name": s.identity.name,
                "tenant": s.identity.tenant,
                "remote": s.remote,
                "connected_since": s.connected_at,
                "bound": self.broker.bound_services(s),
                "bytes_in": s.conn.bytes_received,
                "bytes_out": s.conn.bytes_sent,
            }
            for s in self.sessions
            if s.identity is not None
        ]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if self.admitting >= self.max_admitting:
            return self._come_back_later()
        ws = web.WebSocketResponse(protocols=(SUBPROTOCOL,), compress=False, max_msg_size=WS_RECEIVE_MAX,
                                   autoping=True, heartbeat=None)
        await ws.prepare(request)
        if ws.ws_protocol != SUBPROTOCOL:
            await ws.close(message=f"speak {SUBPROTOCOL}".encode())
            return ws
        session = self._challenge(ws, request.remote or "?")
        session.request = request
        await self._serve(session)
        return ws

    async def serve_stream(self, transport: StreamTransport, remote: str, admitted: Callable[[], None]) -> None:
        """Serve one tunnel on TLS directly (ALPN ``TUNNEL_ALPN``, routed here by controller/listener.py).

        It counts against the admission cap like a WebSocket's; past the cap it is told when to
        come back (GOAWAY BUSY) before it costs a protocol core and an admission.
        """
        if self.admitting >= self.max_admitting:
            self._tell_busy(transport)
            return
        session = self._challenge(transport, remote)
        session.mark_admitted = admitted
        await self._serve(session)

    def _challenge(self, link: Any, remote: str) -> RelaySession:
        """A new tunnel on either transport: its CHALLENGE queued, counted as admitting until its AUTH answer."""
        conn = Connection(Role.RELAY, asyncio.get_running_loop().time(), limits=RELAY_LIMITS, liveness=RELAY_LIVENESS)
        nonce = secrets.token_bytes(NONCE_SIZE)
        conn.send_challenge(nonce)
        session = RelaySession(self, conn, link, nonce, remote)
        self.sessions.add(session)
        session.admitting = True
        self.admitting += 1
        return session

    async def _serve(self, session: RelaySession) -> None:
        try:
            await session.run()
        finally:
            self.unregister(session)

    async def close(self) -> None:
        """Close every tunnel (process shutdown): GOAWAY to all, each with its own come-back time.

        A tunnel on TLS directly gets its GOAWAY written and its TCP connection ended at once
        (``leave_at_stop``); a WebSocket gets its closing handshake, and a reset if that has not
        finished within ``shutdown_grace``, so the stop takes that long at most, however many.
        """
        loop = asyncio.get_running_loop()
        sessions = list(self.sessions)
        told = [None] * len(sessions) if self.retiring else self.pacer.stop_times(len(sessions))
        graceful: list[RelaySession] = []
        for session, seconds in zip(sessions, told, strict=True):
            # Each is told its own time to come back, so the fleet returns at the pace a relay admits.
            session.conn.close(ErrorCode.NO_ERROR, "relay shutting down", retry_after=seconds)
            if not session.leave_at_stop():
                graceful.append(session)
        closing = {loop.create_task(s.close(ErrorCode.NO_ERROR, "relay shutting down")): s for s in graceful}
        if closing:
            _, late = await asyncio.wait(closing, timeout=self.shutdown_grace)
            for task in late:
                closing[task].abort()  # its GOAWAY, if written, is on its way; the agent reconnects either way
                # Its close would otherwise sit out CLOSE_TIMEOUT on a WebSocket close the reset ended
                # (3 s more at 7,000 tunnels).
                task.cancel()
            await asyncio.gather(*closing, return_exceptions=True)
        if self.peering is not None:
            await self.peering.close()
        # The tunnels' last audit rows and their presence reach the store before it closes.
        await self.audit_queue.drained()
        await self.presence.close()
