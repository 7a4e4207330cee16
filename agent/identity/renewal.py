"""Keeping the certificate fresh: when to renew (pure), how to renew (one request), and the loop.

``RenewalSchedule`` decides on numbers alone: the first attempt at about two
thirds of the certificate's life, jittered so a fleet enrolled together does
not renew together; retries after a failure with exponential backoff and full
jitter, capped so several attempts fit before expiry, never later than expiry
minus a margin. ``renew_certificate`` is one ``POST /v1/renew`` (the exchange of
agent.identity.exchange, as enrollment's); the
same request recovers a certificate that already expired (the controller
decides which within its grace period).
``CertificateKeeper`` loops: sleep until due, renew, store atomically, hand
the new certificate to new tunnels.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent.errors import EXIT_IDENTITY_REFUSED, OutpostError, TrustError
from agent.identity.csr import build_csr
from agent.identity.exchange import Wording, accept_certificate, post_csr
from agent.identity.keystore import KeyStore
from agent.identity.pinned_tls import LOCAL_TIME, Clock, PinnedTLS, as_time_source
from agent.identity.refusals import DISABLED, REVOKED, DisabledGate, identity_status, refusal_delay
from agent.identity.state import StateDir
from agent.proxy import DIRECT, ProxySettings
from shared.service_manager import EVENT_RENEWED, journal_fields
from shared.trust import cert_not_after, cert_not_before

log = logging.getLogger(__name__)

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
#: The keeper sleeps at most this long at a time and looks at the clock again:
#: a corrected (trusted) clock moves "now" and the plan must follow it.
MAX_SLEEP_SECONDS = 60.0
#: Controller codes that mean "this key gets no certificate" (a retry soon cannot help).
REFUSAL_CODES = frozenset(
    {"renewal_unknown_key", "recovery_expired", "identity_revoked", "identity_disabled", "renewal_not_enrolled"}
)


#: The refusals that are the controller's word on the identity itself (agent.identity.refusals).
IDENTITY_STATUS_CODES = {"identity_revoked": REVOKED, "identity_disabled": DISABLED}
#: What renewal and recovery say where the exchange with the controller fails (agent.identity.exchange).
RENEWAL = Wording(
    unreachable=("could not reach the controller at {url} to renew the certificate ({{reason}}); "
                 "the agent retries on its own"),
    not_an_answer=("the controller at {url} answered with something that is not a certificate; "
                   "the agent retries on its own"),
    failed="the controller at {url} failed (HTTP {status}); the agent retries on its own",
    refused="the controller at {url} refused the renewal (HTTP {status}); ask central ops",
    no_certificate="the controller at {url} did not return a certificate; the agent retries on its own",
    other_ca="the controller at {url} returned a certificate not issued by the pinned CA; ask central ops",
    other_key="the controller at {url} returned a certificate for another key; the agent retries",
    other_identity="the controller at {url} returned a certificate for another identity than {uri}",
)


class RenewalRefused(OutpostError):
    """The controller will not certify this gateway's key: revoked, disabled, or offline too long.

    Revoked is terminal: the running agent stops (exit 77) instead of asking again.
    """

    exit_code = EXIT_IDENTITY_REFUSED

    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.identity_status = IDENTITY_STATUS_CODES.get(code)
        self.terminal = self.identity_status == REVOKED


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


def _renewal_refusal(code: object, sentence: str) -> OutpostError | None:
    """The controller's word that this key gets no certificate (revoked, disabled, too late) is RenewalRefused."""
    return RenewalRefused(sentence, str(code)) if code in REFUSAL_CODES else None


async def renew_certificate(state: StateDir, keystore: KeyStore, clock: Clock = LOCAL_TIME,
                            proxy: ProxySettings = DIRECT) -> x509.Certificate:
    """Renew (or recover) now and store the result; the old certificate stays until the new is durable.

    ``clock`` is trusted time (agent.clock.trusted.TrustedClock); a bare
    callable counts as a clock nobody measured.
    """
    identity = state.load()
    time = as_time_source(clock)
    # The controller's certificate is judged by trusted time, not by the system clock,
    # so a gateway whose clock reads 1970 still renews.
    csr = build_csr(keystore, identity.name)
    body = {"csr": csr.public_bytes(serialization.Encoding.PEM).decode()}
    answer = await post_csr(PinnedTLS(identity.ca_pem, time, proxy), identity.controller_url, "/v1/renew", body,
                            RENEWAL, _renewal_refusal)
    cert = accept_certificate(answer, identity.controller_url, identity.ca_certificate(), keystore.public_key(),
                              identity.uri, time, RENEWAL)
    state.replace_certificate(cert.public_bytes(serialization.Encoding.PEM).decode())
    return cert


