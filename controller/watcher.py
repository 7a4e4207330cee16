"""Status changes made by any controller process reach this process's relay.

The store is the source of truth. Every revoke, disable or enable, and every
re-enrollment with a new key (``rekeyed``), appends a row to
``status_changes`` (see registry.py); each process polls that table by its
increasing ``seq`` and hands the identities that became revoked or disabled,
or hold a new key, to the registry's listeners, so every relay process
closes their tunnels (for a new key: those on any other key), not only the
one that took the request.

On SQLite the poll runs every half second. On PostgreSQL each commit of such
a row wakes the watcher at once (``LISTEN/NOTIFY``, controller/store_postgres.py)
and the poll runs then, with a slow poll beside it in case a notification
was lost with a connection. The query runs in a worker thread (a database
on the network must not stall the event loop, least of all while it is
down); the listeners are called on the event loop, as before.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from typing import TYPE_CHECKING

from controller.registry import BLOCKED_STATUSES, CHANGE_REKEYED, Identity, Registry
from controller.store import Store, StoreUnavailable

if TYPE_CHECKING:
    from controller.policy import PolicyEngine

#: The ``status_changes`` kind of a policy's change (controller/policy.py CHANGE_POLICY; the row's name is its id).
CHANGE_POLICY = "policy"

log = logging.getLogger(__name__)

#: How often each process looks for changes. Revocation and re-enrollment must close tunnels
#: everywhere within 2 s; half a second leaves room for a slow poll and the
#: close itself, and one indexed query twice a second costs nothing.
POLL_INTERVAL_SECONDS = 0.5
#: On a store that notifies, the poll that runs even when no notification came:
#: notifications arrive within milliseconds, so this only bounds what a lost
#: one (a listening connection that broke) can delay; five seconds is cheap.
NOTIFIED_POLL_INTERVAL_SECONDS = 5.0
#: Changes handled per poll; a burst (a whole site disabled) drains over a few polls.
MAX_CHANGES_PER_POLL = 500


class StatusWatcher:
    """Polls ``status_changes`` from where it started; announces blocked and re-keyed identities."""

    def __init__(self, store: Store, registry: Registry, interval: float | None = None, *,
                 policies: PolicyEngine | None = None) -> None:
        self._store = store
        self._registry = registry
        #: Told the id of each policy changed in any process: the relay re-decides the dials it allowed.
        self._policies = policies
        self._changed_policies: list[int] = []
        if interval is None:
            interval = NOTIFIED_POLL_INTERVAL_SECONDS if store.notifies else POLL_INTERVAL_SECONDS
        self.interval = interval
        # Changes from before this process started concern tunnels it never held.
        row = store.query_one("SELECT COALESCE(MAX(seq), 0) AS seq FROM status_changes")
        self.last_seq: int = int(row["seq"]) if row else 0

    def poll_once(self) -> list[Identity]:
        """Announce every change since the last poll; returns the identities announced."""
        return self.announce(self.fetch())

    def fetch(self) -> list[tuple[str, Identity]]:
        """(change, identity as it is now) for every change since the last fetch that must close tunnels.

        Only reads the store: safe in a worker thread.
        """
        rows = self._store.query(
            "SELECT seq, tenant, name, status FROM status_changes WHERE seq > ? ORDER BY seq LIMIT ?",
            (self.last_seq, MAX_CHANGES_PER_POLL),
        )
        changes: list[tuple[str, Identity]] = []
        for row in rows:
            self.last_seq = int(row["seq"])
            if row["status"] == CHANGE_POLICY and str(row["name"]).isdigit():
                self._changed_policies.append(int(row["name"]))
                continue
            if row["status"] not in BLOCKED_STATUSES and row["status"] != CHANGE_REKEYED:
                continue
            # The row says what happened; the registry says what holds now (enabled since? which key?).
            identity = self._registry.get_identity(row["tenant"], row["name"])
            if identity is None:
                continue
            if row["status"] == CHANGE_REKEYED or identity.status in BLOCKED_STATUSES:
                changes.append((row["status"], identity))
        return changes

    def announce(self, changes: list[tuple[str, Identity]]) -> list[Identity]:
        """Hand fetched changes to the registry's listeners (on the event loop); the identities announced."""
        changed, self._changed_policies = self._changed_policies, []
        if self._policies is not None:
            for policy_id in dict.fromkeys(changed):
                self._policies.announce_changed(policy_id)
        for change, identity in changes:
            if change == CHANGE_REKEYED:
                self._registry.announce_rekeyed(identity)
            else:
                self._registry.announce_blocked(identity)
        return [identity for _, identity in changes]

    async def run(self) -> None:
        """Poll until cancelled; a failing poll (store busy or away) is logged and retried."""
        loop = asyncio.get_running_loop()
        # One thread of its own: one store connection for the watcher, whichever thread would be free.
        worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="outpost-watcher")
        try:
            await self._watch(loop, worker)
        finally:
            # A fetch still reading the store ends before whoever cancelled us may close the store.
            await asyncio.shield(asyncio.to_thread(worker.shutdown, True))

    async def _watch(self, loop: asyncio.AbstractEventLoop, worker: concurrent.futures.Executor) -> None:
        while True:
            # On PostgreSQL the first wait starts listening and returns: the poll after it misses nothing.
            await self._store.wait_for_changes(self.interval)
            try:
                self.announce(await loop.run_in_executor(worker, self.fetch))
            except StoreUnavailable:
                pass  # said once by the store; the next poll tries again
            except Exception:
                log.exception("status watcher poll failed; retrying")
