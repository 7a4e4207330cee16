"""The agent's report of itself to the relay (REPORT, docs/protocol.md): what, and when.

A report goes when a tunnel comes up and when something in it changes
meaningfully, never on a timer of its own: the runner offers the status it
already keeps every few seconds (``offer``), and the report leaves only when
one of the rules below says the relay's copy is out of date, and no sooner
than ``REPORT_MIN_INTERVAL`` after the last one. On a metered link that
bounds reports to 48 a day, about 30 KB at the most; an idle gateway whose
nothing changes sends one per tunnel and one per certificate renewal.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared import __version__
from shared.protocol import LocalProtocolError
from shared.protocol.control import MAX_REPORT_ERROR_CHARS, MAX_REPORT_TEXT_CHARS

if TYPE_CHECKING:
    from agent.tunnel.client import AgentSession
    from agent.tunnel.status import TunnelStats

# At most one report per this many seconds after the first of a tunnel: the
# relay's copy of a renewal error or a round trip may be half an hour old,
# and a gateway whose numbers flap (a cellular round trip swings by the
# minute) sends at most 48 reports a day, about 30 KB of a metered link's
# 100 KB/day budget at the very worst.
REPORT_MIN_INTERVAL = 30 * 60.0
# A round trip is news when it moved by more than half of the last one
# reported AND by more than 20 ms: cellular jitter of a few milliseconds, or a
# 5 ms LAN doubling, says nothing about the link; 80 ms becoming 400 ms does.
RTT_CHANGE_SHARE = 0.5
RTT_CHANGE_MIN_MS = 20.0
# A clock offset is news when it moved by more than a second: certificates
# are backdated by minutes, so sub-second drift decides nothing ops could see.
CLOCK_OFFSET_CHANGE_S = 1.0
# A certificate expiry or a planned renewal is news when it moved by more than
# a minute (a renewal moves the expiry by hours; rounding moves nothing).
TIME_CHANGE_S = 60.0
# Fields where any change is news: who and what the agent is, and how it
# runs. (The round trip, the clock offset and the times have their own rules.)
EXACT_FIELDS = ("identity", "agent_version", "os", "arch", "link_profile", "keepalive_s", "clock_source",
                "key_backend", "renewal_error")
OS_RELEASE = Path("/etc/os-release")

log = logging.getLogger(__name__)


def _text(value: str | None, limit: int = MAX_REPORT_TEXT_CHARS) -> str | None:
    """``value`` cut to ``limit`` characters, every unprintable one a space (the relay refuses those)."""
    if value is None:
        return None
    return "".join(c if c.isprintable() else " " for c in value)[:limit]


def operating_system(os_release: Path = OS_RELEASE) -> str:
    """os-release's PRETTY_NAME ("Debian GNU/Linux 12 (bookworm)"), or the kernel's name and release."""
    try:
        for line in os_release.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.partition("=")[2].strip().strip('"')
    except OSError:
        pass
    # os.uname, not the platform module: the same answer on Linux without 0.1 MiB more in every agent.
    uname = os.uname()
    return f"{uname.sysname} {uname.release}".strip()


def static_facts(uri: str, link_profile: str | None, keepalive_s: float | None, key_backend: str) -> dict[str, Any]:
    """What does not change while the agent runs."""
    return {
        "identity": uri,
        "agent_version": __version__,
        "os": _text(operating_system()),
        "arch": _text(os.uname().machine or None),
        "link_profile": link_profile,
        "keepalive_s": keepalive_s,
        "key_backend": key_backend,
    }


def build_report(static: dict[str, Any], stats: TunnelStats) -> dict[str, Any]:
    """The report: the static facts and the status the runner keeps."""
    return {
        **static,
        "rtt_ms": stats.rtt_ms,
        "clock_offset_s": stats.clock_offset_s,
        "clock_source": stats.clock_source,
        "cert_not_after": stats.cert_not_after,
        "next_renewal": stats.next_renewal,
        "renewal_error": _text(stats.renewal_error, MAX_REPORT_ERROR_CHARS),
    }


def _moved(old: Any, new: Any, by: float) -> bool:
    if old is None or new is None:
        return (old is None) != (new is None)
    return bool(abs(float(new) - float(old)) > by)


def changed_meaningfully(last: dict[str, Any], report: dict[str, Any]) -> bool:
    """Whether ``report`` says something ``last`` (the relay's copy) does not, by the rules above."""
    if any(last.get(key) != report.get(key) for key in EXACT_FIELDS):
        return True
    old_rtt, new_rtt = last.get("rtt_ms"), report.get("rtt_ms")
    if (old_rtt is None) != (new_rtt is None):
        return new_rtt is not None  # a round trip measured for the first time; its loss is no news
    if old_rtt is not None and new_rtt is not None:
        change = abs(new_rtt - old_rtt)
        if change > RTT_CHANGE_MIN_MS and change > RTT_CHANGE_SHARE * old_rtt:
            return True
    return (_moved(last.get("clock_offset_s"), report.get("clock_offset_s"), CLOCK_OFFSET_CHANGE_S)
            or _moved(last.get("cert_not_after"), report.get("cert_not_after"), TIME_CHANGE_S)
            or _moved(last.get("next_renewal"), report.get("next_renewal"), TIME_CHANGE_S))


class Reporter:
    """Sends the report on each new tunnel, then on meaningful change, at most once per interval."""

    def __init__(self, static: dict[str, Any], clock: Callable[[], float] = time.monotonic) -> None:
        self.static = static
        self._clock = clock
        self._session: AgentSession | None = None
        self._last: dict[str, Any] | None = None
        self._last_at = 0.0
        #: the tunnel's first round trip went out on its own (once per tunnel, past the interval)
        self._first_rtt_sent = False
        self.sent = 0
        self.last_size: int | None = None

    def offer(self, session: AgentSession, stats: TunnelStats) -> bool:
        """Send the report on ``session`` if it is due; True when one was queued."""
        if session.conn.closed or not session.conn.authenticated or session.relay_info.get("reports") is not True:
            return False  # a relay from before REPORT would end the tunnel over the unknown frame
        report = build_report(self.static, stats)
        now = self._clock()
        if session is self._session and self._last is not None:
            if not changed_meaningfully(self._last, report):
                return False
            first_rtt = self._last.get("rtt_ms") is None and report.get("rtt_ms") is not None
            if now - self._last_at < REPORT_MIN_INTERVAL and not (first_rtt and not self._first_rtt_sent):
                return False  # offered again at the runner's next status write
            self._first_rtt_sent = self._first_rtt_sent or first_rtt
        else:
            self._session = session
            self._first_rtt_sent = report.get("rtt_ms") is not None
        try:
            self.last_size = session.conn.send_report(report)
        except LocalProtocolError as error:  # a report that cannot go must not end the runner
            log.warning("report not sent: %s", error)
            return False
        session.schedule_flush()
        self._last, self._last_at = report, now
        self.sent += 1
        stats.reports_sent = self.sent
        stats.last_report_bytes = self.last_size
        return True