StatusHook = Callable[[float, float, "str | None"], None]


class CertificateKeeper:
    """Renews the stored certificate on schedule until cancelled.

    ``on_renewed(cert_pem)`` is called after the new certificate is stored
    (the runner puts it into the live TunnelCredentials, so the next tunnel
    presents it while current tunnels and their streams carry on);
    ``on_status(cert_not_after, next_renewal, last_error)`` after every plan.
    """

    def __init__(self, state: StateDir, keystore: KeyStore, *, clock: Clock = LOCAL_TIME,
                 rng: random.Random | None = None, on_renewed: Callable[[str], None] | None = None,
                 on_status: StatusHook | None = None, proxy: ProxySettings = DIRECT,
                 gate: DisabledGate | None = None) -> None:
        self.state = state
        #: Shared with the tunnel: while the identity is disabled, one ask per interval between them.
        self.gate = gate or DisabledGate()
        self.keystore = keystore
        self.proxy = proxy
        #: Trusted time: plans are made on it and the controller's certificate is judged by it.
        self.time = as_time_source(clock)
        self.clock = self.time.now
        self.rng = rng or random.Random()
        self._on_renewed = on_renewed
        self._on_status = on_status
        self.next_renewal: float | None = None
        self.cert_not_after: float | None = None
        self.last_error: str | None = None
        self.renewals = 0

    def _plan(self, due: float, schedule: RenewalSchedule) -> None:
        self.next_renewal = due
        self.cert_not_after = schedule.not_after
        if self._on_status is not None:
            self._on_status(schedule.not_after, due, self.last_error)

    async def renew_now(self) -> x509.Certificate:
        """One attempt; on success the new certificate is stored and handed on."""
        cert = await renew_certificate(self.state, self.keystore, self.time, self.proxy)
        self.renewals += 1
        self.last_error = None
        if self._on_renewed is not None:
            self._on_renewed(cert.public_bytes(serialization.Encoding.PEM).decode())
        log.info("certificate renewed; valid until %s", cert_not_after(cert).isoformat(),
                 extra=journal_fields(EVENT_RENEWED, identity=self.state.load().uri))
        return cert

    async def run(self) -> None:
        """Sleep until due, renew, repeat; failures back off and retry (see RenewalSchedule)."""
        schedule = RenewalSchedule.for_certificate(self.state.load().certificate())
        due = schedule.first_attempt(self.rng)
        failures = refusals = 0
        while True:
            self._plan(due, schedule)
            await self._sleep_until(due)
            try:
                cert = await self.gate.ask(self.renew_now())
            except OutpostError as error:
                if error.terminal:
                    # Revoked, a lost device key or a refused TPM authorization: asking again
                    # cannot help, and each try costs the controller or the TPM.
                    raise
                self.last_error = str(error)
                level = logging.ERROR if isinstance(error, (RenewalRefused, TrustError)) else logging.WARNING
                log.log(level, "certificate renewal failed: %s", error)
                if identity_status(error) == DISABLED:
                    # Ops may enable it again: ask, but no sooner than the gate allows.
                    due = self.clock() + self.gate.remaining()
                elif error.retryable:
                    # The network or the controller's health: squeezed toward the expiry (RenewalSchedule).
                    failures += 1
                    due = schedule.retry_at(self.clock(), failures, self.rng)
                else:
                    refusals += 1
                    due = schedule.refused_retry_at(self.clock(), refusals, self.rng)
                continue
            failures = refusals = 0
            schedule = RenewalSchedule.for_certificate(cert)
            due = schedule.first_attempt(self.rng)

    async def _sleep_until(self, due: float) -> None:
        while True:
            remaining = due - self.clock()
            if remaining <= 0:
                return
            await asyncio.sleep(min(remaining, MAX_SLEEP_SECONDS))


