"""Which relay hosts which service: ``(tenant, service) -> relay``, for dials that arrive at another relay.

Each relay process (``serve --role relay``) publishes the services its
tunnels bind, with the gateway binding each, in the store's
``relay_services`` table: a batch of what changed, every
``DIRECTORY_FLUSH_INTERVAL``, and its own rows removed when it stops. A relay
that died leaves rows behind; readers ignore them, since only relays whose
heartbeat in the ``relays`` table is fresh (``RELAY_STALE_AFTER``) count.
A relay restarting under the same name replaces its rows at its first batch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from controller.blocking import RELAY_POOL
from controller.relay.broker import Broker, ServiceKey
from controller.relays import ACTIVE, RELAY_STALE_AFTER
from controller.store import Store

log = logging.getLogger(__name__)

#: Seconds between two batches of this relay's binds. A dial at another relay
#: finds a service this long after its gateway bound it at most; a batch is
#: written only when something changed, so an idle fleet costs no writes.
#: Presence's 30 s (controller/presence.py) would leave a freshly bound
#: service unreachable from other relays for half a minute.
DIRECTORY_FLUSH_INTERVAL = 1.0

#: (tenant, service, gateway as ``tenant/name``)
Binding = tuple[str, str, str]


@dataclass(frozen=True)
class RemoteHost:
    """A relay that hosts a service now: its name and address, and the gateway binding it there."""

    relay: str
    address: str
    gateway: str


class ServiceDirectory:
    """This relay's binds as published in the store, and the lookup of other relays' binds."""

    def __init__(self, store: Store, relay_name: str, broker: Broker, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.relay_name = relay_name
        self.broker = broker
        self._clock = clock
        #: What the store holds for this relay; None until the first batch replaced what a previous run left.
        self._written: set[Binding] | None = None
        self.batches = 0

    def write(self, current: set[Binding]) -> None:
        """One transaction with what changed since the last batch (a worker thread)."""
        now = self._clock()
        with self.store.transaction() as db:
            if self._written is None:
                db.execute("DELETE FROM relay_services WHERE relay = ?", (self.relay_name,))
                gone, added = set(), current
            else:
                gone, added = self._written - current, current - self._written
            for tenant, service, gateway in gone:
                db.execute("DELETE FROM relay_services WHERE tenant = ? AND service = ? AND relay = ? AND gateway = ?",
                           (tenant, service, self.relay_name, gateway))
            for tenant, service, gateway in added:
                db.execute("INSERT INTO relay_services (tenant, service, relay, gateway, updated_at) "
                           "VALUES (?, ?, ?, ?, ?) ON CONFLICT (tenant, service, relay, gateway) "
                           "DO UPDATE SET updated_at = excluded.updated_at",
                           (tenant, service, self.relay_name, gateway, now))
        self._written = set(current)
        self.batches += 1

    async def flush(self) -> None:
        current = self.broker.bound_pairs()
        if current == self._written:
            return
        try:
            await RELAY_POOL.run(self.write, current)
        except Exception as error:  # the store away: the next batch writes the whole difference
            log.warning("bound services not published (%s); trying again in %g s", error, DIRECTORY_FLUSH_INTERVAL)

    async def run(self) -> None:
        """Publish every interval until cancelled; ``close`` removes this relay's rows."""
        while True:
            await self.flush()
            await asyncio.sleep(DIRECTORY_FLUSH_INTERVAL)

    def remove_all(self) -> None:
        with self.store.transaction() as db:
            db.execute("DELETE FROM relay_services WHERE relay = ?", (self.relay_name,))
        self._written = set()

    async def close(self) -> None:
        try:
            await RELAY_POOL.run(self.remove_all)
        except Exception as error:  # readers ignore a stopped relay's rows by its heartbeat anyway
            log.warning("bound services not withdrawn at stop (%s)", error)

    def hosts(self, key: ServiceKey) -> list[RemoteHost]:
        """The live relays other than this one where ``key`` is bound, each gateway once (a worker thread)."""
        rows = self.store.query(
            "SELECT s.relay, r.address, s.gateway FROM relay_services s JOIN relays r ON r.name = s.relay "
            "WHERE s.tenant = ? AND s.service = ? AND s.relay <> ? AND r.status = ? AND r.heartbeat_at >= ? "
            "ORDER BY s.updated_at, s.relay, s.gateway",
            (key[0], key[1], self.relay_name, ACTIVE, self._clock() - RELAY_STALE_AFTER))
        return [RemoteHost(str(row["relay"]), str(row["address"]), str(row["gateway"])) for row in rows]
