"""The dialing end of a link to another relay: one tunnel per pair of relays, dials multiplexed on it.

Relay A opens it over TLS directly (Outpost's ALPN), pinned to the CA and
checked against the other relay's host name, and answers the CHALLENGE with
its own relay key over the other relay's certificate, exactly as an agent
does with its device key. ``RemoteBinder`` stands for the gateway at the
other end wherever the relay serves a dial with a local binder
(controller/relay/frames.py): its ``open_stream`` opens the stream on the link.
"""

from __future__ import annotations

import asyncio
import ssl
import time
import weakref

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from controller.registry import Identity
from controller.relay.broker import ServiceKey
from controller.relay.link_admit import CORRELATION_MARK, LINK_FIELD, LinkPeer
from controller.relay.link_trust import LinkTrust
from shared.protocol import (
    PROTOCOL_VERSION,
    TUNNEL_ALPN,
    Authenticated,
    ChallengeReceived,
    Connection,
    ErrorCode,
    Liveness,
    ProtocolLimits,
    Role,
    auth_message,
)
from shared.tunnel.auth import peer_certificate_digest
from shared.tunnel.channel import StreamChannel
from shared.tunnel.session import TunnelSession
from shared.tunnel.transport import STREAM_BUFFER_LIMIT, StreamTransport

#: Seconds for TCP, TLS and the CHALLENGE/AUTH exchange to another relay: relays sit in data centres,
#: so a link that takes longer is down, and the dial waiting on it fails with that reason.
LINK_CONNECT_TIMEOUT = 5.0
#: The link pings this often: it notices a relay that died without a FIN (a host gone) within a few
#: intervals, and a load balancer between relays does not drop it as idle.
LINK_KEEPALIVE = 10.0
LINK_LIVENESS = Liveness(keepalive_interval=LINK_KEEPALIVE, idle_timeout=3 * LINK_KEEPALIVE)
#: A link carries many dials: each stream's window as large as a gateway tunnel's at a relay
#: (controller/relay/relay.py's RELAY_LIMITS), for the same bandwidth-delay reasons.
LINK_LIMITS = ProtocolLimits(initial_window=8 * 1024 * 1024)
#: A dial counts against its link from when the link is chosen until its stream opens: one policy
#: decision in a worker thread, far less than this unless the store is away (then the dial fails anyway).
DIAL_RESERVATION = 15.0


class LinkFailed(Exception):
    """The link to another relay could not be opened; ``reason`` is the sentence the dialer reads."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class LinkSession(TunnelSession):
    """Relay A's end of one link to relay B."""

    def __init__(self, conn: Connection, link: StreamTransport, relay: str, chain_pem: list[str],
                 key: ec.EllipticCurvePrivateKey, peer_digest: bytes, tunnel_id: str) -> None:
        super().__init__(conn, link)
        self.relay = relay
        self.tunnel_id = tunnel_id
        self._chain = chain_pem
        self._key = key
        self._peer_digest = peer_digest
        self.authenticated = asyncio.Event()
        #: Dials that chose this link and have not opened their stream yet; a dial that ends without
        #: opening (denied, another gateway chosen) leaves with its RemoteBinder.
        self.pending: weakref.WeakSet[RemoteBinder] = weakref.WeakSet()
        #: The other relay's certificate as its TLS handshake presented it (DER), and this relay's (PEM).
        self.peer_certificate = b""
        self.own_certificate = chain_pem[0] if chain_pem else ""
        #: When this end stops putting dials on the link and closes it (controller/relay/link_trust.py).
        self.trust: LinkTrust | None = None
        #: The relay the store says presented ``peer_certificate``, with its key (controller/relay/link_admit.py).
        self.peer: LinkPeer | None = None

    def dials(self) -> int:
        """Dials on this link now: its open streams and those about to open."""
        now = time.monotonic()
        return len(self.conn.open_stream_ids) + sum(1 for b in list(self.pending)
                                                    if now - b.reserved_at < DIAL_RESERVATION)

    async def on_challenge(self, event: ChallengeReceived) -> None:
        if event.version != PROTOCOL_VERSION:
            self.conn.close(ErrorCode.UNSUPPORTED_VERSION, f"relay speaks version {PROTOCOL_VERSION}")
            return
        signature = self._key.sign(auth_message(event.nonce, self._peer_digest), ec.ECDSA(hashes.SHA256()))
        self.conn.send_auth(self._chain, signature, extra={LINK_FIELD: True, "keepalive": LINK_KEEPALIVE})

    async def on_authenticated(self, event: Authenticated) -> None:
        self.authenticated.set()

    async def on_stream_opened(self, channel: StreamChannel) -> None:
        # Dials go from A to B only: B has no reason to open a stream here.
        channel.reset(ErrorCode.POLICY_DENIED, "a relay link carries dials one way only")


