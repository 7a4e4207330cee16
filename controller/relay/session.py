"""The relay: accepts tunnels at ``GET /v1/tunnel`` and brokers streams between them."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import secrets
import time
from typing import Any

from aiohttp import web
from cryptography import x509

from agent.tunnel.protocol import (
    NONCE_SIZE,
    SUBPROTOCOL,
    AuthReceived,
    BindRequested,
    Connection,
    ErrorCode,
    Liveness,
    ProtocolLimits,
    Role,
)
# The session module is the agent's shared tunnel glue the relay may use (tests/test_layering.py).
from agent.tunnel.channel import StreamChannel, StreamClosed
from agent.tunnel.session import WS_RECEIVE_MAX, TunnelSession
from agent.tunnel.splice import splice_streams
from controller.relay.admit import AdmissionRefused, admit
from controller.relay.broker import Broker, service_key

log = logging.getLogger(__name__)

# The relay never pings (the agent pays for keepalives and keeps the NAT
# mapping open); it forgets a tunnel that sent nothing for this long, well
# above the longest keepalive interval a link profile uses.
RELAY_LIVENESS = Liveness(keepalive_interval=None, idle_timeout=1800.0)
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
    idle = min(RELAY_LIVENESS.idle_timeout, max(RELAY_IDLE_MIN, RELAY_IDLE_KEEPALIVES * float(keepalive)))
    return Liveness(keepalive_interval=None, idle_timeout=idle)


# The relay's per-stream receive window, what a gateway can send before credit
# returns: it must cover the slowest uplink's bandwidth-delay product twice
# (20 Mbit/s x 600 ms GEO = 1.5 MB; credit returns in half-window batches).
# The relay is a server with memory to spare; a stream still holds at most this.
RELAY_LIMITS = ProtocolLimits(initial_window=8 * 1024 * 1024)
# A dial waits this long for the binder gateway to connect its local service.
BINDER_ACCEPT_TIMEOUT = 20.0


class RelaySession(TunnelSession):
    """One agent's tunnel, relay side."""

    def __init__(self, relay: "Relay", conn: Connection, ws: web.WebSocketResponse, nonce: bytes, remote: str) -> None:
        super().__init__(conn, ws)
        self.relay = relay
        self.nonce = nonce
        self.remote = remote
        self.identity: Any = None
        self.session_certificate = False
        self.connected_at = time.time()
        #: The upgrade request this tunnel came in on (set by Relay.handle).
        self.request: web.Request | None = None

    @property
    def context(self) -> Any:
        return self.relay.context

    async def on_auth(self, event: AuthReceived) -> None:
        now = dt.datetime.now(dt.timezone.utc)
        try:
            admitted = admit(self.context, event.chain, event.signature, self.nonce, now)
        except AdmissionRefused as refused:
            self.context.audit.record("tunnel_refused", remote=self.remote, reason=refused.reason)
            log.warning("tunnel from %s refused: %s", self.remote, refused.reason)
            self.conn.close(refused.code, refused.reason)
            return
        self.identity = identity = admitted.identity
        self.session_certificate = admitted.session_certificate
        self.conn.set_liveness(relay_liveness_for(event.info.get("keepalive")))
        self.relay.register(self)
        # Which certificate opened the tunnel: after a renewal, new tunnels name the new one.
        serial = format(x509.load_pem_x509_certificate(event.chain[0].encode()).serial_number, "x")
        self.context.audit.record("tunnel_connected", identity=identity.uri, remote=self.remote, serial=serial)
        self.conn.accept_auth({
            "identity": identity.uri,
            "name": identity.name,
            "tenant": identity.tenant,
            "time": time.time(),
            "relays": list(self.context.relay_urls),
        })

    async def on_bind_requested(self, event: BindRequested) -> None:
        bound: list[str] = []
        refused: dict[str, str] = {}
        for requested in event.services:
            allowed, reason, key = self._decide("bind", requested)
            if allowed:
                self.relay.broker.bind(key, self)
                bound.append(requested)
            else:
                refused[requested] = reason
        self.conn.send_bind_result(bound, refused)

    def _decide(self, kind: str, requested: str) -> tuple[bool, str, Any]:
        """(allowed, reason, service key) for this identity and a named service, audited."""
        key = service_key(requested, self.identity.tenant)
        service = self.context.registry.get_service(*key)
        if service is None:
            reason = f"no service named {key[0]}/{key[1]}"
            allowed = False
        else:
            decision = self.context.policy.decide(kind, self.identity, service,
                                                  session_certificate=self.session_certificate)
            allowed, reason = decision.allowed, decision.reason
        self.context.audit.record(f"{kind}_{'allowed' if allowed else 'denied'}", identity=self.identity.uri,
                                  service=f"{key[0]}/{key[1]}", reason=reason)
        return allowed, reason, key

    async def on_stream_opened(self, channel: StreamChannel) -> None:
        allowed, reason, key = self._decide("dial", channel.service)
        if not allowed:
            code = ErrorCode.SERVICE_UNKNOWN if reason.startswith("no service named") else ErrorCode.POLICY_DENIED
            channel.reset(code, reason)
            return
        binder = self.relay.broker.binder(key)
        if binder is None:
            channel.reset(ErrorCode.SERVICE_UNAVAILABLE, f"no gateway hosting {key[0]}/{key[1]} is connected")
            return
        # The binder resolves the name in its own tenant: send it the bare name
        # when tenants match, the qualified one otherwise.
        name = key[1] if binder.identity.tenant == key[0] else f"{key[0]}/{key[1]}"
        upstream = binder.open_stream(name, peer=self.identity.uri)
        try:
            await asyncio.wait_for(upstream.wait_accepted(), BINDER_ACCEPT_TIMEOUT)
        except StreamClosed as exc:
            channel.reset(exc.code, exc.reason)
            return
        except asyncio.TimeoutError:
            upstream.reset(ErrorCode.TIMEOUT, "dial timed out")
            channel.reset(ErrorCode.TIMEOUT, f"the gateway hosting {key[0]}/{key[1]} did not answer in time")
            return
        if channel.error is not None or self.conn.closed:
            upstream.reset(ErrorCode.CANCEL, "the dialer went away")
            return
        self.conn.accept_stream(channel.stream_id)
        await self.flush()
        await splice_streams(channel, upstream)

    def on_closed(self, code: ErrorCode, reason: str, remote: bool) -> None:
        self.relay.unregister(self)
        if self.identity is not None:
            self.context.audit.record("tunnel_closed", identity=self.identity.uri, reason=reason or code.name)


