"""Presence: which identity is online where, since when, last seen when, and what its agent reported.

The relay keeps its own tunnels' presence in memory (``PresenceBook``) and
writes it to the store in batches, every ``PRESENCE_FLUSH_INTERVAL`` and when
it stops: never on a keepalive. Each controller process writes only the rows
of its own tunnels (keyed by its relay id) and a heartbeat row of its own; a
reader merges every process's rows (``controller/fleet.py``). A process that
died leaves rows saying "online": its heartbeat stops, and after
``PRESENCE_STALE_AFTER`` its rows read as offline, keeping their last seen.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from controller.blocking import RELAY_POOL
from controller.store import Store

log = logging.getLogger(__name__)

#: Seconds between two batched writes of this process's presence. A reader in
#: another process sees a change this late at most; 5,000 online gateways
#: cost one transaction every 30 s, not one write per keepalive.
PRESENCE_FLUSH_INTERVAL = 30.0
#: A live tunnel's row is rewritten only when its last seen moved this far
#: since the row was written (or something else changed): a fleet on a 25 s
#: keepalive costs each row one write a minute, a metered one (540 s) one per
#: keepalive. Readers in other processes allow for this lag (``row_lag``).
LAST_SEEN_RESOLUTION = 60.0
#: A process whose heartbeat is older than this is gone (killed, its host
#: down): its "online" rows read as offline. Four missed flushes, so a busy
#: store (a flush that waits seconds for the write lock) is not taken for death.
PRESENCE_STALE_AFTER = 4 * PRESENCE_FLUSH_INTERVAL
#: Heartbeat rows of processes gone this long are removed (each start adds
#: one): a week of history says which process a gateway was last seen on.
RELAY_ROW_RETENTION = 7 * 86400.0
#: A gateway is "overdue" when this many of its announced keepalive intervals
#: passed without a byte from it, even while the relay still holds its socket
#: (the relay drops it after three: controller/relay/tunnel_auth.py).
OVERDUE_KEEPALIVES = 2

Key = tuple[str, str]

#: A presence row's columns, in the order of ``PresenceBook._row``'s values.
PRESENCE_COLUMNS = ("tenant", "name", "relay", "online", "connected_since", "last_seen", "remote", "keepalive_s",
                    "report", "report_at", "updated_at")


def new_relay_id() -> str:
    """An id of this controller process, new at every start: host, pid and a random part (pids are reused)."""
    return f"{socket.gethostname()[:48]}:{os.getpid()}:{secrets.token_hex(3)}"


def row_lag(own: bool) -> float:
    """How stale a row's last seen may be before it means anything: none for this process's live tunnels."""
    return 0.0 if own else LAST_SEEN_RESOLUTION + PRESENCE_FLUSH_INTERVAL


@dataclass
class TunnelPresence:
    """One identity's live tunnel on this process (the newest, when a reconnect overlaps the old one)."""

    tenant: str
    name: str
    remote: str
    connected_since: float
    keepalive_s: float | None
    #: wall-clock time of the last bytes received on the tunnel
    last_seen: Callable[[], float]
    report: dict[str, Any] | None = None
    report_at: float | None = None
    #: () -> (bytes received, bytes sent) on the tunnel so far
    traffic: Callable[[], tuple[int, int]] | None = None

    @property
    def key(self) -> Key:
        return self.tenant, self.name


