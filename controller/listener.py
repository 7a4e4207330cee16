"""The listeners' front door: deadlines and caps for connections that have not authenticated yet.

A ``Listener`` runs its own accept loop: every accepted TCP connection is
counted against a cap per source address and a cap in total
(controller/admission.py) *before* its TLS handshake, so a flood from one address costs neither a handshake nor a TLS
buffer (one over a cap is reset at once), and so is one past the cap on TLS
handshakes in progress (a reconnecting fleet, before it costs a handshake
that would miss its deadline behind the others). The handshake
(``loop.connect_accepted_socket``, bounded by a deadline) uses whatever
certificate the listener holds at that moment, so a certificate renewed while
running serves every new handshake and no live one is touched. Then a
``GuardedConnection`` stands between the TLS transport and aiohttp's request
handler and keeps the request-head deadline: a connection that does not
complete a request head in time is closed. The request body deadline is kept
by ``request_deadlines`` (a middleware in controller/routes.py). A connection leaves the unauthenticated count once it proved who
it is: a tunnel that passed AUTH, or a request carrying the admin credential.

A connection whose TLS handshake chose Outpost's own ALPN (``TUNNEL_ALPN``)
is no HTTP: it goes straight to the listener's ``tunnel_handler`` (the
relay) as a byte stream, and the protocol core's AUTH deadline bounds it
instead of the request-head one. Every other connection goes to aiohttp.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import errno
import logging
import socket
import ssl
import struct
from collections.abc import Callable, Coroutine
from typing import Any

from aiohttp import web

from controller.admission import (
    MAX_HANDSHAKES_IN_FLIGHT,
    MAX_UNAUTHENTICATED,
    MAX_UNAUTHENTICATED_PER_ADDRESS,
    Admission,
    cap_key,
)
from controller.listener_park import PARK_LIMIT, Parking
from shared.protocol import AUTH_DEADLINE, MAX_STREAMS, TUNNEL_ALPN
from shared.tunnel.transport import StreamTransport, TunnelReader

#: Serves one tunnel on TLS directly: the stream, the peer's address, and what marks it authenticated.
TunnelHandler = Callable[[StreamTransport, str, Callable[[], None]], Coroutine[Any, Any, None]]

log = logging.getLogger(__name__)

#: A TLS handshake is two round trips and one signature each way: 1.2 s at a
#: satellite's 600 ms RTT; 10 s also absorbs a lost segment's retransmission
#: (TCP's first RTO is 1 s, then 3 s) on such a link, and no more.
TLS_HANDSHAKE_DEADLINE = 10.0
#: The request head follows the handshake in one flight (a few hundred bytes,
#: one segment): half a round trip on any link, so 10 s again leaves room for
#: retransmissions, and a client sending one header line every few seconds
#: is cut off well before it could pin memory for long.
REQUEST_HEAD_DEADLINE = 10.0
#: A body is at most MAX_REQUEST_BODY (64 KiB): about six round trips of TCP
#: slow start (3.6 s at 600 ms RTT), or 8 s at 64 kbit/s on a poor cellular
#: link; 30 s covers both with room to spare and ends a trickling body.
REQUEST_BODY_DEADLINE = 30.0
#: A head deadline that fires this late found the event loop stalled (by
#: other work), not the peer: it gets this long once more for its bytes,
#: which may be waiting unread, to be read.
STALL_TOLERANCE = 0.5
HEAD_END = b"\r\n\r\n"
#: A relay closes a relay link that took none of what it wrote for this long. Relays sit in data
#: centres and read all the time; one that stopped is stuck or hostile, and every dial on its link
#: holds up to a window of this relay's memory meanwhile (its gateway is held back by that window,
#: not by the link).
LINK_WRITE_STALL = 20.0
#: Dials one relay link carries at once: below the protocol's MAX_STREAMS (256), which the other relay
#: enforces, by a margin for streams it still counts while their last bytes are acknowledged; so the
#: other end never refuses a dial on a link the dialing end thought had room.
LINK_DIALS = MAX_STREAMS - 16
#: Links one relay opens to another at once, a new one when the others carry LINK_DIALS: a pair of
#: relays carries up to 8 x 240 = 1,920 dials at once. Each link is one TLS connection holding up to
#: its streams' windows at each end; past this a dial is refused with a sentence, rather than one
#: relay growing another without bound.
MAX_LINKS_PER_PAIR = 8


@dataclasses.dataclass(frozen=True)
class ListenerLimits:
    """The deadlines and caps of one listener (tests shorten them)."""

    handshake_deadline: float = TLS_HANDSHAKE_DEADLINE
    #: A tunnel's AUTH, once its TLS handshake is done (the protocol's AUTH_DEADLINE; relay links alike).
    auth_deadline: float = AUTH_DEADLINE
    head_deadline: float = REQUEST_HEAD_DEADLINE
    body_deadline: float = REQUEST_BODY_DEADLINE
    max_unauthenticated: int = MAX_UNAUTHENTICATED
    max_unauthenticated_per_address: int = MAX_UNAUTHENTICATED_PER_ADDRESS
    max_handshakes: int = MAX_HANDSHAKES_IN_FLIGHT
    #: How long an accepted connection may wait for room at a full relay before its handshake (controller/
    #: listener_park.py); 0 starts every handshake at once, and a full relay answers BUSY after it.
    park_limit: float = PARK_LIMIT
    #: A relay link admitted here that reads nothing of what is written to it (controller/relay/peering.py).
    link_write_stall: float = LINK_WRITE_STALL
    #: Dials per link and links per pair of relays, at the dialing end (controller/relay/peering.py).
    link_dials: int = LINK_DIALS
    links_per_pair: int = MAX_LINKS_PER_PAIR


class Stage(enum.Enum):
    HANDSHAKE = "handshake"
    HEAD = "head"  # waiting for a complete request head, the deadline running
    REQUEST = "request"  # a request is being handled (its body under the body deadline)
    IDLE = "idle"  # between requests; aiohttp's keep-alive timeout bounds this
    CLOSED = "closed"


#: accept() failures that mean "out of descriptors or memory": wait, then accept again.
_RESOURCE_ERRNOS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
#: How long the accept loop waits after running out of descriptors (asyncio's own servers wait 1 s too).
ACCEPT_RETRY_DELAY = 1.0


class Listener:
    """One listening socket: its TLS context (swappable), limits, admission, and the accept loop.

    It stands in for the ``asyncio.Server`` aiohttp's site would hold
    (``close``, ``wait_closed``, ``sockets``).
    """

    def __init__(self, name: str, tls: ssl.SSLContext, limits: ListenerLimits) -> None:
        self.name = name
        self.tls = tls
        self.limits = limits
        self.admission = Admission(name, limits)
        self.connections: set[GuardedConnection] = set()
        self.sockets: list[socket.socket] = []
        self._accepting: asyncio.Task[None] | None = None
        self._handshakes: set[asyncio.Task[None]] = set()
        #: Connections reset at accept because max_handshakes were in progress (the agents back off).
        self.handshakes_shed = 0
        #: Connections ended since memory was last handed back (return_freed_memory).
        self.closed_since_trim = 0
        #: Where connections that chose ``TUNNEL_ALPN`` go; None: this listener serves HTTP only.
        self.tunnel_handler: TunnelHandler | None = None
        self._tunnels: set[asyncio.Task[None]] = set()
        #: Where accepted connections wait while the relay behind this listener is full (``hold_while``).
        self.parking: Parking | None = None
        self._handler_factory: Callable[[], asyncio.Protocol] | None = None

    def hold_while(self, full: Callable[[int], bool]) -> None:
        """Hold accepted connections before their handshake while ``full(handshakes in progress)`` is true."""
        self.parking = Parking(lambda: full(len(self._handshakes)), self._begin, self._drop, self.limits.park_limit)

    def start(self, sock: socket.socket, handler_factory: Callable[[], asyncio.Protocol]) -> None:
        self.sockets = [sock]
        self._handler_factory = handler_factory
        self._accepting = asyncio.get_running_loop().create_task(self._accept(sock))

    async def _accept(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, peer = await loop.sock_accept(sock)
            except OSError as error:
                if error.errno in _RESOURCE_ERRNOS:
                    log.error("%s: cannot accept connections (%s); trying again in %g s",
                              self.name, error.strerror, ACCEPT_RETRY_DELAY)
                    await asyncio.sleep(ACCEPT_RETRY_DELAY)
                continue  # ECONNABORTED and the like: that one peer is gone
            address = cap_key(str(peer[0])) if isinstance(peer, tuple) and peer else "?"
            shed = len(self._handshakes) >= self.limits.max_handshakes
            if shed:
                self.handshakes_shed += 1
            if shed or not self.admission.enter(address):
                # A reset, not a goodbye: no TIME_WAIT kept for a peer over its cap.
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
                conn.close()
                continue
            conn.setblocking(False)
            if self.parking is not None:
                self.parking.admit_or_hold(conn, address)
            else:
                self._begin(conn, address)

    def _begin(self, conn: socket.socket, address: str) -> None:
        """Start the TLS handshake of an accepted, counted connection, unless max_handshakes are in progress."""
        if len(self._handshakes) >= self.limits.max_handshakes:
            # A held connection whose time ran out while others' handshakes fill the cap: as at accept.
            self.handshakes_shed += 1
            self._drop(conn, address)
            return
        assert self._handler_factory is not None
        task = asyncio.get_running_loop().create_task(self._handshake(conn, address, self._handler_factory))
        self._handshakes.add(task)
        task.add_done_callback(self._handshakes.discard)

    def _drop(self, conn: socket.socket, address: str) -> None:
        """Reset an accepted connection that never started its handshake, and uncount it."""
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        conn.close()
        self.admission.leave(address)

    async def _handshake(self, conn: socket.socket, address: str,
                         handler_factory: Callable[[], asyncio.Protocol]) -> None:
        connection = GuardedConnection(self, handler_factory, address)
        try:
            await asyncio.get_running_loop().connect_accepted_socket(
                lambda: connection, conn, ssl=self.tls, ssl_handshake_timeout=self.limits.handshake_deadline)
        except (TimeoutError, OSError, ssl.SSLError, asyncio.CancelledError) as error:
            log.debug("%s: TLS handshake with %s failed: %r", self.name, address, error)
            connection.handshake_failed()

    def close(self) -> None:
        """Stop accepting and end the handshakes in progress (aiohttp closes the rest)."""
        if self._accepting is not None:
            self._accepting.cancel()
        if self.parking is not None:
            self.parking.close()
        for task in list(self._handshakes):
            task.cancel()
        self.admission.close()

    async def wait_closed(self) -> None:
        tasks = [t for t in (self._accepting, *self._handshakes) if t is not None]
        await asyncio.gather(*tasks, return_exceptions=True)


#: SO_LINGER on, zero seconds: close() sends a reset.
_LINGER_RESET = struct.pack("ii", 1, 0)


class GuardedConnection(asyncio.Protocol):
    """One connection past its TLS handshake: aiohttp's handler behind the head deadline, counted until it authenticates."""

    def __init__(self, listener: Listener, handler_factory: Callable[[], asyncio.Protocol], address: str) -> None:
        self.listener = listener
        self._handler_factory = handler_factory
        self.address = address
        self.stage = Stage.HANDSHAKE
        self.authenticated = False
        self._counted = True  # Listener._accept counted it
        self._transport: Any = None
        self._handler: asyncio.Protocol | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._deadline_at = 0.0
        self._grace_given = False
        #: The last bytes of the head so far, to find its end across two reads.
        self._tail = b""

    # -- from the TLS transport, forwarded to aiohttp's handler --
    def connection_made(self, transport: Any) -> None:  # asyncio's or uvloop's TLS transport
        self._transport = transport
        self.listener.connections.add(self)
        if self._tunnel_alpn(transport):
            self._serve_tunnel(transport)
            return
        self.stage = Stage.HEAD
        self._arm(self.listener.limits.head_deadline)
        handler = self._handler_factory()
        self._handler = handler
        handler.connection_made(transport)

    def _tunnel_alpn(self, transport: Any) -> bool:
        ssl_object = transport.get_extra_info("ssl_object")
        alpn = ssl_object.selected_alpn_protocol() if ssl_object is not None else None
        return alpn == TUNNEL_ALPN and self.listener.tunnel_handler is not None

    def _serve_tunnel(self, transport: Any) -> None:
        # No request head to wait for: the core's AUTH deadline bounds an unauthenticated tunnel.
        self.stage = Stage.REQUEST
        loop = asyncio.get_running_loop()
        reader = TunnelReader()
        handler = asyncio.StreamReaderProtocol(reader)
        self._handler = handler
        handler.connection_made(transport)
        writer = asyncio.StreamWriter(transport, handler, reader, loop)
        peer = transport.get_extra_info("peername")
        remote = str(peer[0]) if isinstance(peer, tuple) and peer else self.address
        assert self.listener.tunnel_handler is not None
        task = loop.create_task(self.listener.tunnel_handler(StreamTransport(reader, writer), remote,
                                                             self.mark_authenticated))
        self.listener._tunnels.add(task)
        task.add_done_callback(self.listener._tunnels.discard)

    def data_received(self, data: bytes) -> None:
        if self._handler is None:
            return
        if self.stage is Stage.IDLE:
            self.stage = Stage.HEAD  # the first byte of the next request starts its head deadline
            self._tail = b""
            self._arm(self.listener.limits.head_deadline)
        if self.stage is Stage.HEAD:
            # The blank line that ends a request head: the deadline is met, whenever the handler
            # runs. Empty lines before a request line (RFC 9112 lets servers skip them) start nothing.
            chunk = data if self._tail else data.lstrip(b"\r\n")
            if chunk:
                seen = self._tail + chunk
                if HEAD_END in seen:
                    self._disarm()
                    self.stage = Stage.REQUEST
                self._tail = seen[-(len(HEAD_END) - 1):]
        self._handler.data_received(data)

    def eof_received(self) -> bool | None:
        return self._handler.eof_received() if self._handler is not None else None

    def pause_writing(self) -> None:
        if self._handler is not None:
            self._handler.pause_writing()

    def resume_writing(self) -> None:
        if self._handler is not None:
            self._handler.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        handler, self._handler = self._handler, None
        self._finish()
        if handler is not None:
            handler.connection_lost(exc)

    def handshake_failed(self) -> None:
        if self._handler is None:
            self._finish()

    # -- from the request middleware and the relay --
    def request_started(self) -> None:
        self._disarm()
        if self.stage is not Stage.CLOSED:
            self.stage = Stage.REQUEST

    def request_finished(self) -> None:
        if self.stage is Stage.REQUEST:
            self.stage = Stage.IDLE

    def mark_authenticated(self) -> None:
        """The peer proved who it is: it no longer counts against the unauthenticated caps."""
        if not self.authenticated:
            self.authenticated = True
            self._release()

    def abort(self) -> None:
        """Close at once, without a TLS goodbye (the peer is stalling or gone)."""
        if self.stage is not Stage.CLOSED and self._transport is not None and not self._transport.is_closing():
            self._transport.abort()
        self._finish()

    # -- internals --
    def _arm(self, seconds: float) -> None:
        self._disarm()
        loop = asyncio.get_running_loop()
        self._deadline_at = loop.time() + seconds
        self._grace_given = False
        self._timer = loop.call_later(seconds, self._head_expired)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _head_expired(self) -> None:
        self._timer = None
        if self.stage is not Stage.HEAD:
            return
        loop = asyncio.get_running_loop()
        if loop.time() - self._deadline_at > STALL_TOLERANCE and not self._grace_given:
            # The loop itself was stalled past the deadline: the peer's bytes may be waiting
            # unread. Read them first (uvloop runs timers before reading sockets).
            self._grace_given = True
            self._timer = loop.call_later(STALL_TOLERANCE, self._head_expired)
            self._deadline_at = loop.time() + STALL_TOLERANCE
            return
        log.debug("%s: %s sent no complete request head in %g s; closed",
                  self.listener.name, self.address, self.listener.limits.head_deadline)
        self.abort()

    def _release(self) -> None:
        if self._counted:
            self._counted = False
            self.listener.admission.leave(self.address)

    def _finish(self) -> None:
        if self.stage is not Stage.CLOSED:
            self.listener.closed_since_trim += 1
        self.stage = Stage.CLOSED
        self._disarm()
        self._release()
        self.listener.connections.discard(self)


def guarded_connection(request: web.Request) -> GuardedConnection | None:
    """The guard in front of ``request``'s connection (None if it is gone already)."""
    transport = request.transport
    protocol = transport.get_protocol() if transport is not None else None
    return protocol if isinstance(protocol, GuardedConnection) else None