def link_tls_context(ca_pem: str) -> ssl.SSLContext:
    tls = ssl.create_default_context(cadata=ca_pem)
    tls.minimum_version = ssl.TLSVersion.TLSv1_2
    tls.set_alpn_protocols([TUNNEL_ALPN])
    return tls


async def open_link(relay: str, address: str, tls: ssl.SSLContext, cert_pem: str, key_pem: bytes,
                    tunnel_id: str) -> tuple[LinkSession, asyncio.Task[None]]:
    """An authenticated link to ``relay`` at ``address`` (HOST:PORT), or LinkFailed saying why not."""
    host, _, port = address.rpartition(":")
    host = host[1:-1] if host.startswith("[") else host
    key = serialization.load_pem_private_key(key_pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise LinkFailed("this relay's key is not an EC key; enroll the relay again")
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(
            host, int(port), ssl=tls, server_hostname=host, limit=STREAM_BUFFER_LIMIT), LINK_CONNECT_TIMEOUT)
    except (OSError, ssl.SSLError, TimeoutError, ValueError) as error:
        raise LinkFailed(f"relay {relay} at {address} cannot be reached ({error or type(error).__name__})") from None
    transport = StreamTransport(reader, writer)
    ssl_object = writer.get_extra_info("ssl_object")
    if ssl_object is None or ssl_object.selected_alpn_protocol() != TUNNEL_ALPN:
        transport.abort()
        raise LinkFailed(f"relay {relay} at {address} does not speak {TUNNEL_ALPN}; upgrade it")
    loop = asyncio.get_running_loop()
    conn = Connection(Role.AGENT, loop.time(), limits=LINK_LIMITS, liveness=LINK_LIVENESS)
    conn.mark_relay_link()
    session = LinkSession(conn, transport, relay, [cert_pem], key, peer_certificate_digest(ssl_object), tunnel_id)
    session.peer_certificate = ssl_object.getpeercert(binary_form=True) or b""
    task = loop.create_task(session.run())
    done = loop.create_task(session.authenticated.wait())
    closed = loop.create_task(session.closed.wait())
    try:
        await asyncio.wait({done, closed}, timeout=LINK_CONNECT_TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
    finally:
        done.cancel()
        closed.cancel()
    if not session.authenticated.is_set():
        session.abort()
        _, reason, _ = session.close_reason or (ErrorCode.TIMEOUT, "no answer to AUTH in time", False)
        raise LinkFailed(f"relay {relay} refused this relay's link: {reason}")
    return session, task


def certificate_pem(path_text: bytes) -> str:
    """The PEM of the relay's own certificate file (re-read at each link: a renewal replaces it)."""
    return x509.load_pem_x509_certificate(path_text).public_bytes(serialization.Encoding.PEM).decode("ascii")


class RemoteBinder:
    """A gateway bound at another relay, as the dial path sees a local binder's tunnel."""

    def __init__(self, link: LinkSession, gateway: Identity, key: ServiceKey, correlation: str) -> None:
        self.link = link
        self.conn = link.conn
        self.identity: Identity | None = gateway
        self.admitted = gateway
        self.key = key
        self.correlation = correlation
        #: The audit's ``gateway_tunnel`` of a dial served across relays: the link's id.
        self.tunnel_id = link.tunnel_id
        self.reserved_at = time.monotonic()
        link.pending.add(self)

    def open_stream(self, name: str, peer: str | None = None) -> StreamChannel:
        """The dial's stream on the link: the service qualified and aimed at its gateway, the dialer and the id."""
        _, colon, port = name.rpartition("/")[2].partition(":")
        target = f"{self.key[0]}/{self.key[1]}{colon}{port}@{self.admitted.name}"
        self.link.pending.discard(self)  # counted by its stream from now on
        return self.link.open_stream(target, peer=f"{peer}{CORRELATION_MARK}{self.correlation}")

    async def flush(self) -> None:
        await self.link.flush()
