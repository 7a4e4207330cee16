"""What ``outpost-agent run`` reports of itself: the tunnel's state in ``status.json``, and to systemd."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from agent.clock.trusted import TrustedClock
from shared import service_manager
from shared.utc import format_utc

#: cryptography's OpenSSL backend module, whose presence ``openssl_backend_loaded`` reports.
OPENSSL_BACKEND = "cryptography.hazmat.backends.openssl"


@dataclass
class TunnelStats:
    """What ``outpost-agent status`` shows about the tunnel."""

    state: str = "starting"
    relay: str | None = None
    #: while connected: since when; None otherwise (``down_since`` then says since when it is not)
    connected_since: float | None = None
    down_since: float | None = None
    rtt_ms: float | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    reconnects: int = 0
    last_error: str | None = None
    bound: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)
    dials: dict[str, int] = field(default_factory=dict)
    link: str | None = None
    #: What the tunnel runs on while connected: "tls" (Outpost's ALPN) or "websocket".
    transport: str | None = None
    #: Whether the process holds aiohttp (only a WebSocket tunnel or ``doctor`` loads it): ~14 MiB of it.
    aiohttp_loaded: bool = False
    #: Whether the process holds cryptography's OpenSSL backend (2 MiB on Debian's cryptography 38): the steady
    #: state signs and checks certificates through libcrypto (shared/libcrypto.py); enrolling or renewing loads it.
    openssl_backend_loaded: bool = False
    #: why the last tunnel ended (kept after a reconnect, unlike last_error)
    last_drop: str | None = None
    #: Unix seconds: when the current certificate expires, when the agent renews it next,
    #: and why the last renewal attempt failed (None once one succeeds).
    cert_not_after: float | None = None
    next_renewal: float | None = None
    renewal_error: str | None = None
    #: Seconds to add to the local clock for trusted time, where that came from
    #: (ntp, controller, local), and what is wrong with the clock, if anything (agent.clock).
    clock_offset_s: float | None = None
    clock_source: str | None = None
    clock_problem: str | None = None
    #: While the controller says the identity is disabled (state "disabled"): when the agent asks again.
    next_ask: float | None = None
    #: REPORT frames sent to relays since the start, and the payload size of the last (agent/tunnel/report.py)
    reports_sent: int = 0
    last_report_bytes: int | None = None

    def as_json(self, now: float) -> dict[str, Any]:
        """Every time in it (connected_since, updated, the certificate's) is trusted unix time."""
        return {**self.__dict__, "updated": now}


def clock_time(timestamp: float) -> str:
    """``14:05 UTC``: when, within the next hours, the agent does something (the date adds nothing there)."""
    return format_utc(timestamp, "%H:%M UTC")


def report_offline(why: str) -> None:
    """Ready (the unit is Type=notify), waiting on the network, and why: a gateway that
    boots offline is up and says so, and systemd never restarts it for that."""
    service_manager.notify_ready(f"offline: {why}")


def note_clock(stats: TunnelStats, clock: TrustedClock, problem: str | None) -> None:
    """Put the clock's offset, source and problem into the status."""
    stats.clock_offset_s = round(clock.offset, 3)
    stats.clock_source = clock.source
    stats.clock_problem = problem
