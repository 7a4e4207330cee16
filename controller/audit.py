"""The append-only audit log: every enrollment, issuance, revocation and tunnel decision.

Refusals of peers nobody authenticated (a bad enrollment token, a renewal by
a key nobody enrolled, a request body too large or not JSON on either
endpoint) are recorded too, through one budget per process
(``AnonymousBudget``, shared by every such event): an operator sees every
attempt of a real incident, and a flood of them cannot grow the store
without bound.

Refusals of an identity that did prove who it is (a denied bind or dial, a
tunnel or a renewal refused to a known identity) go through a budget of
that identity and event (``IdentityBudgets``): one gateway retrying in a
loop, or flooding frames it knows will be denied, costs a few rows a minute.
Past a budget, events are counted; the next row recorded for the same
budget carries the count as ``suppressed``.
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from controller.audit_chain import INDEXED_FIELDS, ChainedEvent, insert_chained_many, load_or_create_key
from controller.correlation import OTHER, new_id, scope_fields
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

#: Refusals recorded per minute (and as a burst) for one identity and one
#: event: a gateway that binds a few denied services at each reconnect, or an
#: operator's misconfigured dial retried by hand, has every refusal recorded;
#: a loop or a flood of one identity costs at most 28,800 rows a day per event.
IDENTITY_REFUSALS_PER_MINUTE = 20
#: Identities whose budgets one process tracks at once. The least recently
#: refused is forgotten first (its count goes to the log); 10,000 budgets are
#: about 2 MB, a whole fleet refused at once.
MAX_TRACKED_IDENTITIES = 10_000
#: Events budgeted per identity when the caller names the identity.
IDENTITY_BUDGETED_EVENTS = frozenset({"bind_denied", "dial_denied", "tunnel_refused", "renewal_refused",
                                      "report_refused", "management_refused", "link_refused"})

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
        "policy_updated",
        "policy_deleted",
        "policy_expired",
        "policy_refused",
        "grant_requested",
        "grant_approved",
        "grant_denied",
        "grant_expired",
        "grant_used",
        "grant_refused",
        "session_issued",
        "tunnel_connected",
        "tunnel_refused",
        "tunnel_closed",
        "bind_allowed",
        "bind_denied",
        "dial_requested",
        "dial_allowed",
        "dial_denied",
        "report_refused",
        "signin",
        "signin_refused",
        "signout",
        "admin_credential_refused",
        "management_refused",
        "dial_served",
        "dial_failed",
        "dial_closed",
        "dashboard_login",
        "dashboard_logout",
        "relay_added",
        "relay_enrolled",
        "relay_renewed",
        "relay_refused",
        "relay_retired",
        "relay_revoked",
        "link_connected",
        "link_closed",
        "link_refused",
    }
)
#: One audit event, before it is written: (event, fields).
Event = tuple[str, dict[str, Any]]


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


class IdentityBudgets:
    """One ``AnonymousBudget`` per (identity, event), the least recently used forgotten past a bound."""

    def __init__(self, per_minute: int = IDENTITY_REFUSALS_PER_MINUTE, capacity: int = MAX_TRACKED_IDENTITIES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._per_minute = per_minute
        self._capacity = capacity
        self._clock = clock
        self._budgets: collections.OrderedDict[tuple[str, str], AnonymousBudget] = collections.OrderedDict()

    def admit(self, identity: str, event: str) -> tuple[bool, int]:
        """(record this one?, how many were counted instead since the last recorded) for ``identity``'s ``event``."""
        key = (identity, event)
        budget = self._budgets.get(key)
        if budget is None:
            budget = self._budgets[key] = AnonymousBudget(self._per_minute, self._clock)
            while len(self._budgets) > self._capacity:
                (old_identity, old_event), old = self._budgets.popitem(last=False)
                if old.suppressed:
                    log.warning("audit: %d %s events of %s were counted and not recorded", old.suppressed,
                                old_event, old_identity)
        self._budgets.move_to_end(key)
        if not budget.take():
            if budget.suppressed == 1:
                log.warning("audit: %s of %s past %d a minute: counting, not recording", event, identity,
                            self._per_minute)
            return False, budget.suppressed
        suppressed, budget.suppressed = budget.suppressed, 0
        return True, suppressed


def _key_beside(store: Store) -> bytes:
    """An SQLite store's data directory holds the chain key; a database server's controller names its key."""
    from controller.store_sqlite import SQLiteStore

    if not isinstance(store, SQLiteStore):
        raise ValueError("an audit log on a database server needs the chain key of its data directory")
    return load_or_create_key(store.path.parent)


