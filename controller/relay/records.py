"""A dial's audit story under one connection id: requested, decided, served or failed, closed.

Every event names the dialing identity and the service the same way
(``tenant/name``), so ``outpostctl connections`` and ``outpostctl audit
--identity`` find them all (controller/connections.py builds one row per
connection id from these events).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import logging
import math
import threading
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from cryptography import x509

from controller.audit import AuditLog, Event
from controller.blocking import WorkerPool
from controller.correlation import CONNECTION, new_id
from controller.relay.admit import spiffe_uri
from shared.protocol import AuthReceived, ErrorCode
from shared.trust import verify_leaf_issued_by
from shared.tunnel.channel import StreamChannel

log = logging.getLogger(__name__)

#: Rows one transaction of the relay's queued audit writes holds at most: a
#: burst of closing tunnels costs a few fsyncs, and no transaction grows unbounded
#: (a stop's rows, bounded by the tunnels it held, go in one: ``QueuedAudit.held``).
MAX_ROWS_PER_TRANSACTION = 500
#: Shutdown waits for this many rounds of queued rows (rows queued while the previous round was written).
DRAIN_ROUNDS = 10
#: A row queued within this long of the last written transaction (rows arriving faster than 50 a second,
#: a reconnecting fleet) waits this long for more rows to share its commit: admissions at 400 a second
#: then share one commit (an fsync) per eight or so, instead of one per one or two. A lone row, with
#: nothing written for longer, is written at once; 20 ms is nothing beside the tunnel's TLS handshake.
BATCH_LINGER = 0.02

if TYPE_CHECKING:
    from controller.context import ControllerContext
    from controller.relay.session import RelaySession


def label_of_uri(uri: str) -> str:
    """``tenant/name`` of an identity URI (``spiffe://domain/tenant/name``)."""
    return "/".join(uri.rsplit("/", 2)[-2:])


async def refuse(session: RelaySession, event: AuthReceived, code: ErrorCode, reason: str) -> None:
    """Refuse a tunnel's AUTH (a gateway's or a relay link's) with ``reason``, and record ``tunnel_refused``."""
    log.warning("tunnel from %s refused: %s", session.remote, reason)
    if not session.conn.closed:
        session.conn.close(code, reason)
    await session.in_worker(record_refusal, session, event.chain, reason)


def record_refusal(session: RelaySession, chain: Sequence[str], reason: str) -> None:
    """``tunnel_refused``: by the identity's budget when our CA issued the certificate, else anonymous."""
    context = session.context
    uri = verified_identity_uri(context, chain)
    fields = {"remote": session.remote, "reason": reason, "correlation": session.tunnel_id, "relay": session.relay.name}
    if uri is None:
        context.audit.record_anonymous("tunnel_refused", **fields)
    else:
        context.audit.record("tunnel_refused", identity=label_of_uri(uri), **fields)


def verified_identity_uri(context: ControllerContext, chain: Sequence[str]) -> str | None:
    """The identity URI of ``chain``'s leaf when this controller's CA issued it, else None."""
    try:
        leaf = x509.load_pem_x509_certificate(chain[0].encode())
    except (ValueError, TypeError, IndexError):
        return None
    if not verify_leaf_issued_by(leaf, context.ca.certificate):
        return None
    return spiffe_uri(leaf)


class DialRecord:
    """The audit events of one dial through this relay (built on the event loop, written in workers)."""

    def __init__(self, session: RelaySession, channel: StreamChannel) -> None:
        self.id = new_id(CONNECTION)
        self.identity = session.admitted.label
        self.requested = channel.service
        self.service = channel.service
        self.relay = session.relay.name
        self.remote = session.remote
        self.tunnel = session.tunnel_id
        self.served_at: float | None = None  # the loop's clock

    def _fields(self, **fields: Any) -> dict[str, Any]:
        return {"correlation": self.id, "identity": self.identity, "service": self.service, **fields}

    def decided(self, allowed: bool, reason: str, service: str, policy_id: int | None) -> list[Event]:
        """The request and its decision: recorded together or (past the identity's budget) not at all."""
        self.service = service
        decision = {"reason": reason} if policy_id is None else {"reason": reason, "policy": policy_id}
        return [
            ("dial_requested", self._fields(relay=self.relay, remote=self.remote, tunnel=self.tunnel,
                                             requested=self.requested)),
            ("dial_allowed" if allowed else "dial_denied", self._fields(**decision)),
        ]

    def failed(self, reason: str) -> Event:
        return "dial_failed", self._fields(reason=reason, relay=self.relay)

    def served(self, gateway: RelaySession, now: float) -> Event:
        self.served_at = now
        return "dial_served", self._fields(gateway=gateway.admitted.label, gateway_tunnel=gateway.tunnel_id,
                                           relay=self.relay)

    def closed(self, dialer: StreamChannel, upstream: StreamChannel, now: float) -> Event:
        """Bytes each way, how long, which side ended it first and why."""
        finished = [(at, side) for at, side in ((dialer.peer_finished_at, "dialer"),
                                                 (upstream.peer_finished_at, "gateway")) if at is not None]
        closed_by = min(finished)[1] if finished else "relay"
        error = dialer.error or upstream.error
        reason = (error.reason or error.code.name) if error is not None else "ended"
        return "dial_closed", self._fields(
            bytes_up=dialer.received, bytes_down=upstream.received, closed_by=closed_by, reason=reason,
            duration_s=round(now - (self.served_at if self.served_at is not None else now), 3),
        )


class QueuedAudit:
    """Audit rows from code on the event loop that cannot await, written in order, many per transaction.

    One worker job at a time drains the queue: a dial costs no fsync of its
    own for its served and closed rows under load (they share a commit with
    whatever else closed meanwhile), and the rows of one connection are
    written in the order they were queued.
    """

    def __init__(self, audit: AuditLog, pool: WorkerPool) -> None:
        self._audit = audit
        self._pool = pool
        self._lock = threading.Lock()
        self._queue: list[Event] = []
        #: Beside each queued row: what is told once its transaction ended (None: nobody waits for it).
        self._written: list[concurrent.futures.Future[None] | None] = []
        #: Done once the running drain found the queue empty (None: no drain queued or running).
        self._running: concurrent.futures.Future[None] | None = None
        #: When (time.monotonic) the last drain found the queue empty.
        self._last_drained = -math.inf
        #: While true, rows are queued but no batch starts (``held``).
        self._holding = False
        #: Rows one transaction takes at most (``held`` lifts it for the rows queued meanwhile).
        self._batch = MAX_ROWS_PER_TRANSACTION

    def put(self, event: str, fields: dict[str, Any]) -> None:
        self._put(event, fields, None)

    def put_and_wait(self, event: str, fields: dict[str, Any]) -> concurrent.futures.Future[None]:
        """Queue a row; the future is done once the transaction that holds it ended (written or logged as lost).

        Awaited by a tunnel that must not go on before its row is in (its next job
        would otherwise be recorded first), while the row still shares a commit.
        """
        written: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._put(event, fields, written)
        return written

    def _put(self, event: str, fields: dict[str, Any], written: concurrent.futures.Future[None] | None) -> None:
        with self._lock:
            self._queue.append((event, fields))
            self._written.append(written)
            if self._running is not None or self._holding:
                return
            running = self._running = concurrent.futures.Future()
            busy = time.monotonic() - self._last_drained < BATCH_LINGER
        loop = None
        if busy:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # not on the event loop: nothing to wait with
                loop = None
        # An empty context: the rows name their own correlation, never a caller's scope.
        if loop is not None:
            loop.call_later(BATCH_LINGER, self._start, running, context=contextvars.Context())
        else:
            contextvars.Context().run(self._start, running)

    def _start(self, running: concurrent.futures.Future[None]) -> None:
        try:
            self._pool.submit(self._drain, running)
        except RuntimeError as error:  # the pool is shut down: the rows cannot be written any more
            log.error("%d audit rows not written: %r", len(self._queue), error)
            with self._lock:
                self._running = None
                waiting = self._written[:]
                del self._queue[:]
                del self._written[:]
            self._finish(running, waiting)

    @staticmethod
    def _finish(running: concurrent.futures.Future[None],
                waiting: list[concurrent.futures.Future[None] | None]) -> None:
        for written in waiting:
            if written is not None:
                written.set_result(None)
        running.set_result(None)

    def _drain(self, running: concurrent.futures.Future[None]) -> None:
        while True:
            with self._lock:
                size = self._batch
                self._batch = MAX_ROWS_PER_TRANSACTION
                batch = [] if self._holding else self._queue[:size]
                waiting = self._written[:len(batch)]
                del self._queue[:len(batch)]
                del self._written[:len(batch)]
                if not batch:
                    self._running = None
                    self._last_drained = time.monotonic()
                    running.set_result(None)
                    return
            try:
                self._audit.record_many(batch)
            except Exception as error:  # a full disk must not stop later rows from being tried
                log.error("%d audit rows not written: %r", len(batch), error)
            for written in waiting:
                if written is not None:
                    written.set_result(None)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """No batch starts meanwhile; the rows queued are written after, in order, in one transaction.

        For the event loop's own burst of rows with no await between them (a stop closing every
        tunnel): written beside it, 500 at a time, 10,000 rows cost a stop twenty commits, each
        an fsync of the WAL and now and then a checkpoint into a store that holds the whole
        fleet, while the loop waited for them. Not across an await: a tunnel waiting on its row
        (``put_and_wait``) would wait for the whole hold.
        """
        with self._lock:
            self._holding = True
        try:
            yield
        finally:
            with self._lock:
                self._holding = False
                self._batch = max(MAX_ROWS_PER_TRANSACTION, len(self._queue))
                start = self._running is None and bool(self._queue)
                if start:
                    running = self._running = concurrent.futures.Future()
            if start:
                contextvars.Context().run(self._start, running)

    async def drained(self) -> None:
        """Wait until every row queued so far is written (shutdown)."""
        for _ in range(DRAIN_ROUNDS):
            with self._lock:
                running = self._running
            if running is None:
                return
            await asyncio.wrap_future(running)
