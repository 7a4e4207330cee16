"""The controller's Prometheus metrics: what is computed from where, with bounded label sets.

Gauges are read at scrape time (presence from the fleet view, this process's
tunnels, certificates expiring, unauthenticated connections held, event-loop
lag). Counters of decisions, enrollments, renewals, recoveries, refusals and
revocations come from the audit trail, which every decision is recorded in:
each scrape reads the rows added since the last one, so the counters cannot
disagree with the audit, and no code path outside this module counts. They
count every process's events on a shared store from this process's start
(a counter that restarts at 0 is what Prometheus expects of a restart).

Labels never name an identity: a tenant, a presence state, a result and a
reason code from a fixed list (``REASONS``, else ``other``).
"""

from __future__ import annotations

import asyncio
import collections
import json
import re
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from controller.fleet import PRESENCE_STATES, OwnView, fleet, own_view
from controller.relay import reports as relay_reports

if TYPE_CHECKING:
    from controller.context import ControllerContext
    from controller.listener import Listener
    from controller.presence import PresenceBook

#: Audit rows one scrape reads at most: a scrape after a flood (or the first
#: after a long pause) stays a bounded query; the rest is read by the next.
MAX_AUDIT_ROWS_PER_SCRAPE = 50_000
#: How often the event-loop probe wakes: a lag shorter than this apart from
#: its neighbours is still seen (the maximum over the scrape interval is kept).
LOOP_PROBE_INTERVAL = 0.5
#: The certificate windows ops alert on: a day (act now), a week (plan).
EXPIRY_WINDOWS = (("24h", 86400.0), ("7d", 7 * 86400.0))
#: Reason codes a refusal is counted under, by a phrase of its sentence; the
#: enrollment and renewal refusals already carry a code (``token_expired``).
REASONS = (
    ("no policy", "no_policy"), ("no service named", "unknown_service"), ("revoked", "revoked"),
    ("disabled", "disabled"), ("expired", "expired"), ("signature", "bad_signature"),
    ("not issued by", "unknown_ca"), ("replaced by re-enrollment", "old_key"), ("tenant", "other_tenant"),
    ("unknown", "unknown_identity"), ("not valid", "not_yet_valid"),
)
_CODE = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
#: The audit events each counter counts: event -> (metric, labels).
COUNTED_EVENTS = {
    "dial_allowed": ("dials", {"result": "allowed"}),
    "dial_denied": ("dials", {"result": "denied"}),
    "bind_allowed": ("binds", {"result": "allowed"}),
    "bind_denied": ("binds", {"result": "denied"}),
    "enrollment": ("enrollments", {"result": "ok"}),
    "enrollment_refused": ("enrollments", {"result": "refused"}),
    "renewal": ("renewals", {"kind": "renewal", "result": "ok"}),
    "recovery": ("renewals", {"kind": "recovery", "result": "ok"}),
    "renewal_refused": ("renewals", {"kind": "renewal", "result": "refused"}),
    "identity_revoked": ("revocations", {}),
    "tunnel_refused": ("tunnel_refusals", {}),
}
COUNTER_HELP = {
    "dials": ("result", "reason", "Dials decided by the relays, by result and reason"),
    "binds": ("result", "reason", "Binds decided by the relays, by result and reason"),
    "enrollments": ("result", "reason", "Enrollments, and refused ones by reason"),
    "renewals": ("kind", "result", "reason", "Renewals and recoveries, and refused ones by reason"),
    "revocations": ("Identities revoked",),
    "tunnel_refusals": ("reason", "Tunnels refused at authentication, by reason"),
}


def reason_code(reason: Any, result: str) -> str:
    """A reason as one of a few codes: ``none`` when allowed, a code as it is, a sentence by its phrase."""
    if result in ("allowed", "ok"):
        return "none"
    if not isinstance(reason, str):
        return "other"
    if _CODE.match(reason):
        return reason
    lowered = reason.lower()
    return next((code for phrase, code in REASONS if phrase in lowered), "other")


