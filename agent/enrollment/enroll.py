"""The enrollment exchange: token file in, enrolled identity stored.

Order matters for safety: pin the CA from the token's fingerprint, verify the
token with that CA, and only then send the token anywhere. The key is created
once and kept across retries, because the controller redeems a consumed token
again only for the same public key (an agent that crashed before storing its
certificate). ``identity.json`` is written last: until it exists the gateway
is not enrolled, whatever else is in the state directory. Every request (the
CA fetch, the controller's time, the redemption) takes the same HTTPS proxy
decision (agent.proxy).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.clock.measure import refresh_clock
from agent.clock.trusted import TrustedClock
from agent.enrollment.token import EnrollmentToken, parse_unverified, read_token_file, verify_token
from agent.errors import ClockError, DeviceKeyLost, EnrollmentError, OutpostError, TokenError
from agent.identity.csr import build_csr
from agent.identity.exchange import Wording, accept_certificate, post_csr, relay_list
from agent.identity.keystore import KeyStore
from agent.identity.pinned_tls import LOCAL_TIME, FixedTime, PinnedTLS, TimeSource, fetch_pinned_ca
from agent.identity.select import KeyStoreSettings, open_keystore
from agent.identity.state import EnrolledIdentity, StateDir
from agent.proxy import DIRECT, ProxySettings
from shared.fsutil import ensure_private_dir
from shared.utc import format_utc as _utc

#: The controller's codes for a token it will not redeem (docs/api.md).
TOKEN_ERROR_CODES = frozenset({
    "token_malformed", "token_signature", "token_expired", "token_used", "token_unknown", "token_superseded",
    "token_issuer",
})
#: What enrollment says where the exchange with the controller fails (agent.identity.exchange).
ENROLLMENT = Wording(
    unreachable="could not reach the controller at {url} ({{reason}}); check the network and try again",
    not_an_answer=("the controller at {url} answered with something that is not an enrollment result; "
                   "ask central ops whether it runs a compatible version"),
    failed="the controller at {url} failed (HTTP {status}); try again later",
    refused="the controller at {url} refused enrollment (HTTP {status}); ask central ops",
    no_certificate=("the controller at {url} did not return a certificate; "
                    "ask central ops whether it runs a compatible version"),
    other_ca=("the controller at {url} returned a certificate not issued by the CA pinned from your token; "
              "check the token or the address"),
    other_key="the controller at {url} returned a certificate for another key; ask central ops",
    other_identity="the controller at {url} returned a certificate that does not name the identity it reported",
)
#: Gateway and controller clocks may disagree by this much. An unchecked local
#: clock further behind the token's issue time is not set yet (no RTC, no NTP
#: yet); the controller backdates certificates by the same five minutes.
CLOCK_TOLERANCE = 300.0


def enroll(
    token_path: Path,
    state_dir: Path,
    keystore_settings: KeyStoreSettings,
    now: float | None = None,
    clock: TrustedClock | None = None,
    proxy: ProxySettings = DIRECT,
) -> EnrolledIdentity:
    """Enroll this gateway from a token file (blocking; see ``enroll_async``)."""
    return asyncio.run(enroll_async(token_path, state_dir, keystore_settings, now, clock, proxy))


async def enroll_async(
    token_path: Path,
    state_dir: Path,
    keystore_settings: KeyStoreSettings,
    now: float | None = None,
    clock: TrustedClock | None = None,
    proxy: ProxySettings = DIRECT,
) -> EnrolledIdentity:
    """Enroll this gateway from a token file and store the identity atomically.

    ``clock`` is measured against NTP and the controller (once the CA is
    pinned) and judges the token's expiry and the controller's certificate;
    ``now`` (unix seconds) overrides it; with neither, the local clock is used.
    Every request goes through ``proxy`` where it applies (its refusal is
    ProxyFailed, a ControllerUnreachable: the token stays usable).
    A clock that cannot be trusted at all raises ClockError. Raises TokenError, TrustError,
    EnrollmentError, ControllerUnreachable or a KeyStoreError; on any failure
    the state directory is left not enrolled and the key is kept for a retry.
    """
    state = StateDir(Path(state_dir))
    _refuse_if_enrolled(state)
    text = read_token_file(Path(token_path))
    token = parse_unverified(text)
    ca_cert = await fetch_pinned_ca(token.controller_url, token.ca, proxy)
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM).decode()
    trusted: TimeSource = FixedTime(now) if now is not None else clock if clock is not None else LOCAL_TIME
    if clock is not None and now is None:
        await refresh_clock(clock, token.controller_url, ca_pem, proxy)
    if trusted.measured:
        verify_token(text, ca_cert, trusted.now())
    else:
        verify_token(text, ca_cert, None)
        _refuse_unchecked_clock(token, trusted.now())

    # The key store first: a TPM that is required but absent must leave no state directory behind.
    keystore = open_keystore(state.path, keystore_settings)
    ensure_private_dir(state.path)
    try:
        public_key = _device_public_key(keystore)
        csr = build_csr(keystore, token.sub)
        answer = await _redeem(token, csr, PinnedTLS(ca_pem, trusted, proxy))
        identity = _accept(answer, token, ca_cert, ca_pem, public_key, keystore.backend, trusted)
        state.save_enrollment(identity)
    finally:
        keystore.close()
    return identity


def clock_unset_reason(issued_at: float, now: float) -> str | None:
    """Why an unchecked local clock reading ``now`` is not set yet for a token issued at ``issued_at``, or None."""
    if now + CLOCK_TOLERANCE >= issued_at:
        return None
    return (
        f"this gateway's clock reads {_utc(now)}, before the token was issued ({_utc(issued_at)}); "
        "waiting for the clock to be set (check that NTP, UDP port 123, can get out)"
    )


def _refuse_unchecked_clock(token: EnrollmentToken, now: float) -> None:
    """ClockError (retryable) where an unchecked clock would otherwise judge the token wrongly."""
    reason = clock_unset_reason(token.iat, now)
    if reason is not None:
        raise ClockError(reason)
    if token.exp <= now:
        # Expired by a clock nobody checked: a clock a year ahead looks just like this, so it is not
        # a verdict on the token; a retry once NTP or the controller's time is reachable settles it.
        raise ClockError(
            f"this token expired on {_utc(token.exp)} by this gateway's clock, which could not be checked "
            f"(it reads {_utc(now)}; no NTP server answered and the controller's time could not be used); "
            "if that date is still ahead, set the clock or allow NTP (UDP port 123), "
            "otherwise ask central ops for a new token"
        )


def _refuse_if_enrolled(state: StateDir) -> None:
    if not state.is_enrolled():
        return
    try:
        who = state.load().uri
    except Exception:  # a damaged state still counts as enrolled: never overwrite it
        who = f"the identity in {state.path}"
    raise EnrollmentError(
        f"this gateway is already enrolled as {who}; to enroll it again, stop outpost-agent "
        f"and remove the state directory {state.path} first"
    )


def _device_public_key(keystore: KeyStore) -> ec.EllipticCurvePublicKey:
    # A key left by an unfinished enrollment is reused: the controller redeems a
    # consumed token again only for the same key.
    if not keystore.exists():
        keystore.create()
        return keystore.public_key()
    try:
        public_key = keystore.public_key()
        keystore.sign(b"outpost-agent enrollment check")  # a TPM cleared since the last try lost it
        return public_key
    except DeviceKeyLost:
        # Not enrolled yet, so nothing depends on that key: start with a new one.
        keystore.delete()
        keystore.create()
        return keystore.public_key()


async def _redeem(token: EnrollmentToken, csr: x509.CertificateSigningRequest, tls: PinnedTLS) -> dict[str, Any]:
    body = {"token": token.text, "csr": csr.public_bytes(serialization.Encoding.PEM).decode()}
    # The controller's certificate is judged on a small request (/v1/ca) first, so the token goes out
    # only on a connection that passed.
    return await post_csr(tls, token.controller_url, "/v1/enroll", body, ENROLLMENT, _token_refusal, probe="/v1/ca")


def _token_refusal(code: object, sentence: str) -> OutpostError | None:
    """A refused token is a TokenError (the field loop then waits for another token)."""
    return TokenError(sentence) if code in TOKEN_ERROR_CODES else None


def _accept(
    answer: dict[str, Any],
    token: EnrollmentToken,
    ca_cert: x509.Certificate,
    ca_pem: str,
    public_key: ec.EllipticCurvePublicKey,
    key_backend: str,
    time: TimeSource,
) -> EnrolledIdentity:
    """Check the controller's answer against what we pinned and hold; build the identity."""
    url = token.controller_url
    uri = answer.get("identity")
    cert = accept_certificate(answer, url, ca_cert, public_key, uri, time, ENROLLMENT)
    if answer.get("name", token.sub) != token.sub or answer.get("tenant", token.tnt) != token.tnt:
        raise EnrollmentError(f"the controller at {url} enrolled another identity than the token names; ask central ops")
    return EnrolledIdentity(
        name=token.sub,
        tenant=token.tnt,
        uri=str(uri),
        controller_url=url,
        relays=relay_list(answer, url),
        ca_pem=ca_pem,
        cert_pem=cert.public_bytes(serialization.Encoding.PEM).decode(),
        key_backend=key_backend,
        enrolled_at=time.now(),
    )
