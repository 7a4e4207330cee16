"""The certificate keeper: sleep until the schedule says, renew, store, hand the certificate on; repeat.

The keeper plans on trusted time and follows a corrected clock (it never
sleeps more than ``MAX_SLEEP_SECONDS`` at a time). While the identity is
disabled it asks through the gate it shares with the tunnel, so the two ask
once per interval between them (agent.identity.refusals).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent.errors import OutpostError, TrustError
from agent.identity.keystore import KeyStore
from agent.identity.pinned_tls import LOCAL_TIME, Clock, as_time_source
from agent.identity.refusals import DISABLED, DisabledGate, identity_status
from agent.identity.renewal import RenewalRefused, renew_certificate
from agent.identity.renewal_schedule import RenewalSchedule
from agent.identity.state import StateDir
from agent.proxy import DIRECT, ProxySettings
from shared.service_manager import EVENT_RENEWED, journal_fields
from shared.trust import cert_not_after

log = logging.getLogger(__name__)

#: The keeper sleeps at most this long at a time and looks at the clock again:
#: a corrected (trusted) clock moves "now" and the plan must follow it.
MAX_SLEEP_SECONDS = 60.0


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


class PresentedChain(Protocol):
    """Where the next tunnel finds the certificate it presents (agent.tunnel.client.TunnelCredentials)."""

    chain_pem: list[str]


class RenewalStatus(Protocol):
    """Where ``run`` reports renewal (agent.tunnel.status.TunnelStats)."""

    cert_not_after: float | None
    next_renewal: float | None
    renewal_error: str | None


def keeper_for_tunnel(state: StateDir, keystore: KeyStore, credentials: PresentedChain,
                      stats: RenewalStatus,
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
