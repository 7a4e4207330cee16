"""The append-only audit log: every enrollment, issuance, revocation and tunnel decision.

Refusals of peers nobody authenticated (a bad enrollment token, a renewal by
a key nobody enrolled, a request body too large or not JSON on either
endpoint) are recorded too, through one budget per process
(``AnonymousBudget``, shared by every such event): an operator sees every
attempt of a real incident, and a flood of them cannot grow the store
without bound.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Callable

from controller.store import Store, Transaction

log = logging.getLogger(__name__)

#: `GET /api/v1/audit` returns at most this many events at once, so one
#: request cannot make the controller serialise the whole history.
MAX_AUDIT_PAGE = 1000
DEFAULT_AUDIT_PAGE = 100
#: Anonymous refusals recorded per minute by one controller process (and as a
#: burst): far above a fleet's real mistakes (a technician retrying a used
#: token), and at most 86,400 small rows a day when someone floods the
#: enrollment and renewal endpoints. Past it they are counted and the count
#: is recorded with the next one.
ANONYMOUS_EVENTS_PER_MINUTE = 60

EVENTS = frozenset(
    {
        "enrollment",
        "enrollment_refused",
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


class AnonymousBudget:
    """A token bucket: ``per_minute`` events a minute, refilled continuously, at most that many at once."""

    def __init__(self, per_minute: int = ANONYMOUS_EVENTS_PER_MINUTE, clock: Callable[[], float] = time.monotonic) -> None:
        self._per_minute = per_minute
        self._clock = clock
        self._tokens = float(per_minute)
        self._last = clock()
        #: Events refused a row since the last one recorded.
        self.suppressed = 0

    def take(self) -> bool:
        now = self._clock()
        self._tokens = min(float(self._per_minute), self._tokens + (now - self._last) * self._per_minute / 60.0)
        self._last = now
        if self._tokens < 1.0:
            self.suppressed += 1
            return False
        self._tokens -= 1.0
        return True


class AuditLog:
    """Writes and reads the ``audit`` table."""

    def __init__(self, store: Store, anonymous_budget: AnonymousBudget | None = None) -> None:
        self._store = store
        self.anonymous_budget = anonymous_budget or AnonymousBudget()

    def record(self, event: str, **fields: Any) -> None:
        """Append one event in its own transaction; ``fields`` must be JSON-serialisable."""
        with self._store.transaction() as db:
            self.record_in(db, event, **fields)

    def record_anonymous(self, event: str, **fields: Any) -> bool:
        """Append an event no authenticated peer caused, within the budget; False when it was only counted.

        The first event recorded after some were suppressed carries their number as ``suppressed``.
        """
        budget = self.anonymous_budget
        if not budget.take():
            log.warning("audit: %s not recorded (more than %d a minute)", event, ANONYMOUS_EVENTS_PER_MINUTE)
            return False
        if budget.suppressed:
            fields["suppressed"] = budget.suppressed
        self.record(event, **fields)
        budget.suppressed = 0
        return True

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
