"""Reading the audit trail: filters, paging past the newest page, and the events after a cursor (follow).

The filters are the indexed columns the log writes beside each event's
fields (controller/store_schema.py ADDED_INDEXES), in SQL every store speaks.
A query parameter this module does not know is an error, never ignored: a
SIEM's typo must not silently widen what it ships.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from controller.audit import DEFAULT_AUDIT_PAGE, MAX_AUDIT_PAGE
from controller.errors import bad_request
from controller.names import DEFAULT_TENANT, check_name
from controller.store import Parameters, Store
from shared.since import InvalidSince
from shared.since import parse_since as parse_time

#: The largest id or count a query takes: the stores' 64-bit integers.
MAX_ID = 2**63 - 1
#: Events that refuse something: what ``--denied`` shows.
REFUSAL_EVENTS = ("dial_denied", "bind_denied", "tunnel_refused", "renewal_refused", "enrollment_refused")


@dataclass(frozen=True)
class AuditFilter:
    identity: str | None = None
    service: str | None = None
    correlation: str | None = None
    since: float | None = None
    denied: bool = False
    before: int | None = None
    after: int | None = None
    limit: int = DEFAULT_AUDIT_PAGE

    def where(self, events: tuple[str, ...] | None = None) -> tuple[str, Parameters]:
        """The WHERE clause (and its parameters) selecting these events, narrowed to ``events`` if given."""
        clauses: list[str] = []
        values: list[object] = []
        for column, value in (("identity", self.identity), ("service", self.service),
                              ("correlation", self.correlation)):
            if value is not None:
                clauses.append(f"{column} = ?")
                values.append(value)
        if self.since is not None:
            clauses.append("time >= ?")
            values.append(self.since)
        if self.before is not None:
            clauses.append("id < ?")
            values.append(self.before)
        if self.after is not None:
            clauses.append("id > ?")
            values.append(self.after)
        if events is not None:
            clauses.append(f"event IN ({', '.join('?' for _ in events)})")
            values += events
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", tuple(values)


def parse_since(text: str, now: float | None = None) -> float:
    """A unix time from ``since`` (shared/since.py); a value that is not one is a 400."""
    try:
        return parse_time(text, now)
    except InvalidSince as error:
        raise bad_request(error.code, error.message) from None


def _name(value: str, what: str) -> str:
    """``tenant/name`` of a NAME (the default tenant) or TENANT/NAME, as events write it."""
    tenant, _, name = value.rpartition("/")
    return f"{check_name(tenant or DEFAULT_TENANT, 'tenant')}/{check_name(name, what)}"


def _whole(query: Mapping[str, str], key: str, minimum: int = 0) -> int | None:
    raw = query.get(key)
    if raw is None:
        return None
    if not raw.isdigit() or not minimum <= int(raw) <= MAX_ID:
        raise bad_request(f"invalid_{key}", f"The {key} must be a whole number from {minimum} to {MAX_ID}.")
    return int(raw)


def _flag(query: Mapping[str, str], key: str) -> bool:
    raw = query.get(key, "false").lower()
    if raw not in ("true", "false", "1", "0"):
        raise bad_request(f"invalid_{key}", f"The {key} parameter must be true or false.")
    return raw in ("true", "1")


def parse_filter(query: Mapping[str, str], allowed: frozenset[str]) -> AuditFilter:
    """An AuditFilter from a request's query; a parameter not in ``allowed``, or a bad value, is a 400."""
    unknown = sorted(set(query) - allowed)
    if unknown:
        raise bad_request("unknown_parameter", f"Unknown query parameter {unknown[0][:40]!r}; this endpoint "
                          f"takes {', '.join(sorted(allowed))}.")
    limit = _whole(query, "limit", 1)
    correlation = query.get("correlation")
    if correlation is not None and not re.fullmatch(r"[a-z]-[0-9a-f]{1,32}", correlation):
        raise bad_request("invalid_correlation", "The correlation id looks like c-0123456789abcdef; copy it from "
                          "an event.")
    return AuditFilter(
        identity=_name(query["identity"], "identity name") if "identity" in query else None,
        service=_name(query["service"], "service name") if "service" in query else None,
        correlation=correlation,
        since=parse_since(query["since"]) if "since" in query else None,
        denied=_flag(query, "denied"),
        before=_whole(query, "before", 1),
        after=_whole(query, "after"),
        limit=min(limit or DEFAULT_AUDIT_PAGE, MAX_AUDIT_PAGE),
    )


def event_json(row: Any) -> dict[str, Any]:
    """One audit row (a store row: id, time, event, fields) as the API shows it."""
    return {"id": row["id"], "time": row["time"], "event": row["event"], "fields": json.loads(row["fields"])}


def audit_page(store: Store, where: AuditFilter) -> dict[str, Any]:
    """One page of events, oldest first: the newest ones before ``before``, or the oldest ones after ``after``.

    ``next_before`` is the cursor of the page older than this one (None when there is none).
    """
    clause, values = where.where(REFUSAL_EVENTS if where.denied else None)
    order = "ASC" if where.after is not None else "DESC"
    # Read before the page: every event up to it is committed, so the page's query sees them all.
    newest = newest_id(store)
    # One more than the page: whether an older page exists, without a second query.
    rows = store.query(f"SELECT id, time, event, fields FROM audit{clause} ORDER BY id {order} LIMIT ?",
                       (*values, where.limit + 1))
    more = len(rows) > where.limit
    events = [event_json(row) for row in rows[:where.limit]]
    if order == "DESC":
        events.reverse()
    return {
        "events": events,
        "next_before": events[0]["id"] if more and order == "DESC" else None,
        "last_id": _cursor(where, events, more, newest),
    }


def _cursor(where: AuditFilter, events: list[dict[str, Any]], more: bool, newest: int) -> int:
    """Where a follower goes on from: past the events this page's filters skipped too, so it waits for new ones."""
    shown = events[-1]["id"] if events else 0
    if where.after is not None:
        return shown if more else max(newest, where.after, shown)
    if where.before is not None:
        return shown or where.before - 1
    return max(newest, shown)


def any_after(store: Store, where: AuditFilter) -> bool:
    """Whether an event matching ``where`` lies after its ``after`` cursor (one indexed read)."""
    clause, values = where.where(REFUSAL_EVENTS if where.denied else None)
    return store.query_one(f"SELECT id FROM audit{clause} ORDER BY id LIMIT 1", values) is not None


def newest_id(store: Store) -> int:
    row = store.query_one("SELECT MAX(id) AS id FROM audit")
    return int(row["id"]) if row is not None and row["id"] is not None else 0