class Relay:
    """Accepts tunnels at ``GET /v1/tunnel``; holds every live tunnel of this process."""

    def __init__(self, context: Any) -> None:
        self.context = context
        self.broker = Broker()
        self.sessions: set[RelaySession] = set()
        self.by_identity: dict[str, set[RelaySession]] = {}
        hook = getattr(context.registry, "on_revoked", None)
        if hook is not None:
            hook(self.identity_revoked)
        #: Told about each tunnel's request once it authenticated: the listener stops counting it as anonymous.
        self.on_admitted: Any = None

    def register(self, session: RelaySession) -> None:
        self.by_identity.setdefault(session.identity.uri, set()).add(session)
        if self.on_admitted is not None and session.request is not None:
            self.on_admitted(session.request)

    def unregister(self, session: RelaySession) -> None:
        self.broker.unbind_all(session)
        self.sessions.discard(session)
        if session.identity is not None:
            peers = self.by_identity.get(session.identity.uri)
            if peers is not None:
                peers.discard(session)
                if not peers:
                    del self.by_identity[session.identity.uri]

    def identity_revoked(self, identity: Any) -> None:
        """Close every live tunnel of ``identity`` at once."""
        for session in list(self.by_identity.get(identity.uri, ())):
            asyncio.get_running_loop().create_task(
                session.close(ErrorCode.REVOKED, f"identity {identity.tenant}/{identity.name} was {identity.status}")
            )

    def status(self) -> list[dict]:
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
        ws = web.WebSocketResponse(protocols=(SUBPROTOCOL,), compress=False, max_msg_size=WS_RECEIVE_MAX,
                                   autoping=True, heartbeat=None)
        await ws.prepare(request)
        if ws.ws_protocol != SUBPROTOCOL:
            await ws.close(message=f"speak {SUBPROTOCOL}".encode())
            return ws
        loop = asyncio.get_running_loop()
        conn = Connection(Role.RELAY, loop.time(), limits=RELAY_LIMITS, liveness=RELAY_LIVENESS)
        nonce = secrets.token_bytes(NONCE_SIZE)
        conn.send_challenge(nonce)
        session = RelaySession(self, conn, ws, nonce, request.remote or "?")
        session.request = request
        self.sessions.add(session)
        try:
            await session.run()
        finally:
            self.unregister(session)
        return ws

    async def close(self) -> None:
        """Close every tunnel (process shutdown)."""
        await asyncio.gather(
            *(s.close(ErrorCode.NO_ERROR, "relay shutting down") for s in list(self.sessions)),
            return_exceptions=True,
        )
