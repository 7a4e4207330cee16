"""When to stop relying on a connection whose peer certificate is about to end: the agent's tunnel to a
relay (agent/tunnel/relay_trust.py) and a link between relays (controller/relay/peering.py).

A certificate is checked at the TLS handshake only; a connection kept past
the certificate's end would trust a peer nobody vouches for any more. So a
connection is left between LEAVE_FROM and LEAVE_BY of the certificate's life
(the peer renews at two thirds, so a connection opened again sees the renewed
one), and never used past its end. Pure arithmetic: ``now`` and the random
draw come in.
"""

from __future__ import annotations

from shared.trust import NOT_BEFORE_BACKDATE

#: The share of the certificate's life after which a connection may be left: relays renew at two
#: thirds (controller/relay_node.py RENEW_FRACTION) and push at once; three quarters leaves a
#: renewal retried for a twelfth of the life (30 min of 6 h) before anyone goes.
LEAVE_FROM = 0.75
#: The share by which every connection has been left: the leaves of a whole fleet are spread over a
#: fifth of the life (72 min of 6 h: 10,000 gateways come back at 2.3 a second), and the last 5 % (18 min
#: of 6 h) covers a reconnect with its backoff before the old certificate ends.
LEAVE_BY = 0.95
#: Seconds the CA dates a certificate's start before its issuance: the life a peer renews by starts after them.
BACKDATE = NOT_BEFORE_BACKDATE.total_seconds()


def issued_at(not_before: float, not_after: float) -> float:
    """When a certificate valid from ``not_before`` to ``not_after`` was issued: its start without the CA's
    backdating, when its life is longer than that."""
    return not_before + BACKDATE if not_after - not_before > BACKDATE else not_before


def leave_at(not_before: float, not_after: float, now: float, draw: float, left_before: int = 0) -> float:
    """When to leave a connection whose peer certificate is valid from ``not_before`` to ``not_after``.

    ``draw`` is uniform in [0, 1): the moment falls uniformly between LEAVE_FROM and LEAVE_BY of the
    life counted from issuance (``not_before`` plus the CA's backdating, when the life is longer
    than that). A connection that comes up already past LEAVE_BY draws between now and the end.

    ``left_before`` counts the connections already left on this very certificate: the peer has not
    renewed (a controller outage, or it was revoked), so leaving early again gains nothing. The
    second draws in the last part of the life (LEAVE_BY to the end) and any later one stays to the
    end: at most three reconnects per certificate, never a loop. Never past the end, and not all
    connections in the same instant.
    """
    issued = issued_at(not_before, not_after)
    life = max(0.0, not_after - issued)
    if left_before >= 2:
        return not_after
    start, end = issued + life * (LEAVE_BY if left_before else LEAVE_FROM), issued + life * LEAVE_BY
    if now >= end:
        start, end = now, not_after
    elif now > start:
        start = now
    return min(not_after, start + max(0.0, end - start) * min(max(draw, 0.0), 1.0))
