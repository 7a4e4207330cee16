"""A link between relays is never used past the end of either relay's certificate (docs/deployment.md).

Both certificates are checked at the link's TLS handshake and AUTH only. So
the dialing end (A) stops putting new dials on a link once the other relay's
certificate, or its own, is past its drain point (between 3/4 and 95 % of its
life, the agents' schedule: shared/cert_schedule.py); the next dial opens a
fresh link, whose handshake sees the renewed certificates. The drained link
closes once its dials finish, and at the first certificate's end at the
latest (its dials then end with the link). The accepting end (B) closes a
link at the end of the certificate its dialer was admitted with, whatever A
does. Each such close gets a ``link_closed`` row saying why. No new message
on the wire: a renewal never reaches an open link, a new link does.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from shared.cert_schedule import leave_at
from shared.protocol import ErrorCode
from shared.trust import cert_not_after, cert_not_before
from shared.utc import format_utc

if TYPE_CHECKING:
    from controller.relay.link_client import LinkSession

#: How often a draining link looks whether its last dial finished: an idle link lingers a second at
#: most, against a drain window of a fifth of a relay certificate's life (72 min of 6 h).
DRAIN_POLL = 1.0
#: The longest a link's timer sleeps before reading the wall clock again: certificates end by the wall
#: clock, the loop's timers run on the monotonic one, and a wall clock stepped (NTP, a VM resumed) is
#: noticed within this long.
CLOCK_STEP_NOTICED = 30.0
#: Dates in the close reasons to the second: certificates of a few minutes' life exist (tests, short
#: settings), and the minute alone would not say whether a link outlived one.
SECONDS = "%Y-%m-%d %H:%M:%S UTC"
#: Close codes: a drained link ends as any link whose relay has nothing more for it; one closed at a
#: certificate's end says its time ran out.
DRAINED = ErrorCode.NO_ERROR
ENDED = ErrorCode.TIMEOUT


@dataclass(frozen=True)
class LinkTrust:
    """How long the dialing end relies on one link (unix times), and the sentence for each close."""

    drain_at: float
    ends_at: float
    drain_reason: str
    end_reason: str
    #: SHA-256 over both certificates: links opened again on the very same pair count their drains.
    pair: bytes
    #: The other relay's certificate serial (hex), as its ``link_connected`` row names the dialer's.
    serial: str


def _dates(cert: x509.Certificate) -> tuple[float, float]:
    return cert_not_before(cert).timestamp(), cert_not_after(cert).timestamp()


def link_trust(peer: str, peer_der: bytes, own_pem: str, now: float, draw: float, left_before: int = 0) -> LinkTrust:
    """The drain point and end of a link to relay ``peer`` that presented ``peer_der`` at its handshake,
    opened with this relay's certificate ``own_pem``; ``left_before`` links already drained on the same pair
    (neither relay renewed since: draining again gains nothing, so later links stay longer, never a loop)."""
    theirs = x509.load_der_x509_certificate(peer_der)
    ours = x509.load_pem_x509_certificate(own_pem.encode("ascii"))
    candidates = []
    for cert, whose in ((theirs, f"the certificate of relay {peer}"), (ours, "this relay's certificate")):
        start, end = _dates(cert)
        candidates.append((leave_at(start, end, now, draw, left_before), end, whose))
    drain, drain_end, drain_whose = min(candidates)
    _, end, end_whose = min(candidates, key=lambda c: c[1])
    return LinkTrust(
        drain_at=drain, ends_at=end, pair=pair_of(peer_der, own_pem), serial=format(theirs.serial_number, "x"),
        drain_reason=f"{drain_whose} is past its drain point (it ends at {format_utc(drain_end, SECONDS)}); new dials go "
                     "over a new link, and this one closed once its dials finished",
        end_reason=f"{end_whose} ended at {format_utc(end, SECONDS)}; a link is never used past it")


def pair_of(peer_der: bytes, own_pem: str) -> bytes:
    """What identifies the pair of certificates a link was opened with."""
    own = x509.load_pem_x509_certificate(own_pem.encode("ascii")).public_bytes(serialization.Encoding.DER)
    return hashlib.sha256(hashlib.sha256(peer_der).digest() + own).digest()


def draining(link: LinkSession, now: float) -> bool:
    """No new dial goes on ``link`` any more."""
    return link.trust is not None and now >= link.trust.drain_at


async def retire(link: LinkSession, drained: Callable[[], None], closed: Callable[[str], None]) -> None:
    """A's end: wait for the link's drain point (``drained`` is told), then close it once its dials finished,
    or at the certificate's end at the latest (``closed`` gets the reason)."""
    trust = link.trust
    if trust is None:
        return
    while (left := trust.drain_at - time.time()) > 0:
        await asyncio.sleep(min(left, CLOCK_STEP_NOTICED))
    if link.conn.closed:
        return
    drained()
    while not link.conn.closed:
        now = time.time()
        if now >= trust.ends_at:
            code, reason = ENDED, trust.end_reason
        elif link.dials() == 0:
            code, reason = DRAINED, trust.drain_reason
        else:
            await asyncio.sleep(min(DRAIN_POLL, trust.ends_at - now))
            continue
        closed(reason)  # first: the close ends this task with the link
        await link.close(code, reason)
        return


def peer_ended_reason(peer: str, not_after: float) -> str:
    """B's close of a link whose dialer's certificate ended."""
    return (f"the certificate of relay {peer} ended at {format_utc(not_after, SECONDS)}; a link is never used past it "
            "(the relay links again with its renewed certificate)")