async def recover_if_expired(state: StateDir, keystore: KeyStore, clock: Clock = LOCAL_TIME,
                             proxy: ProxySettings = DIRECT) -> bool:
    """At start: an expired certificate is recovered before any tunnel is tried.

    Returns True when a recovery happened. A refusal (revoked, disabled, past
    the grace period) raises RenewalRefused; an unreachable controller raises
    ControllerUnreachable, and the caller retries.
    """
    time = as_time_source(clock)
    schedule = RenewalSchedule.for_certificate(state.load().certificate())
    if not schedule.expired(time.now()):
        return False
    log.warning("the certificate expired; recovering it with the enrolled key")
    cert = await renew_certificate(state, keystore, time, proxy)
    log.info("certificate recovered; valid until %s", cert_not_after(cert).isoformat(),
             extra=journal_fields(EVENT_RENEWED, identity=state.load().uri))
    return True


#: At start, an unreachable controller blocks recovery; retry up to this long
#: between tries (the tunnel could not authenticate with an expired certificate anyway).
START_RECOVERY_MAX_WAIT = 300.0


async def recover_at_start(state: StateDir, keystore: KeyStore, clock: Clock = LOCAL_TIME,
                           rng: random.Random | None = None,
                           on_retry: Callable[[str], None] | None = None,
                           proxy: ProxySettings = DIRECT, gate: DisabledGate | None = None,
                           on_disabled: Callable[[str, float], None] | None = None) -> bool:
    """Recover an expired certificate before the first tunnel; retries while the controller is unreachable.

    A disabled identity is asked about again once ``gate`` allows (ops may
    enable it); ``on_disabled(sentence, seconds)`` hears each such wait.
    RenewalRefused for anything else (revoked, past the grace period) and
    TrustError end it: only central ops can change those; so do terminal
    errors (a lost device key, a TPM that refused authorization).
    ``on_retry(sentence)`` hears each wait before a retry (the runner tells
    systemd it is offline).
    """
    rng = rng or random.Random()
    gate = gate or DisabledGate()
    failures = 0
    while True:
        try:
            return await gate.ask(recover_if_expired(state, keystore, clock, proxy))
        except RenewalRefused as refused:
            if identity_status(refused) != DISABLED:
                raise
            wait = gate.remaining()
            log.warning("certificate recovery refused (%s); asking again in %.0f s", refused, wait)
            if on_disabled is not None:
                on_disabled(str(refused), wait)
        except TrustError:
            raise
        except OutpostError as error:
            if error.terminal:
                raise
            failures += 1
            ceiling = min(START_RECOVERY_MAX_WAIT, RETRY_BASE_SECONDS * 2 ** min(failures - 1, 30))
            delay = max(MIN_RETRY_SECONDS, rng.uniform(0.0, ceiling))
            log.warning("certificate recovery failed (%s); retrying in %.0f s", error, delay)
            if on_retry is not None:
                on_retry(f"the certificate expired and recovering it failed ({error}); retrying in {delay:.0f} s")
            await asyncio.sleep(delay)


def keeper_for_tunnel(state: StateDir, keystore: KeyStore, credentials: Any, stats: Any,
                      clock: Clock = LOCAL_TIME, proxy: ProxySettings = DIRECT,
                      gate: DisabledGate | None = None) -> CertificateKeeper:
    """A keeper wired to a running agent: renewed certificates go to ``credentials.chain_pem``
    (used by the next tunnel's AUTH; the current tunnel and its streams carry on), and
    ``stats.cert_not_after``, ``stats.next_renewal`` and ``stats.renewal_error`` to status."""

    def renewed(cert_pem: str) -> None:
        credentials.chain_pem = [cert_pem]

    def status(not_after: float, next_renewal: float, last_error: str | None) -> None:
        stats.cert_not_after = not_after
        stats.next_renewal = next_renewal
        stats.renewal_error = last_error

    return CertificateKeeper(state, keystore, clock=clock, on_renewed=renewed, on_status=status, proxy=proxy,
                             gate=gate)
