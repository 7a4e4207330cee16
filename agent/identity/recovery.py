"""Recovery at start: a certificate that expired while the gateway was offline is renewed
by proof of the enrolled key before the first tunnel, which could not authenticate with it."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable

from agent.errors import OutpostError, TrustError
from agent.identity.keystore import KeyStore
from agent.identity.pinned_tls import LOCAL_TIME, Clock, as_time_source
from agent.identity.refusals import DISABLED, DisabledGate, identity_status
from agent.identity.renewal import RenewalRefused, renew_certificate
from agent.identity.renewal_schedule import MIN_RETRY_SECONDS, RETRY_BASE_SECONDS, RenewalSchedule
from agent.identity.state import StateDir
from agent.proxy import DIRECT, ProxySettings
from shared.service_manager import EVENT_RENEWED, journal_fields
from shared.trust import cert_not_after

log = logging.getLogger(__name__)


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