class AuditCounts:
    """Counters read from the audit rows added since this process started (in a worker thread)."""

    def __init__(self, context: ControllerContext) -> None:
        self._store = context.store
        row = self._store.query_one("SELECT MAX(id) AS last FROM audit")
        self.last_id = int(row["last"] or 0) if row is not None else 0
        self.counts: collections.Counter[tuple[str, tuple[tuple[str, str], ...]]] = collections.Counter()
        self._lock = threading.Lock()

    def advance(self) -> None:
        with self._lock:
            rows = self._store.query("SELECT id, event, fields FROM audit WHERE id > ? ORDER BY id LIMIT ?",
                                     (self.last_id, MAX_AUDIT_ROWS_PER_SCRAPE))
            for row in rows:
                self.last_id = int(row["id"])
                counted = COUNTED_EVENTS.get(row["event"])
                if counted is None:
                    continue
                metric, labels = counted
                try:
                    fields = json.loads(row["fields"])
                except ValueError:
                    fields = {}
                labels = dict(labels)
                if metric != "revocations":
                    labels["reason"] = reason_code(fields.get("reason"), labels.get("result", "refused"))
                # A row recorded after others were only counted stands for all of them.
                weight = 1 + int(fields.get("suppressed", 0) or 0) if isinstance(fields, dict) else 1
                self.counts[(metric, tuple(sorted(labels.items())))] += weight


class LoopLag:
    """How late the event loop wakes a sleeper: the worst lag since the last scrape."""

    def __init__(self) -> None:
        self.worst = 0.0
        self.last = 0.0

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            start = loop.time()
            await asyncio.sleep(LOOP_PROBE_INTERVAL)
            self.last = max(0.0, loop.time() - start - LOOP_PROBE_INTERVAL)
            self.worst = max(self.worst, self.last)

    def take(self) -> float:
        worst, self.worst = max(self.worst, self.last), 0.0
        return worst


@dataclass
class Snapshot:
    """What the event loop's data says at the scrape, taken on the loop; the rest is read in a thread."""

    presence: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)
    tunnels: collections.Counter[str] = field(default_factory=collections.Counter)
    bytes_in: int = 0
    bytes_out: int = 0
    unauthenticated: dict[str, int] = field(default_factory=dict)
    loop_lag: float = 0.0
    store_read_seconds: float = 0.0
    expiring: dict[str, int] = field(default_factory=dict)
    reports: dict[str, int] = field(default_factory=dict)
    store_writes: tuple[int, float] = (0, 0.0)
    own: OwnView | None = None