class AuditLog:
    """Writes and reads the ``audit`` table. Safe to call from several threads."""

    def __init__(self, store: Store, anonymous_budget: AnonymousBudget | None = None,
                 identity_budgets: IdentityBudgets | None = None, chain_key: bytes | None = None) -> None:
        self._store = store
        #: The hash chain's key (controller/audit_chain.py), kept in the data directory, never in the store.
        self.chain_key = chain_key if chain_key is not None else _key_beside(store)
        self.anonymous_budget = anonymous_budget or AnonymousBudget()
        self.identity_budgets = identity_budgets or IdentityBudgets()
        # The budgets are read and changed by the event loop and worker threads alike.
        self._budget_lock = threading.Lock()

    def record(self, event: str, **fields: Any) -> bool:
        """Append one event in its own transaction; ``fields`` must be JSON-serialisable.

        False when a budget only counted it (see ``record_in``): no transaction is opened then.
        """
        if not self._within_identity_budget(event, fields):
            return False
        with self._store.transaction() as db:
            self._insert(db, event, fields)
        return True

    def record_many(self, events: list[tuple[str, dict[str, Any]]]) -> int:
        """Append several events in one transaction, each within its budget; how many were recorded.

        The budgets are taken first, so a batch that is all counted opens no transaction at all.
        """
        return self.record_groups([[event] for event in events])

    def record_groups(self, groups: list[list[Event]]) -> int:
        """Append groups of events in one transaction, each group whole or not at all; how many events were recorded.

        A group is one attempt's story (a dial's request and its decision):
        past the budget of any of its events, the whole group is counted
        instead, so a flood of denied dials does not leave requests behind.
        """
        kept: list[Event] = []
        for group in groups:
            copied = [(event, dict(fields)) for event, fields in group]
            if all([self._within_identity_budget(event, fields) for event, fields in copied]):
                kept += copied
        if kept:
            with self._store.transaction() as db:
                insert_chained_many(db, self.chain_key, [self._chained(event, fields) for event, fields in kept])
        return len(kept)

    def record_anonymous(self, event: str, **fields: Any) -> bool:
        """Append an event no authenticated peer caused, within the budget; False when it was only counted.

        The first event recorded after some were suppressed carries their number as ``suppressed``.
        """
        budget = self.anonymous_budget
        with self._budget_lock:
            if not budget.take():
                if budget.suppressed == 1:
                    log.warning("audit: %s not recorded (more than %d a minute)", event, ANONYMOUS_EVENTS_PER_MINUTE)
                return False
            if budget.suppressed:
                fields["suppressed"] = budget.suppressed
            budget.suppressed = 0
        self.record(event, **fields)
        return True

    def record_in(self, db: Transaction, event: str, **fields: Any) -> bool:
        """Append one event inside a caller's transaction (commits or rolls back with it).

        A refusal of a named identity (``IDENTITY_BUDGETED_EVENTS`` with an
        ``identity`` field) past that identity's budget is counted instead of
        recorded, and False returned; the next one recorded says how many.
        """
        if not self._within_identity_budget(event, fields):
            return False
        self._insert(db, event, fields)
        return True

    def _within_identity_budget(self, event: str, fields: dict[str, Any]) -> bool:
        if event not in EVENTS:
            raise ValueError(f"unknown audit event {event!r}")
        identity = fields.get("identity")
        if event not in IDENTITY_BUDGETED_EVENTS or not isinstance(identity, str):
            return True
        with self._budget_lock:
            recorded, suppressed = self.identity_budgets.admit(identity, event)
        if recorded and suppressed:
            fields["suppressed"] = suppressed
        return recorded

    def _insert(self, db: Transaction, event: str, fields: dict[str, Any]) -> None:
        insert_chained_many(db, self.chain_key, [self._chained(event, fields)])

    def _chained(self, event: str, fields: dict[str, Any]) -> ChainedEvent:
        # The attempt's shared fields (its correlation id, a management request's actor) unless named here.
        fields = {**scope_fields(), **fields}
        if "correlation" not in fields:
            # Only when missing: each id is a getrandom call that lets go of the interpreter lock, and a
            # worker writing a stop's 10,000 rows beside the busy event loop waited for it back each time.
            fields["correlation"] = new_id(OTHER)
        columns = {name: value if isinstance(value := fields.get(name), str) else None for name in INDEXED_FIELDS}
        return time.time(), event, json.dumps(fields, sort_keys=True, default=str), columns

    def recent(self, limit: int = DEFAULT_AUDIT_PAGE) -> list[dict[str, Any]]:
        """The newest ``limit`` events, oldest first."""
        limit = max(1, min(limit, MAX_AUDIT_PAGE))
        rows = self._store.query("SELECT id, time, event, fields FROM audit ORDER BY id DESC LIMIT ?", (limit,))
        return [
            {"id": row["id"], "time": row["time"], "event": row["event"], "fields": json.loads(row["fields"])}
            for row in reversed(rows)
        ]
