"""Renewing the certificate now: one ``POST /v1/renew``, the answer checked, the result stored.

The request is the exchange of agent.identity.exchange (as enrollment's),
over TLS pinned to the enrollment CA and through the HTTPS proxy where it
applies; the same request recovers a certificate that already expired (the
controller decides which within its grace period). When to renew is
agent.identity.renewal_schedule, the loop agent.identity.keeper, recovery at
start agent.identity.recovery.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent.errors import EXIT_IDENTITY_REFUSED, OutpostError
from agent.identity.csr import build_csr
from agent.identity.exchange import Wording, accept_certificate, post_csr, relay_list
from agent.identity.keystore import KeyStore
from agent.identity.pinned_tls import LOCAL_TIME, Clock, PinnedTLS, as_time_source
from agent.identity.refusals import DISABLED, REVOKED
from agent.identity.state import StateDir
from agent.proxy import DIRECT, ProxySettings

log = logging.getLogger(__name__)

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
    _keep_relays(state, answer, identity.controller_url, identity.relays)
    return cert


def _keep_relays(state: StateDir, answer: Mapping[str, Any], url: str, enrolled: list[str]) -> None:
    """The controller's relay list from a renewal, for the next start (the running tunnel learns it in AUTH_OK).

    Written only when it changed: the state directory may be an SD card that
    wears with every write. A list that cannot be read costs the renewal
    nothing: the certificate is what it was for, and the stored list stays.
    """
    try:
        relays = relay_list(answer, url)
        if relays and relays != (state.load_relays() or enrolled):
            state.save_relays(relays)
    except (OutpostError, OSError) as error:
        log.warning("the relay list of the renewal was not kept: %s", error)
