"""The fleet view: every identity with its presence, merged from every controller process's rows.

Presence is one of ``online``, ``overdue`` (online, but nothing arrived for
``OVERDUE_KEEPALIVES`` of its keepalive intervals), ``offline`` (it was
connected once; ``last_seen`` says when) and ``never`` (never connected).
This process's own tunnels come from memory (the freshest word); every
other process's from the store, judged by its heartbeat.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from controller.presence import OVERDUE_KEEPALIVES, PRESENCE_STALE_AFTER, Key, PresenceBook, row_lag
from controller.registry import Identity
from controller.store import Store

PRESENCE_STATES = ("online", "overdue", "offline", "never")
#: The fields of a report that the fleet view shows, each under its own name.
REPORT_FIELDS = ("agent_version", "os", "arch", "link_profile", "rtt_ms", "clock_offset_s", "clock_source",
                 "key_backend", "next_renewal", "renewal_error")


@dataclass
class Sighting:
    """One process's word on one identity."""

    relay: str
    online: bool
    connected_since: float | None
    last_seen: float
    remote: str | None
    keepalive_s: float | None
    report: dict[str, Any] | None
    report_at: float | None
    own: bool


@dataclass(frozen=True)
class OwnView:
    """This process's word, taken on the event loop (cheap), so the rest may run in a worker thread."""

    relay_id: str
    live: dict[Key, Sighting]
    #: rows of tunnels that ended since the last batch
    ended: dict[Key, tuple[Any, ...]]


def own_view(book: PresenceBook) -> OwnView:
    """On the event loop: this process's live tunnels and those that ended, as they are now."""
    live = {key: Sighting(book.relay_id, True, tunnel.connected_since, tunnel.last_seen(), tunnel.remote,
                          tunnel.keepalive_s, tunnel.report, tunnel.report_at, True)
            for key, tunnel in book.live.items()}
    return OwnView(book.relay_id, live, {(r[0], r[1]): r[:len(COLUMNS)] for r in book.ended_unwritten()})


COLUMNS = ("tenant", "name", "relay", "online", "connected_since", "last_seen", "remote", "keepalive_s", "report",
           "report_at")


def sightings(store: Store, own: OwnView | None, now: float, only: Key | None = None) -> dict[Key, list[Sighting]]:
    """Every process's word on every identity it saw (one read of the store, then this process's own).

    ``only``: one identity's rows alone (``identity show``), by the primary key.
    """
    relay = own.relay_id if own is not None else None
    live = own.live if own is not None else {}
    ended = own.ended if own is not None else {}
    alive = {row["relay"] for row in store.query("SELECT relay FROM presence_relays WHERE updated_at >= ?",
                                                  (now - PRESENCE_STALE_AFTER,))}
    seen: dict[Key, list[Sighting]] = {}
    select = f"SELECT {', '.join(COLUMNS)} FROM presence"
    rows: list[tuple[Any, ...]] = [
        tuple(row[column] for column in COLUMNS)
        for row in (store.query(select) if only is None else store.query(select + " WHERE tenant = ? AND name = ?", only))
    ]
    # Our own rows of tunnels live or ended since the last batch: memory is fresher than the store.
    for row in [r for r in rows if not (r[2] == relay and ((r[0], r[1]) in live or (r[0], r[1]) in ended))] \
            + list(ended.values()):
        tenant, name, row_relay, is_online, since, last_seen, remote, keepalive, report_json, report_at = row
        mine = row_relay == relay
        online = bool(is_online) and row_relay in alive and not mine
        report = json.loads(report_json) if report_json else None
        seen.setdefault((tenant, name), []).append(Sighting(row_relay, online, since, last_seen, remote, keepalive,
                                                            report, report_at, mine))
    for key, sighting in live.items():
        seen.setdefault(key, []).append(sighting)
    return seen


def presence_of(identity: Identity, seen: list[Sighting], now: float) -> dict[str, Any]:
    """The fleet fields of one identity from every process's word on it."""
    entry: dict[str, Any] = {
        **identity.to_json(), "presence": "never", "connected_since": None, "last_seen": None, "relay": None,
        "remote": None, "keepalive_s": None, **dict.fromkeys(REPORT_FIELDS), "report_at": None,
        "cert_not_after": identity.cert_not_after,
    }
    if not seen:
        return entry
    online = [s for s in seen if s.online]
    primary = max(online, key=lambda s: s.connected_since or 0.0) if online else max(seen, key=lambda s: s.last_seen)
    reported = [s for s in seen if s.report is not None]
    report_from = primary if primary.report is not None else (
        max(reported, key=lambda s: s.report_at or 0.0) if reported else None)
    last_seen = max(s.last_seen for s in seen)
    presence = "offline"
    if online:
        presence = "online"
        keepalive = primary.keepalive_s
        if keepalive and now - primary.last_seen > OVERDUE_KEEPALIVES * keepalive + row_lag(primary.own):
            presence = "overdue"
    entry.update(presence=presence, connected_since=primary.connected_since if online else None,
                 last_seen=last_seen, relay=primary.relay, remote=primary.remote, keepalive_s=primary.keepalive_s)
    if report_from is not None and report_from.report is not None:
        entry.update({k: report_from.report.get(k) for k in REPORT_FIELDS}, report_at=report_from.report_at)
        if entry["cert_not_after"] is None:
            entry["cert_not_after"] = report_from.report.get("cert_not_after")
    return entry


@dataclass(frozen=True)
class FleetFilter:
    """What ``identity list`` narrows the fleet to; every field None means everything."""

    presence: frozenset[str] | None = None
    #: certificates that expire within this many seconds from now (or have expired)
    expiring_within: float | None = None
    tenant: str | None = None
    role: str | None = None

    def keeps(self, entry: dict[str, Any], now: float) -> bool:
        if self.presence is not None and entry["presence"] not in self.presence:
            return False
        if self.tenant is not None and entry["tenant"] != self.tenant:
            return False
        if self.role is not None and self.role not in entry["roles"]:
            return False
        if self.expiring_within is not None:
            not_after = entry["cert_not_after"]
            if not_after is None or not_after > now + self.expiring_within:
                return False
        return True


def fleet(store: Store, identities: list[Identity], own: PresenceBook | OwnView | None,
          keep: FleetFilter = FleetFilter(), now: float | None = None) -> list[dict[str, Any]]:
    """The fleet view of ``identities``, in their order, narrowed by ``keep``.

    With a ``PresenceBook`` call it on the event loop; with an ``OwnView``
    (``own_view`` on the loop) from any thread.
    """
    now = time.time() if now is None else now
    only = (identities[0].tenant, identities[0].name) if len(identities) == 1 else None
    seen = sightings(store, own_view(own) if isinstance(own, PresenceBook) else own, now, only)
    entries = (presence_of(identity, seen.get((identity.tenant, identity.name), []), now) for identity in identities)
    return [entry for entry in entries if keep.keeps(entry, now)]