class ControllerMetrics(Collector):
    """The registry ``/metrics`` renders: one per controller process (never the global default)."""

    def __init__(self, context: ControllerContext, book: PresenceBook, listeners: Iterable[Listener],
                 bytes_live: Any) -> None:
        self.context = context
        self.book = book
        self.listeners = list(listeners)
        #: () -> (bytes in, bytes out) of this process's live tunnels
        self.bytes_live = bytes_live
        self.audit = AuditCounts(context)
        self.lag = LoopLag()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)
        self._snapshot = Snapshot()
        #: one render at a time: ``collect`` reads the snapshot its render set
        self._render_lock = threading.Lock()

    def snapshot(self) -> Snapshot:
        """On the event loop: this process's own presence and live counters (the store is read in ``render``)."""
        snap = Snapshot(own=own_view(self.book))
        for tenant, _name in self.book.live:
            snap.tunnels[tenant] += 1
        live_in, live_out = self.bytes_live()
        snap.bytes_in = self.book.bytes_closed[0] + live_in
        snap.bytes_out = self.book.bytes_closed[1] + live_out
        snap.unauthenticated = {listener.admission.name: listener.admission.total for listener in self.listeners}
        snap.loop_lag = self.lag.take()
        snap.reports = {"accepted": relay_reports.accepted_reports,
                        **{kind: relay_reports.refused_reports[kind] for kind in relay_reports.REFUSAL_KINDS}}
        snap.store_writes = (self.book.flushes, self.book.write_seconds)
        return snap

    def render(self, snap: Snapshot) -> bytes:
        """In a worker thread: the fleet's presence (the fleet API's reads), the new audit rows, the text format."""
        with self._render_lock:
            return self._render(snap)

    def _render(self, snap: Snapshot) -> bytes:
        from prometheus_client import generate_latest

        now = time.time()
        started = time.perf_counter()
        entries = fleet(self.context.store, self.context.registry.list_identities(), snap.own, now=now)
        snap.store_read_seconds = time.perf_counter() - started
        for entry in entries:
            snap.presence[(entry["tenant"], entry["presence"])] += 1
            not_after = entry["cert_not_after"]
            if entry["status"] == "enrolled" and isinstance(not_after, (int, float)):
                for label, window in EXPIRY_WINDOWS:
                    snap.expiring[label] = snap.expiring.get(label, 0) + (not_after <= now + window)
        self.audit.advance()
        self._snapshot = snap
        return bytes(generate_latest(self.registry))

    def collect(self) -> Iterator[Any]:
        snap = self._snapshot
        identities = GaugeMetricFamily("outpost_identities", "Identities by tenant and presence",
                                       labels=["tenant", "presence"])
        tenants = sorted({tenant for tenant, _ in snap.presence})
        for tenant in tenants:
            for state in PRESENCE_STATES:
                identities.add_metric([tenant, state], snap.presence.get((tenant, state), 0))
        yield identities
        tunnels = GaugeMetricFamily("outpost_tunnels", "Tunnels this relay process holds, by tenant",
                                    labels=["tenant"])
        for tenant, count in sorted(snap.tunnels.items()):
            tunnels.add_metric([tenant], count)
        yield tunnels
        carried = CounterMetricFamily("outpost_tunnel_bytes", "Bytes carried by this process's tunnels",
                                      labels=["direction"])
        carried.add_metric(["in"], snap.bytes_in)
        carried.add_metric(["out"], snap.bytes_out)
        yield carried
        yield from self._audit_counters()
        reports = CounterMetricFamily("outpost_reports", "Agent reports received by this process, by result",
                                      labels=["result"])
        for result, count in sorted(snap.reports.items()):
            reports.add_metric([result], count)
        yield reports
        expiring = GaugeMetricFamily("outpost_certificates_expiring", "Enrolled identities whose certificate "
                                     "expires within the window (or has expired)", labels=["within"])
        for label, _ in EXPIRY_WINDOWS:
            expiring.add_metric([label], snap.expiring.get(label, 0))
        yield expiring
        held = GaugeMetricFamily("outpost_unauthenticated_connections",
                                 "Connections held that have not authenticated, by listener", labels=["listener"])
        for name, count in sorted(snap.unauthenticated.items()):
            held.add_metric([name], count)
        yield held
        yield GaugeMetricFamily("outpost_store_read_seconds", "Time of the fleet read of this scrape",
                                value=snap.store_read_seconds)
        yield SummaryMetricFamily("outpost_store_write_seconds", "Presence batch transactions and their time",
                                  count_value=snap.store_writes[0], sum_value=snap.store_writes[1])
        yield GaugeMetricFamily("outpost_event_loop_lag_seconds",
                                "The worst lateness of the event loop since the last scrape", value=snap.loop_lag)

    def _audit_counters(self) -> Iterator[Any]:
        for metric, spec in COUNTER_HELP.items():
            *labels, documentation = spec
            family = CounterMetricFamily(f"outpost_{metric}", documentation, labels=labels)
            for (name, items), count in sorted(self.audit.counts.items()):
                if name == metric:
                    values = dict(items)
                    family.add_metric([values.get(label, "") for label in labels], count)
            yield family
