"""When to renew one certificate: unix seconds in, unix seconds out, no I/O.

The first attempt at about two thirds of the certificate's life, jittered so a
fleet enrolled together does not renew together; retries after a failure with
exponential backoff and full jitter, capped so several attempts fit before
expiry, never later than expiry minus a margin; after a refusal the slower
refusal backoff (agent.identity.refusals).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from cryptography import x509

from agent.identity.refusals import refusal_delay
from shared.trust import cert_not_after, cert_not_before

#: Renew at two thirds of the lifetime: a 24 h certificate renews after 16 h,
#: leaving 8 h for a link that is down when the first attempt comes.
RENEW_AT_FRACTION = 2 / 3
#: ± this fraction of the lifetime around the renewal point (± 2.4 h for 24 h),
#: so a fleet enrolled in one morning spreads its renewals over hours.
RENEW_JITTER_FRACTION = 0.10
#: No attempt is planned later than expiry minus this fraction of the lifetime
#: (72 min for 24 h): the last tries still happen while the certificate works.
EXPIRY_MARGIN_FRACTION = 0.05
#: ... and never less than this, for short lifetimes: one slow satellite
#: request with TLS fits in a minute.
MIN_EXPIRY_MARGIN_SECONDS = 60.0
#: The first retry waits up to this; each failure doubles the ceiling.
RETRY_BASE_SECONDS = 10.0
#: No retry waits longer than an hour, so a link that comes back is used soon.
MAX_RETRY_SECONDS = 3600.0
#: Retries before expiry are capped so at least this many still fit before
#: the margin, however long the backoff has grown.
MIN_ATTEMPTS_BEFORE_EXPIRY = 4
#: Full jitter can draw zero; a floor keeps a failing controller from being hammered.
MIN_RETRY_SECONDS = 1.0

@dataclass(frozen=True)
class RenewalSchedule:
    """When to renew one certificate; unix seconds in, unix seconds out."""

    not_before: float
    not_after: float

    @classmethod
    def for_certificate(cls, cert: x509.Certificate) -> RenewalSchedule:
        return cls(cert_not_before(cert).timestamp(), cert_not_after(cert).timestamp())

    @property
    def lifetime(self) -> float:
        return max(0.0, self.not_after - self.not_before)

    @property
    def latest(self) -> float:
        """No attempt is planned after this while the certificate is still valid."""
        margin = max(MIN_EXPIRY_MARGIN_SECONDS, self.lifetime * EXPIRY_MARGIN_FRACTION)
        return max(self.not_before, self.not_after - margin)

    def first_attempt(self, rng: random.Random) -> float:
        """About two thirds into the lifetime, ± the jitter, never past ``latest``."""
        fraction = RENEW_AT_FRACTION + rng.uniform(-RENEW_JITTER_FRACTION, RENEW_JITTER_FRACTION)
        return min(self.not_before + self.lifetime * fraction, self.latest)

    def retry_at(self, now: float, failures: int, rng: random.Random) -> float:
        """When to try again after ``failures`` (>= 1) failed attempts in a row."""
        ceiling = min(MAX_RETRY_SECONDS, RETRY_BASE_SECONDS * 2 ** min(max(failures - 1, 0), 30))
        if now < self.latest:
            # Keep several attempts before the margin, however far the backoff grew.
            ceiling = min(ceiling, (self.latest - now) / MIN_ATTEMPTS_BEFORE_EXPIRY)
        elif now < self.not_after:
            # Inside the margin: the last minutes of a valid certificate are worth trying often.
            ceiling = min(ceiling, (self.not_after - now) / MIN_ATTEMPTS_BEFORE_EXPIRY)
        # After expiry (recovery) the plain backoff applies.
        return now + max(MIN_RETRY_SECONDS, rng.uniform(0.0, ceiling))

    @staticmethod
    def refused_retry_at(now: float, refusals: int, rng: random.Random) -> float:
        """When to ask again after ``refusals`` (>= 1) answers that refused: a decision, not a glitch,
        so the plain refusal backoff, never squeezed toward the expiry as network failures are."""
        return now + refusal_delay(refusals, rng)

    def expired(self, now: float) -> bool:
        return now >= self.not_after

