"""Connection records: one row per dial (connection id), built from the dial's audit events.

Why from the audit events and not a table of its own: the audit trail is the
one record that is tamper-evident (controller/audit_chain.py), and a dial
already writes its story there (controller/relay/records.py); a second copy
would cost a store write per dial on the data path and could be edited
without the chain noticing. The decision row is indexed by identity, service
and event, so the newest page of one identity's dials is one index range,
and the rest of each story is found by its correlation id (indexed too).
"""

from __future__ import annotations

from typing import Any

from controller.audit_query import AuditFilter, event_json
from controller.store import Store

DECISIONS = ("dial_allowed", "dial_denied")
#: Correlation ids looked up per statement: well under every store's limit of parameters.
IDS_PER_QUERY = 500


def connections_page(store: Store, where: AuditFilter) -> dict[str, Any]:
    """The newest ``where.limit`` connections (newest first) and the cursor of the next older page."""
    clause, values = where.where(("dial_denied",) if where.denied else DECISIONS)
    rows = store.query(f"SELECT id, time, event, fields FROM audit{clause} ORDER BY id DESC LIMIT ?",
                       (*values, where.limit + 1))
    decisions, more = rows[:where.limit], len(rows) > where.limit
    decided = [event_json(row) for row in decisions]
    # A dial recorded before connection ids existed is its decision alone.
    ids = [str(event["fields"].get("correlation") or f"#{event['id']}") for event in decided]
    stories: dict[str, list[dict[str, Any]]] = {cid: [event] for cid, event in zip(ids, decided, strict=True)}
    known = [cid for cid in ids if not cid.startswith("#")]
    for cid in known:
        stories[cid] = []
    for start in range(0, len(known), IDS_PER_QUERY):
        chunk = known[start:start + IDS_PER_QUERY]
        rows = store.query("SELECT id, time, event, fields FROM audit WHERE correlation IN "
                           f"({', '.join('?' for _ in chunk)}) ORDER BY id", tuple(chunk))
        for row in rows:
            event = event_json(row)
            stories[event["fields"]["correlation"]].append(event)
    records = [connection_record(cid, stories[cid], event["id"]) for cid, event in zip(ids, decided, strict=True)]
    return {"connections": records, "next_before": decided[-1]["id"] if more else None}


def connection_record(cid: str, story: list[dict[str, Any]], cursor: int) -> dict[str, Any]:
    """What one connection id's events say: who reached what, when, through which policy, how long, how many bytes."""
    record: dict[str, Any] = {"id": cid, "cursor": cursor, "outcome": "open", "identity": None, "service": None,
                              "requested_at": None, "remote": None, "relay": None, "policy": None, "reason": None,
                              "gateway": None, "served_at": None, "closed_at": None, "bytes_up": None,
                              "bytes_down": None, "duration_s": None, "closed_by": None}
    for event in story:
        fields, name = event["fields"], event["event"]
        record["identity"] = record["identity"] or fields.get("identity")
        record["service"] = record["service"] or fields.get("service")
        if name == "dial_requested":
            record.update(requested_at=event["time"], remote=fields.get("remote"), relay=fields.get("relay"))
        elif name in DECISIONS:
            record.update(policy=fields.get("policy"), reason=fields.get("reason"))
            record["requested_at"] = record["requested_at"] or event["time"]
            if name == "dial_denied":
                record["outcome"] = "denied"
        elif name == "dial_served":
            record.update(gateway=fields.get("gateway"), served_at=event["time"], relay=fields.get("relay"))
        elif name == "dial_failed":
            record.update(outcome="failed", reason=fields.get("reason"), closed_at=event["time"])
        elif name == "dial_closed":
            record.update(outcome="closed", closed_at=event["time"], bytes_up=fields.get("bytes_up"),
                          bytes_down=fields.get("bytes_down"), duration_s=fields.get("duration_s"),
                          closed_by=fields.get("closed_by"), close_reason=fields.get("reason"))
    return record
