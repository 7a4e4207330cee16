"""The relay of one process: accepts tunnels at ``GET /v1/tunnel`` or on TLS directly, and holds the live ones."""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import os
import secrets
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from controller.blocking import RELAY_POOL
from controller.listener import ListenerLimits
from controller.presence import PresenceBook
from controller.registry import Identity
from controller.relay import cert_push, goaway, peering
from controller.relay.admit_cache import AdmissionCache
from controller.relay.broker import Broker
from controller.relay.pacing import MAX_ADMITTING, ComeBackPacer
from controller.relay.policy_watch import watch_for
from controller.relay.records import QueuedAudit
from controller.relay.session import RelaySession
from controller.relay.tunnel_auth import RELAY_LIVENESS
from shared.protocol import NONCE_SIZE, SUBPROTOCOL, Connection, ErrorCode, ProtocolLimits, Role
from shared.tunnel.session import WS_RECEIVE_MAX
from shared.tunnel.transport import StreamTransport

if TYPE_CHECKING:
    from controller.context import ControllerContext

# The relay's per-stream receive window, what a gateway can send before credit
# returns: it must cover the slowest uplink's bandwidth-delay product twice
# (20 Mbit/s x 600 ms GEO = 1.5 MB; credit returns in half-window batches).
# The relay is a server with memory to spare; a stream still holds at most this.
RELAY_LIMITS = ProtocolLimits(initial_window=8 * 1024 * 1024)


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
            RELAY_POOL.submit(self.admission_cache.preload, context.registry, getattr(context, "store", None),
                              context.ca.certificate)
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
        self.shutdown_grace = goaway.SHUTDOWN_CLOSE_GRACE
        #: Tunnels upgraded whose AUTH is not answered yet, and the cap on them (tests lower it).
        self.admitting = 0
        self.max_admitting: int = getattr(context.settings, "max_admitting", MAX_ADMITTING)
        #: Come-back times for refused and stopped tunnels, paced by the admissions measured.
        self.pacer = ComeBackPacer()
        if self._loop is not None:
            # The agents told by the process before this one are returning: refused ones go after them.
            goaway.follow_predecessor(self, self._loop)
        #: Retired: the stop tells no come-back time (this relay will not be back; agents move on).
        self.retiring = False
        #: Links to and from other relays (``serve --role relay`` only; set by the server).
        self.peering: peering.Peering | None = None
        #: Grows with every renewal of the listener's certificate; a tunnel keeps the value of its handshake.
        self.certificate_generation = 0
        #: Loop time of the last renewal: a tunnel starting soon after may have shaken hands before it.
        self.renewed_at: float | None = None
        #: Renewed certificates being presented on the tunnels (controller/relay/cert_push.py).
        self.pushes: set[asyncio.Task[None]] = set()
        listeners = getattr(context, "certificate_listeners", None)
        if listeners is not None:
            listeners.append(lambda der: cert_push.renewed(self, der))
        #: RELAY_LIMITS with the listener's AUTH deadline (tests shorten it through the settings).
        listener_limits = getattr(context.settings, "limits", None)
        self.limits = RELAY_LIMITS if listener_limits is None else dataclasses.replace(
            RELAY_LIMITS, auth_deadline=listener_limits.auth_deadline)
        #: After a renewal, how long new tunnels get the current certificate pushed (controller/relay/cert_push.py).
        self.missed_window = cert_push.missed_window(listener_limits or ListenerLimits())

    @property
    def told_to_come_back(self) -> int:
        return self.pacer.told

    def register(self, session: RelaySession) -> None:
        """A gateway's tunnel admitted: counted in the admission rate and found by its identity."""
        self.authenticated(session)
        self.pacer.admitted(asyncio.get_running_loop().time())
        self.by_identity.setdefault(session.admitted.uri, set()).add(session)

    def authenticated(self, session: RelaySession) -> None:
        """A tunnel's AUTH accepted (a gateway's or a relay link's): no longer admitting, nor anonymous at its listener."""
        self.done_admitting(session)
        if session.mark_admitted is not None:
            session.mark_admitted()
        elif self.on_admitted is not None and session.request is not None:
            self.on_admitted(session.request)

    def done_admitting(self, session: RelaySession) -> None:
        if session.admitting:
            session.admitting = False
            self.admitting -= 1

    def unregister(self, session: RelaySession) -> None:
        self.done_admitting(session)
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
            return goaway.come_back_later(self)
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
            goaway.tell_busy(self, transport)
            return
        session = self._challenge(transport, remote)
        session.mark_admitted = admitted
        await self._serve(session)

    def _challenge(self, link: Any, remote: str) -> RelaySession:
        """A new tunnel on either transport: its CHALLENGE queued, counted as admitting until its AUTH answer."""
        now = asyncio.get_running_loop().time()
        conn = Connection(Role.RELAY, now, limits=self.limits, liveness=RELAY_LIVENESS)
        nonce = secrets.token_bytes(NONCE_SIZE)
        conn.send_challenge(nonce)
        session = RelaySession(self, conn, link, nonce, remote)
        session.certificate_generation = cert_push.generation_seen(self, now)
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
        """Close every tunnel (process shutdown), each told its own come-back time (controller/relay/goaway.py)."""
        await goaway.stop(self)
