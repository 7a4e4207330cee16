"""Status changes made by any controller process reach this process's relay.

The store is the source of truth. Every revoke, disable or enable, and every
re-enrollment with a new key (``rekeyed``), appends a row to
``status_changes`` (see registry.py); each process polls that table by its
increasing ``seq`` and hands the identities that became revoked or disabled,
or hold a new key, to the registry's listeners, so every relay process
closes their tunnels (for a new key: those on any other key), not only the
one that took the request.
"""

from __future__ import annotations

import asyncio
import logging

from controller.registry import BLOCKED_STATUSES, CHANGE_REKEYED, Identity, Registry
from controller.store import Store

log = logging.getLogger(__name__)

#: How often each process looks for changes. Revocation and re-enrollment must close tunnels
#: everywhere within 2 s; half a second leaves room for a slow poll and the
#: close itself, and one indexed query twice a second costs nothing.
POLL_INTERVAL_SECONDS = 0.5
#: Changes handled per poll; a burst (a whole site disabled) drains over a few polls.
MAX_CHANGES_PER_POLL = 500


class StatusWatcher:
    """Polls ``status_changes`` from where it started; announces blocked and re-keyed identities."""

    def __init__(self, store: Store, registry: Registry, interval: float = POLL_INTERVAL_SECONDS) -> None:
        self._store = store
        self._registry = registry
        self.interval = interval
        # Changes from before this process started concern tunnels it never held.
        row = store.query_one("SELECT COALESCE(MAX(seq), 0) AS seq FROM status_changes")
        self.last_seq: int = int(row["seq"]) if row else 0

    def poll_once(self) -> list[Identity]:
        """Announce every change since the last poll; returns the identities announced."""
        rows = self._store.query(
            "SELECT seq, tenant, name, status FROM status_changes WHERE seq > ? ORDER BY seq LIMIT ?",
            (self.last_seq, MAX_CHANGES_PER_POLL),
        )
        announced: list[Identity] = []
        for row in rows:
            self.last_seq = int(row["seq"])
            if row["status"] not in BLOCKED_STATUSES and row["status"] != CHANGE_REKEYED:
                continue
            # The row says what happened; the registry says what holds now (enabled since? which key?).
            identity = self._registry.get_identity(row["tenant"], row["name"])
            if identity is None:
                continue
            if row["status"] == CHANGE_REKEYED:
                self._registry.announce_rekeyed(identity)
            elif identity.status in BLOCKED_STATUSES:
                self._registry.announce_blocked(identity)
            else:
                continue
            announced.append(identity)
        return announced

    async def run(self) -> None:
        """Poll until cancelled; a failing poll (store busy) is logged and retried."""
        while True:
            try:
                self.poll_once()
            except Exception:
                log.exception("status watcher poll failed; retrying")
            await asyncio.sleep(self.interval)