class PresenceBook:
    """This process's tunnels' presence, in memory, flushed to the store in batches."""

    def __init__(self, store: Store, relay_id: str | None = None, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.relay_id = relay_id or new_relay_id()
        self.started_at = clock()
        self._clock = clock
        self.live: dict[Key, TunnelPresence] = {}
        #: identities whose row must be written at the next flush (up, report), and those that went down
        self._dirty: set[Key] = set()
        self._down: dict[Key, tuple[Any, ...]] = {}
        #: the last report of an identity whose tunnel ended and is not written yet (a reconnect keeps it)
        self._ended: dict[Key, TunnelPresence] = {}
        #: last seen as last written, per live identity
        self._written: dict[Key, float] = {}
        #: presence rows written by this process (the benchmark reports them per minute)
        self.rows_written = 0
        self.flushes = 0
        #: seconds the presence transactions took, all together (the metrics' store write latency)
        self.write_seconds = 0.0
        #: bytes (in, out) of this process's tunnels that ended
        self.bytes_closed = [0, 0]

    # -- the relay's events (event loop) ------------------------------------------
    def up(self, tunnel: TunnelPresence) -> None:
        previous = self.live.get(tunnel.key) or self._ended.get(tunnel.key)
        if previous is not None and tunnel.report is None:
            tunnel.report, tunnel.report_at = previous.report, previous.report_at
        self.live[tunnel.key] = tunnel
        self._down.pop(tunnel.key, None)
        self._dirty.add(tunnel.key)

    def report(self, tunnel: TunnelPresence, report: dict[str, Any]) -> None:
        tunnel.report, tunnel.report_at = report, self._clock()
        if self.live.get(tunnel.key) is tunnel:
            self._dirty.add(tunnel.key)

    def down(self, tunnel: TunnelPresence) -> None:
        """The tunnel ended; a newer tunnel of the same identity on this process stays online."""
        if tunnel.traffic is not None:
            received, sent = tunnel.traffic()
            self.bytes_closed[0] += received
            self.bytes_closed[1] += sent
        if self.live.get(tunnel.key) is not tunnel:
            return
        del self.live[tunnel.key]
        self._written.pop(tunnel.key, None)
        self._dirty.discard(tunnel.key)
        self._ended[tunnel.key] = tunnel
        self._down[tunnel.key] = self._row(tunnel, False, tunnel.last_seen(), self._clock())

    def ended_unwritten(self) -> list[tuple[Any, ...]]:
        """The rows of tunnels that ended since the last batch (readers of this process see them at once)."""
        return list(self._down.values())

    # -- batches -------------------------------------------------------------------
    def collect(self) -> list[tuple[Any, ...]]:
        """The rows due now (event loop): new or changed tunnels, those whose last seen moved, those that ended."""
        now = self._clock()
        rows = []
        for key, tunnel in self.live.items():
            seen = tunnel.last_seen()
            if key in self._dirty or seen - self._written.get(key, float("-inf")) >= LAST_SEEN_RESOLUTION:
                rows.append(self._row(tunnel, True, seen, now))
                self._written[key] = seen
        rows += self._down.values()
        self._dirty.clear()
        self._down.clear()
        self._ended.clear()
        return rows

    def _row(self, tunnel: TunnelPresence, online: bool, seen: float, now: float) -> tuple[Any, ...]:
        report = None if tunnel.report is None else json.dumps(tunnel.report, sort_keys=True)
        return (tunnel.tenant, tunnel.name, self.relay_id, int(online), tunnel.connected_since, seen, tunnel.remote,
                tunnel.keepalive_s, report, tunnel.report_at, now)

    def write(self, rows: list[tuple[Any, ...]]) -> None:
        """One transaction: the rows and this process's heartbeat (a worker thread)."""
        now = self._clock()
        started = time.perf_counter()
        with self.store.transaction() as db:
            db.execute(
                "INSERT INTO presence_relays (relay, started_at, updated_at) VALUES (?, ?, ?) "
                "ON CONFLICT (relay) DO UPDATE SET updated_at = excluded.updated_at",
                (self.relay_id, self.started_at, now),
            )
            db.execute("DELETE FROM presence_relays WHERE updated_at < ?", (now - RELAY_ROW_RETENTION,))
            # Each statement once for all its rows (a stop writes every tunnel's row at once).
            db.insert_rows(
                "presence", PRESENCE_COLUMNS, rows,
                "ON CONFLICT (tenant, name, relay) DO UPDATE SET online = excluded.online, "
                "connected_since = excluded.connected_since, last_seen = excluded.last_seen, "
                "remote = excluded.remote, keepalive_s = excluded.keepalive_s, report = excluded.report, "
                "report_at = excluded.report_at, updated_at = excluded.updated_at",
            )
            # An offline row is now the identity's latest word: older offline rows of other processes go.
            db.delete_rows("presence", "tenant = ? AND name = ? AND relay <> ? AND online = 0 AND last_seen <= ?",
                           [(row[0], row[1], self.relay_id, row[5]) for row in rows if not row[3]])
        self.rows_written += len(rows)
        self.flushes += 1
        self.write_seconds += time.perf_counter() - started

    async def flush(self) -> None:
        rows = self.collect()
        try:
            await RELAY_POOL.run(self.write, rows)
        except Exception as error:  # a full disk or a locked store: kept in memory, tried again
            log.error("presence not written (%s); trying again in %g s", error, PRESENCE_FLUSH_INTERVAL)
            self._requeue(rows)

    def _requeue(self, rows: list[tuple[Any, ...]]) -> None:
        for row in rows:
            key = (row[0], row[1])
            if key in self.live:
                self._dirty.add(key)
                self._written.pop(key, None)
            elif not row[3]:
                self._down.setdefault(key, row)

    async def run(self) -> None:
        """Flush every interval until cancelled; the last flush is ``close``'s."""
        while True:
            await asyncio.sleep(PRESENCE_FLUSH_INTERVAL)
            await self.flush()

    async def close(self) -> None:
        """At stop, after the relay closed its tunnels: everything it knows, written."""
        await self.flush()
