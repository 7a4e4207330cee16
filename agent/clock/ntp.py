"""Ask NTP servers for this gateway's clock offset (ntplib, one packet each).

NTP over UDP is unauthenticated: its answer is checked against the
controller's time (agent.clock.trusted.combine) before it is believed when
the two disagree. Every query is one request and one answer, bounded by a
timeout, so a blocked APN costs at most ``timeout`` seconds and a few bytes.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Sequence

import ntplib

from agent.clock.settings import split_server
from agent.clock.trusted import OffsetSample

log = logging.getLogger(__name__)

#: Version 3 is answered by every server from ntpd and chrony to public pools.
NTP_VERSION = 3
#: Stratum 0 is a "kiss-o'-death" (the server refuses us); 16 means unsynchronised.
MAX_STRATUM = 15
#: Leap indicator 3 means the server's own clock is not synchronised.
LEAP_ALARM = 3
#: Our transmit time comes back as the answer's origin time; float rounding of
#: the 64-bit NTP timestamps costs microseconds, so a millisecond is generous.
ORIGIN_SLACK = 1e-3


def query_server(spec: str, timeout: float) -> OffsetSample | None:
    """One NTP exchange with ``spec``; None when it does not answer or answers nonsense."""
    host, port = split_server(spec)
    before = time.time()
    try:
        stats = ntplib.NTPClient().request(host, version=NTP_VERSION, port=port, timeout=timeout)
    except (ntplib.NTPException, OSError) as error:
        log.info("NTP server %s did not answer: %s", spec, error)
        return None
    reason = _implausible(stats, before)
    if reason is not None:
        log.warning("ignoring NTP server %s: %s", spec, reason)
        return None
    midpoint = (stats.orig_time + stats.dest_time) / 2
    return OffsetSample(source="ntp", offset=stats.offset, delay=stats.delay, local_time=midpoint, origin=spec)


def _implausible(stats: ntplib.NTPStats, sent_after: float) -> str | None:
    if stats.leap == LEAP_ALARM or not 1 <= stats.stratum <= MAX_STRATUM:
        return f"it is not synchronised (leap {stats.leap}, stratum {stats.stratum})"
    # An answer to someone else's request (or a replay) carries another origin time.
    if not sent_after - ORIGIN_SLACK <= stats.orig_time <= stats.dest_time + ORIGIN_SLACK:
        return "the answer is not for our request"
    if not (math.isfinite(stats.offset) and math.isfinite(stats.delay)) or stats.delay < 0:
        return "the answer's timestamps are inconsistent"
    return None


async def query_servers(servers: Sequence[str], timeout: float) -> OffsetSample | None:
    """Ask every server at once; the answer with the shortest round trip, or None.

    The shortest round trip bounds the error best (at most half of it). The
    whole call takes at most about ``timeout`` seconds however many servers.
    """
    if not servers:
        return None
    tasks = [asyncio.to_thread(query_server, spec, timeout) for spec in servers]
    try:
        # Name resolution is not covered by the socket timeout; this is.
        samples = await asyncio.wait_for(asyncio.gather(*tasks), timeout + 1.0)
    except TimeoutError:
        log.info("no NTP server answered within %.1f s", timeout)
        return None
    answered = [s for s in samples if s is not None]
    return min(answered, key=lambda s: s.delay) if answered else None

