"""What the relay does with a tunnel's presence and its agent's REPORT.

A report is taken only as the word of the identity this relay authenticated
on the tunnel: one that names another identity, like one too large or
malformed (the protocol core refuses those), is ignored, counted, and the
first of each tunnel audited (``report_refused``, within the identity's
refusal budget): a flood of bad reports costs a counter, never a store write
each, and never the tunnel.
"""

from __future__ import annotations

import collections
import time
from typing import TYPE_CHECKING

from controller.presence import TunnelPresence
from shared.protocol import ReportReceived

if TYPE_CHECKING:
    from controller.relay.session import RelaySession

#: Why reports were refused, by kind (bounded: these few keys), for the metrics.
REFUSAL_KINDS = ("too_large", "malformed", "other_identity")
refused_reports: collections.Counter[str] = collections.Counter()
accepted_reports = 0


def refusal_kind(reason: str) -> str:
    if "bytes, more than" in reason:
        return "too_large"
    return "malformed"


def tunnel_up(session: RelaySession, keepalive: object) -> TunnelPresence:
    """Start the presence of ``session``'s identity on this process (just admitted)."""
    identity = session.admitted
    loop = session.loop
    conn = session.conn

    def last_seen() -> float:
        # The core keeps loop time; the fleet view speaks wall-clock time.
        return time.time() - max(0.0, loop.time() - conn.last_received)

    announced = float(keepalive) if isinstance(keepalive, (int, float)) and not isinstance(keepalive, bool) \
        and keepalive > 0 else None
    tunnel = TunnelPresence(identity.tenant, identity.name, session.remote, session.connected_at, announced, last_seen,
                            traffic=lambda: (conn.bytes_received, conn.bytes_sent))
    session.relay.presence.up(tunnel)
    return tunnel


def on_report(session: RelaySession, tunnel: TunnelPresence | None, event: ReportReceived) -> None:
    """Keep a good report as the identity's latest; count and audit (once per tunnel) a refused one."""
    global accepted_reports
    identity = session.admitted
    reason = event.refused
    kind = None if reason is None else refusal_kind(reason)
    report = event.report
    if report is not None and report.get("identity") not in (None, identity.uri):
        kind, reason = "other_identity", f"the report names {str(report.get('identity'))[:200]!r}, not {identity.uri}"
    if kind is None and report is not None and tunnel is not None:
        accepted_reports += 1
        session.relay.presence.report(tunnel, {k: v for k, v in report.items() if k != "identity"})
        return
    refused_reports[kind or "malformed"] += 1
    session.reports_refused += 1
    if session.reports_refused == 1:
        session.relay.record_soon("report_refused", identity=identity.label, remote=session.remote,
                                  reason=reason, size=event.size, correlation=session.tunnel_id)
