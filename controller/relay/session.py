"""One agent's tunnel at the relay: its state, and the frame handlers of controller/relay/tunnel_auth.py and frames.py."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, ParamSpec, TypeVar

from aiohttp import web

from controller.blocking import RELAY_POOL
from controller.correlation import TUNNEL, new_id
from controller.presence import TunnelPresence
from controller.registry import Identity
from controller.relay import frames, reports, tunnel_auth
from shared.protocol import AuthReceived, BindRequested, Connection, ErrorCode, ReportReceived

# The session module is the agent's shared tunnel glue the relay may use (tests/test_layering.py).
from shared.tunnel.channel import StreamChannel
from shared.tunnel.session import TunnelSession
from shared.tunnel.transport import StreamTransport

if TYPE_CHECKING:
    from controller.context import ControllerContext
    from controller.relay.relay import Relay

T = TypeVar("T")
P = ParamSpec("P")


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
        #: Held while one of this tunnel's jobs runs in a worker: its jobs run in order, one at a time.
        self.worker_turn = asyncio.Lock()
        #: The upgrade request this tunnel came in on (set by Relay.handle).
        self.request: web.Request | None = None
        #: What marks a tunnel on TLS directly as authenticated at its listener (set by Relay.serve_stream).
        self.mark_admitted: Callable[[], None] | None = None
        self.presence: TunnelPresence | None = None
        self.reports_refused = 0
        #: Counted in Relay.admitting (upgraded, AUTH not answered yet).
        self.admitting = False
        #: Relay.certificate_generation when this tunnel's TLS handshake was made (controller/relay/cert_push.py).
        self.certificate_generation = 0
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
        async with self.worker_turn:
            return await RELAY_POOL.run(function, *args, **kwargs)

    async def on_auth(self, event: AuthReceived) -> None:
        await tunnel_auth.on_auth(self, event)

    async def on_bind_requested(self, event: BindRequested) -> None:
        await frames.on_bind_requested(self, event)

    async def on_stream_opened(self, channel: StreamChannel) -> None:
        await frames.on_stream_opened(self, channel)

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
