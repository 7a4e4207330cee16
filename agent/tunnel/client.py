"""The agent's end of a tunnel: dial a relay, authenticate, bind services (served by agent.services.forward).

The tunnel runs on TLS directly with Outpost's ALPN (agent.tunnel.tls_link)
or over a WebSocket (aiohttp, imported only then), as ``TunnelOptions.transport``
says. ``auto`` tries TLS first and falls back to the WebSocket when TLS
reached the relay (or its proxy) but the tunnel did not come up on it: the
relay did not choose the ALPN, or the connection broke during TLS or before
authentication ended, which is what a network or proxy that passes only HTTP
does. It never falls back past a certificate problem or a refusal (a
WebSocket would meet the same), nor when nothing answered at all. After a
fallback that relay is reached by WebSocket for ``FALLBACK_HOLD`` seconds,
then TLS is tried again.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives import serialization

from agent.errors import (
    EXIT_IDENTITY_REFUSED,
    ControllerUnreachable,
    OutpostError,
    ProxyFailed,
    RelayBusy,
    TrustError,
    TunnelFailed,
    TunnelRefused,
)
from agent.identity.keystore import KeyStore
from agent.identity.pinned_tls import LOCAL_TIME, PinnedTLS, network_failure
from agent.identity.refusals import DISABLED, REVOKED
from agent.proxy import DIRECT, ProxySettings
from agent.services.forward import serve_bound
from agent.tunnel.backoff import come_back_after
from agent.tunnel.relay_trust import PushRefused, Trusted, check_pushed, leaves_on, remember_leave, trust
from agent.tunnel.tls_link import NotReached, open_tls_link, tunnel_tls_context
from shared.protocol import (
    PROTOCOL_VERSION,
    RELAY_CERT_FEATURE,
    SUBPROTOCOL,
    Authenticated,
    BindCompleted,
    ChallengeReceived,
    Connection,
    ErrorCode,
    Liveness,
    ProtocolError,
    ProtocolLimits,
    RelayCertificateOffered,
    Role,
    auth_message,
)
from shared.tunnel.auth import peer_certificate_digest
from shared.tunnel.channel import StreamChannel
from shared.tunnel.session import WS_RECEIVE_MAX, TunnelSession
from shared.tunnel.transport import Transport

if TYPE_CHECKING:
    import aiohttp
    from cryptography import x509

    from agent.clock.trusted import TrustedClock

log = logging.getLogger(__name__)

# TCP + TLS + WebSocket upgrade on a satellite link takes several round trips
# of 600 ms; 30 s also covers a congested cellular uplink.
CONNECT_TIMEOUT = 30.0
#: How long a relay that needed the WebSocket is reached by WebSocket before TLS is tried again:
#: a network that passes only HTTP seldom changes, and one extra connection an hour is cheap.
FALLBACK_HOLD = 3600.0
#: The status a relay refuses a WebSocket upgrade with when it is busy (then Retry-After says when to
#: come back); a plain number, since the http module's enum is 60 KiB in an agent that never needs the rest.
SERVICE_UNAVAILABLE = 503
#: The longest the agent sleeps toward leaving a tunnel before it reads trusted time again: that
#: clock may be corrected (NTP's first answer) while the loop sleeps on its own monotonic one.
TRUST_RECHECK = 60.0
#: Refused RELAY_CERT pushes a tunnel checks and logs; later ones are ignored. A relay pushes once per
#: renewal (every 4 h by default), so a third refusal on one tunnel is a relay misbehaving, not a race.
MAX_REFUSED_PUSHES = 3
#: ``[link] transport`` values.
TRANSPORTS = ("auto", "tls", "websocket")


class IdentityRefused(TunnelRefused):
    """The relay refused the tunnel because of the identity's status: ``identity_status`` is
    ``revoked`` (terminal: the running agent stops with exit 77) or ``disabled`` (the agent asks again, slowly)."""

    exit_code = EXIT_IDENTITY_REFUSED

    def __init__(self, message: str, status: str) -> None:
        super().__init__(message)
        self.identity_status = status
        self.terminal = status == REVOKED


def refusal_for(code: ErrorCode, reason: str, relay_url: str) -> TunnelRefused:
    """The error for a relay that refused AUTH with ``code`` and ``reason``.

    A relay from before DISABLED existed says REVOKED for a disabled identity
    too, with the reason ``identity T/N is disabled``: read as disabled, since
    stopping an agent that ops may enable again would need a site visit.
    """
    said = f"the relay at {relay_url} refused this gateway: {reason}"
    if code is ErrorCode.DISABLED or (code is ErrorCode.REVOKED and reason.rstrip().endswith(" is disabled")):
        error: TunnelRefused = IdentityRefused(
            f"{said}; ask central ops to enable it (outpostctl identity enable)", DISABLED)
    elif code is ErrorCode.REVOKED:
        error = IdentityRefused(f"{said}; the agent stops: only a new identity, enrolled with a new token, "
                                "can connect this gateway again", REVOKED)
    else:
        error = TunnelRefused(said)
    error.code = code  # type: ignore[attr-defined]  # the wire code, for logs and tests
    return error


@dataclass
class TunnelCredentials:
    """What proves who we are to a relay, and what we trust."""

    uri: str
    chain_pem: list[str]
    ca_pem: str
    keystore: KeyStore


@dataclass
class TunnelOptions:
    limits: ProtocolLimits = field(default_factory=ProtocolLimits)
    liveness: Liveness = field(default_factory=Liveness)
    #: service name -> (host, port) on the gateway
    binds: dict[str, tuple[str, int]] = field(default_factory=dict)
    #: The HTTPS proxy and its no_proxy hosts; each relay URL is routed by it (agent.proxy).
    proxy: ProxySettings = DIRECT
    #: Trusted time (agent.clock.trusted.TrustedClock); when set, the relay's
    #: certificate dates are judged by it instead of the system clock.
    clock: TrustedClock | None = None
    #: "auto" (TLS, WebSocket as the fallback), "tls" or "websocket"; see the module docstring.
    transport: str = "auto"
    #: relay URL -> monotonic time until which ``auto`` reaches it by WebSocket.
    fallback_until: dict[str, float] = field(default_factory=dict)
    #: The pinned context offering Outpost's ALPN (made on first use; never used for HTTP).
    alpn_context: ssl.SSLContext | None = None
    #: Uniform in [0, 1): where in the relay certificate's last part this agent leaves (agent/tunnel/relay_trust.py).
    draw: Callable[[], float] = random.random
    #: Tunnels left because a relay certificate was ending, by that certificate's SHA-256 (agent/tunnel/relay_trust.py).
    left_on: dict[bytes, int] = field(default_factory=dict)


class AgentSession(TunnelSession):
    """One tunnel, agent side."""

    def __init__(self, conn: Connection, link: Transport, relay_url: str,
                 credentials: TunnelCredentials, relay_digest: bytes, options: TunnelOptions) -> None:
        super().__init__(conn, link)
        #: "tls" or "websocket": what this tunnel runs on.
        self.transport_kind = "websocket" if self.ws is not None else "tls"
        self.relay_url = relay_url
        self.credentials = credentials
        self.relay_digest = relay_digest
        self.options = options
        self.authenticated = asyncio.Event()
        self.relay_info: dict[str, Any] = {}
        self.bound: tuple[str, ...] = ()
        self.refused: dict[str, str] = {}
        self.last_rtt: float | None = None
        self.pong_listeners: list[Callable[[float], None]] = []
        #: This tunnel's CHALLENGE nonce: a pushed certificate is signed over it.
        self.nonce = b""
        #: The relay certificate this tunnel trusts and when it leaves (set by ``trust_relay``).
        self.trusted: Trusted | None = None
        self.ca_certificate: x509.Certificate | None = None
        #: ``trusted``'s certificate as DER: a push of the same one is recognised without parsing it.
        self._trusted_der = b""
        self._trust_changed = asyncio.Event()
        #: Pushes refused on this tunnel (MAX_REFUSED_PUSHES).
        self.pushes_refused = 0
        self._leaving: asyncio.Task[None] | None = None

    def _clock_now(self) -> float:
        return (self.options.clock or LOCAL_TIME).now()

    def trust_relay(self, certificate: x509.Certificate, ca_certificate: x509.Certificate) -> None:
        """Trust the relay's ``certificate`` (checked at the handshake) and keep the tunnel only until
        a moment before it ends; a renewed one pushed meanwhile moves that moment."""
        self.ca_certificate = ca_certificate
        self.trusted = trust(certificate, self._clock_now(), self.options.draw(),
                             leaves_on(self.options.left_on, certificate))
        self._trusted_der = certificate.public_bytes(serialization.Encoding.DER)
        self.spawn(self._keep_trust())

    async def _keep_trust(self) -> None:
        while not self.conn.closed and self.trusted is not None:
            left = self.trusted.leave_at - self._clock_now()
            if left <= 0:
                break
            self._trust_changed.clear()
            try:
                await asyncio.wait_for(self._trust_changed.wait(), min(left, TRUST_RECHECK))
            except TimeoutError:
                pass
        else:
            return
        remember_leave(self.options.left_on, self.trusted.certificate)
        reason = "the relay's certificate ends soon; reconnecting to check a current one"
        log.info("leaving the tunnel to %s: %s", self.relay_url, reason)
        # Not one of this tunnel's own tasks: closing cancels those, and this close must finish.
        self._leaving = asyncio.get_running_loop().create_task(self.close(ErrorCode.NO_ERROR, reason))

    def on_relay_certificate(self, event: RelayCertificateOffered) -> None:
        trusted, ca = self.trusted, self.ca_certificate
        if trusted is None or ca is None or self.pushes_refused >= MAX_REFUSED_PUSHES:
            return  # past the bound, a relay flooding pushes costs this gateway neither checks nor log lines
        if event.refused is None and event.certificate == self._trusted_der:
            # The relay pushes at admission to a tunnel that may have shaken hands before its renewal
            # (controller/relay/cert_push.py); this one had not, so it already trusts that certificate.
            # Nothing changes, nothing is counted: the leave moment stays, and no signature is checked.
            log.debug("the relay at %s presented the certificate this tunnel already trusts", self.relay_url)
            return
        now = self._clock_now()
        try:
            if event.refused is not None:
                raise PushRefused(event.refused)
            pushed = check_pushed(trusted.certificate, ca, event.certificate, event.signature, self.nonce, now)
        except PushRefused as exc:
            self.pushes_refused += 1
            more = ("; later ones on this tunnel are ignored" if self.pushes_refused == MAX_REFUSED_PUSHES else "")
            log.warning("refused the renewed certificate the relay at %s pushed: %s; the tunnel is left before "
                        "the current one ends%s", self.relay_url, exc, more)
            return
        self.trusted = trust(pushed, now, self.options.draw())
        self._trusted_der = event.certificate
        self._trust_changed.set()
        log.info("the relay at %s renewed its certificate (serial %x); the tunnel stays", self.relay_url,
                 pushed.serial_number)

    async def on_challenge(self, event: ChallengeReceived) -> None:
        if event.version != PROTOCOL_VERSION:
            self.conn.close(ErrorCode.UNSUPPORTED_VERSION, f"agent speaks version {PROTOCOL_VERSION}")
            return
        self.nonce = bytes(event.nonce)
        message = auth_message(event.nonce, self.relay_digest)
        # A TPM signature can take hundreds of milliseconds: keep the loop free.
        signature = await asyncio.to_thread(self.credentials.keystore.sign, message)
        keepalive = self.options.liveness.keepalive_interval
        # RELAY_CERT_FEATURE: this agent understands a renewed certificate pushed in-band (docs/protocol.md).
        self.conn.send_auth(self.credentials.chain_pem, signature,
                            extra={"keepalive": keepalive, RELAY_CERT_FEATURE: True})

    async def on_authenticated(self, event: Authenticated) -> None:
        self.relay_info = dict(event.info)
        if self.options.binds:
            # SERVICE:PORT entries are targets of their service's declared ports, not services of their own.
            self.conn.send_bind(sorted(name for name in self.options.binds if ":" not in name))
        else:
            self.authenticated.set()

    async def on_bind_completed(self, event: BindCompleted) -> None:
        self.bound = tuple(event.bound)
        self.refused = dict(event.refused)
        for name, reason in self.refused.items():
            log.warning("relay refused to bind service %s: %s", name, reason)
        self.authenticated.set()

    def on_pong(self, rtt: float) -> None:
        self.last_rtt = rtt
        for listener in self.pong_listeners:
            listener(rtt)

    async def on_stream_opened(self, channel: StreamChannel) -> None:
        await serve_bound(self, channel, self.options.binds)


#: What open_tunnel takes for the WebSocket: an aiohttp session, or what makes one when first needed.
HttpSource = Any


def retry_after_of(error: aiohttp.WSServerHandshakeError) -> float | None:
    """The seconds a relay's 503 asked us to wait (``Retry-After``), None for any other refusal.

    The value is held within the bounds of agent/tunnel/backoff.py (``come_back_after``), as
    a GOAWAY's come-back time is: a relay must not park its fleet for hours by a typo.
    """
    if error.status != SERVICE_UNAVAILABLE or error.headers is None:
        return None
    value = error.headers.get("Retry-After", "").strip()
    if not value.isascii() or not value.isdigit():
        return None
    return come_back_after(int(value))


async def open_tunnel(http: HttpSource, relay_url: str, credentials: TunnelCredentials,
                      ssl_context: ssl.SSLContext, options: TunnelOptions) -> tuple[AgentSession, asyncio.Task[None]]:
    """Connect and authenticate; returns the session and the task running it.

    Raises TrustError (relay not from the pinned CA), ControllerUnreachable
    (network), TunnelRefused (the relay said no, with its reason;
    IdentityRefused when it was for a revoked or disabled identity), ClockError
    (the relay's certificate is not valid by a clock that could not be checked).
    ``ssl_context`` is agent.identity.tls_trust.pinned_ssl_context; the relay's
    certificate is then judged by ``options.clock`` (PinnedTLS.check). ``http``
    (an aiohttp session, or a callable making one) is used only for a WebSocket.
    """
    kind = options.transport
    if kind == "auto" and options.fallback_until.get(relay_url, 0.0) > time.monotonic():
        kind = "websocket"
    if kind == "websocket":
        return await _authenticate(await _open_websocket(http, relay_url, ssl_context, options),
                                   relay_url, credentials, options)
    if options.alpn_context is None:
        from agent.identity.tls_trust import pinned_ssl_context
        options.alpn_context = tunnel_tls_context(pinned_ssl_context(credentials.ca_pem))
    try:
        try:
            link: Transport = await asyncio.wait_for(
                open_tls_link(relay_url, options.alpn_context, options.proxy), CONNECT_TIMEOUT)
        except TimeoutError:
            raise ControllerUnreachable(f"cannot reach the relay at {relay_url}: timed out") from None
        return await _authenticate(link, relay_url, credentials, options)
    except (NotReached, ProxyFailed, RelayBusy):
        raise  # a relay that said when to come back speaks TLS: no WebSocket fallback
    except ControllerUnreachable as exc:
        if kind != "auto":
            raise
        log.warning("%s; trying the WebSocket instead for the next %g s", exc, FALLBACK_HOLD)
    options.fallback_until[relay_url] = time.monotonic() + FALLBACK_HOLD
    return await _authenticate(await _open_websocket(http, relay_url, ssl_context, options),
                               relay_url, credentials, options)


async def _open_websocket(http: HttpSource, relay_url: str, ssl_context: ssl.SSLContext,
                          options: TunnelOptions) -> Transport:
    import aiohttp  # only a WebSocket tunnel loads it

    from shared.tunnel.ws_transport import WebSocketTransport

    if not isinstance(http, aiohttp.ClientSession):
        http = http()
    try:
        ws = await asyncio.wait_for(
            http.ws_connect(relay_url, ssl=ssl_context, protocols=(SUBPROTOCOL,), heartbeat=None,
                            autoping=True, compress=0, max_msg_size=WS_RECEIVE_MAX,
                            **options.proxy.request_options(relay_url)),
            CONNECT_TIMEOUT,
        )
    except aiohttp.ClientConnectorCertificateError as exc:
        raise TrustError(
            f"the relay at {relay_url} presented a certificate not issued by the pinned controller CA "
            f"({exc.certificate_error}); check the relay address, or whether something intercepts TLS"
        ) from None
    except aiohttp.ClientConnectorSSLError as exc:
        raise TrustError(f"TLS with the relay at {relay_url} failed: {exc}") from None
    except aiohttp.WSServerHandshakeError as exc:
        told = retry_after_of(exc)
        if told is not None:
            raise RelayBusy(f"the relay at {relay_url} is admitting as many tunnels as it can; "
                            f"coming back in {told:g} s as it asked", told) from None
        raise ControllerUnreachable(
            f"the relay at {relay_url} refused the tunnel upgrade (HTTP {exc.status}); is the URL right?"
        ) from None
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        raise network_failure(exc, options.proxy.route(relay_url), f"the relay at {relay_url}",
                              f"cannot reach the relay at {relay_url}: {{reason}}") from None
    return WebSocketTransport(ws)


async def _authenticate(link: Transport, relay_url: str, credentials: TunnelCredentials,
                        options: TunnelOptions) -> tuple[AgentSession, asyncio.Task[None]]:
    tls = PinnedTLS(credentials.ca_pem, options.clock or LOCAL_TIME, options.proxy)
    ssl_object = link.get_extra_info("ssl_object")
    try:
        relay_certificate = tls.check(ssl_object, f"the relay at {relay_url}")
    except OutpostError:
        link.abort()
        raise
    digest = peer_certificate_digest(ssl_object)
    loop = asyncio.get_running_loop()
    conn = Connection(Role.AGENT, loop.time(), limits=options.limits, liveness=options.liveness)
    session = AgentSession(conn, link, relay_url, credentials, digest, options)
    # Before any frame is read: a relay pushes a renewed certificate right behind AUTH_OK when this
    # handshake came just before its renewal, and a push before the trust is set would be dropped.
    session.trust_relay(relay_certificate, tls.ca_certificate)
    task = loop.create_task(session.run())
    authenticated = loop.create_task(session.authenticated.wait())
    closed = loop.create_task(session.closed.wait())
    try:
        await asyncio.wait({authenticated, closed}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        authenticated.cancel()
        closed.cancel()
    if not session.authenticated.is_set():
        try:
            await task
        except ProtocolError as exc:
            # The core's own error (this end's misuse, such as a chain past the AUTH limit) in the agent's terms.
            raise TunnelFailed(f"the tunnel to {relay_url} failed during authentication: {exc}") from None
        code, reason, _ = session.close_reason or (ErrorCode.CANCEL, "closed", True)
        if code in (ErrorCode.AUTH_FAILED, ErrorCode.REVOKED, ErrorCode.DISABLED, ErrorCode.UNSUPPORTED_VERSION):
            raise refusal_for(code, reason, relay_url)
        told = come_back_after(session.conn.retry_after)
        if told is not None:
            raise RelayBusy(f"the relay at {relay_url} is admitting as many tunnels as it can; "
                            f"coming back in {told:g} s as it asked", told)
        raise ControllerUnreachable(f"the tunnel to {relay_url} closed during authentication: {reason or code.name}")
    return session, task
