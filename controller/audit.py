"""The append-only audit log: every enrollment, issuance, revocation and tunnel decision.

Events refused before anyone authenticated (a bad enrollment token) go to the
process log, not here: an anonymous peer must not be able to grow the store.
"""

from __future__ import annotations

import json
import time
from typing import Any

from controller.store import Store, Transaction

#: `GET /api/v1/audit` returns at most this many events at once, so one
#: request cannot make the controller serialise the whole history.
MAX_AUDIT_PAGE = 1000
DEFAULT_AUDIT_PAGE = 100

EVENTS = frozenset(
    {
        "enrollment",
        "token_created",
        "identity_created",
        "identity_revoked",
        "identity_disabled",
        "identity_enabled",
        "renewal",
        "recovery",
        "renewal_refused",
        "service_created",
        "policy_created",
        "session_issued",
        "tunnel_connected",
        "tunnel_refused",
        "tunnel_closed",
        "bind_allowed",
        "bind_denied",
        "dial_allowed",
        "dial_denied",
    }
)


class AuditLog:
    """Writes and reads the ``audit`` table."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def record(self, event: str, **fields: Any) -> None:
        """Append one event in its own transaction; ``fields`` must be JSON-serialisable."""
        with self._store.transaction() as db:
            self.record_in(db, event, **fields)

    def record_in(self, db: Transaction, event: str, **fields: Any) -> None:
        """Append one event inside a caller's transaction (commits or rolls back with it)."""
        if event not in EVENTS:
            raise ValueError(f"unknown audit event {event!r}")
        db.execute(
            "INSERT INTO audit (time, event, fields) VALUES (?, ?, ?)",
            (time.time(), event, json.dumps(fields, sort_keys=True, default=str)),
        )

    def recent(self, limit: int = DEFAULT_AUDIT_PAGE) -> list[dict[str, Any]]:
        """The newest ``limit`` events, oldest first."""
        limit = max(1, min(limit, MAX_AUDIT_PAGE))
        rows = self._store.query("SELECT id, time, event, fields FROM audit ORDER BY id DESC LIMIT ?", (limit,))
        return [
            {"id": row["id"], "time": row["time"], "event": row["event"], "fields": json.loads(row["fields"])}
            for row in reversed(rows)
        ]
