"""How many decisions each policy made and when it last allowed something, counted in memory, written in batches.

A decision runs in a relay worker thread for every dial and bind; a store
write for each would put an fsync on every connection. The counts are kept
here under a lock and added to the policy rows every few seconds in one
transaction (and once more at shutdown), so ``policy list`` is at most one
interval behind, and a crash loses at most one interval of counts, never a decision.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable

from controller.blocking import API_POOL
from controller.store import Store, StoreUnavailable

log = logging.getLogger(__name__)

#: How often the counts reach the store: often enough that ``policy list``
#: reads as current to a person, rarely enough to cost one small
#: transaction per interval however many dials there are.
FLUSH_INTERVAL_SECONDS = 5.0


class PolicyCounters:
    """Decisions per policy id since the last flush, and the latest time each allowed one."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._lock = threading.Lock()
        self._pending: dict[int, tuple[int, float | None]] = {}

    def count(self, policy_id: int, allowed_at: float | None) -> None:
        """One decision made by ``policy_id`` (any thread); ``allowed_at`` when it allowed."""
        with self._lock:
            count, last = self._pending.get(policy_id, (0, None))
            if allowed_at is not None and (last is None or allowed_at > last):
                last = allowed_at
            self._pending[policy_id] = (count + 1, last)

    def pending(self, policy_id: int) -> tuple[int, float | None]:
        """What is counted for ``policy_id`` but not written yet."""
        with self._lock:
            return self._pending.get(policy_id, (0, None))

    def flush(self) -> int:
        """Add the counts to the store in one transaction (a worker thread); how many policies were updated.

        On a failure the counts are put back, to be tried at the next flush.
        """
        with self._lock:
            batch, self._pending = self._pending, {}
        if not batch:
            return 0
        try:
            with self._store.transaction() as db:
                for policy_id, (count, last) in sorted(batch.items()):
                    # A deleted policy's row is gone: its counts go with it.
                    if last is None:
                        db.execute("UPDATE policies SET decisions = COALESCE(decisions, 0) + ? WHERE id = ?",
                                   (count, policy_id))
                    else:
                        db.execute(
                            "UPDATE policies SET decisions = COALESCE(decisions, 0) + ?, last_allowed_at = CASE "
                            "WHEN last_allowed_at IS NULL OR last_allowed_at < ? THEN ? ELSE last_allowed_at END "
                            "WHERE id = ?",
                            (count, last, last, policy_id),
                        )
        except Exception:
            with self._lock:
                for policy_id, (count, last) in batch.items():
                    self._pending[policy_id] = _merge(self._pending.get(policy_id, (0, None)), (count, last))
            raise
        return len(batch)

    async def run(self, interval: float = FLUSH_INTERVAL_SECONDS, chores: tuple[Callable[[], object], ...] = ()
                  ) -> None:
        """Flush every ``interval`` until cancelled, with ``chores`` (the expiries' audit) in the same worker job.

        A failing flush is retried at the next one.
        """
        while True:
            await asyncio.sleep(interval)
            try:
                await API_POOL.run(self._flush_and, chores)
            except StoreUnavailable:
                pass  # said once by the store; the counts wait for the next flush
            except Exception:
                log.exception("writing the policies' decision counts failed; retrying")


    def _flush_and(self, chores: tuple[Callable[[], object], ...]) -> None:
        self.flush()
        for chore in chores:
            chore()


def _merge(a: tuple[int, float | None], b: tuple[int, float | None]) -> tuple[int, float | None]:
    lasts = [t for t in (a[1], b[1]) if t is not None]
    return a[0] + b[0], max(lasts) if lasts else None
