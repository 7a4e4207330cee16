"""The exchange with the controller that ends in a certificate: enrollment, renewal and recovery.

One shape for all three: a CSR signed in the key store is posted over TLS
pinned to the enrollment CA (through the HTTPS proxy where it applies), a
refusal is read one way, and the certificate that comes back passes one set
of checks: issued by the pinned CA itself, for the device key (SubjectPublicKeyInfo
equal), naming the identity, and not already expired by trusted time.

The one rule for dates: a certificate that looks expired by a clock nobody
could check says more about the clock than about the controller, so it is a
``ClockError`` (retryable; set the clock or allow NTP), exactly as a token
that looks expired by such a clock is. By a measured clock it is the
controller's fault (``EnrollmentError``: ask central ops). Each caller keeps
its own words (``Wording``) and its own specific refusals (``Classify``), on
which its exit codes depend; the checks and the rule are these.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.errors import ClockError, ControllerUnreachable, EnrollmentError, OutpostError, TrustError
from agent.identity.pinned_tls import PinnedTLS, TimeSource
from shared import libcrypto
from shared.trust import cert_not_after, verify_leaf_issued_by

#: One request that signs a certificate; a controller slower than this on a
#: working link is overloaded, and a retry later is the better answer.
EXCHANGE_TIMEOUT = 30.0
#: Certificate, CA and relay list fit in a few KiB; 64 KiB bounds a hostile answer.
MAX_ANSWER = 64 * 1024
#: A controller's sentence is one line; a longer one is cut so a terminal and the logs stay readable.
MAX_CONTROLLER_MESSAGE = 300
#: More relays than a fleet would ever run; bounds what enrollment stores.
MAX_RELAYS = 64
#: A relay URL longer than this is not an address anyone typed.
MAX_RELAY_URL = 2048

#: The error for a controller's refusal code, given the sentence to carry; None for the general rule.
Classify = Callable[[object, str], "OutpostError | None"]


@dataclass(frozen=True)
class Wording:
    """The sentences of one kind of exchange; ``{url}``, ``{status}``, ``{uri}`` are filled in.

    ``unreachable`` keeps ``{{reason}}`` for PinnedTLS.client to fill.
    """

    unreachable: str
    not_an_answer: str
    failed: str
    refused: str
    no_certificate: str
    other_ca: str
    other_key: str
    other_identity: str


async def post_csr(tls: PinnedTLS, controller_url: str, path: str, body: Mapping[str, Any], wording: Wording,
                   classify: Classify, *, probe: str | None = None) -> dict[str, Any]:
    """POST ``body`` (carrying the CSR) to ``controller_url + path``; the JSON answer, or the refusal's error.

    ``probe`` is a path fetched first on the same connection, so the
    controller's certificate is judged (chain, then dates by trusted time) on
    a small request before anything secret goes out.
    """
    base = controller_url.rstrip("/")
    url = base + path
    async with tls.client(controller_url, EXCHANGE_TIMEOUT, wording.unreachable.format(url=url)) as channel:
        if probe is not None:
            await channel.get(base + probe, MAX_ANSWER)
        served = await channel.post(url, dict(body), MAX_ANSWER)
    try:
        answer = json.loads(served.body)
    except ValueError:
        answer = None
    if served.status != 200:
        raise controller_refusal(served.status, answer, url, wording, classify)
    if not isinstance(answer, dict):
        raise EnrollmentError(wording.not_an_answer.format(url=url))
    return answer


def controller_refusal(status: int, answer: object, url: str, wording: Wording, classify: Classify) -> OutpostError:
    """The error for a non-200 answer: the controller's own sentence where it gave one.

    The caller's codes first (``classify``); then a server failure is
    retryable (ControllerUnreachable), anything else an EnrollmentError.
    """
    code = answer.get("error") if isinstance(answer, dict) else None
    message = answer.get("message") if isinstance(answer, dict) else None
    if isinstance(message, str) and message.strip():
        sentence = " ".join(message.split())[:MAX_CONTROLLER_MESSAGE]
    elif status >= 500:
        sentence = wording.failed.format(url=url, status=status)
    else:
        sentence = wording.refused.format(url=url, status=status)
    specific = classify(code, sentence)
    if specific is not None:
        return specific
    if status >= 500:
        return ControllerUnreachable(sentence)
    return EnrollmentError(sentence)


def accept_certificate(answer: Mapping[str, Any], controller_url: str, ca_cert: x509.Certificate,
                       public_key: ec.EllipticCurvePublicKey, uri: object, time: TimeSource,
                       wording: Wording) -> x509.Certificate:
    """The answer's certificate, once it is the pinned CA's, for ``public_key`` and ``uri``, and not expired."""
    url = controller_url
    pem = answer.get("certificate")
    try:
        cert = x509.load_pem_x509_certificate(pem.encode()) if isinstance(pem, str) else None
    except ValueError:
        cert = None
    if cert is None:
        raise EnrollmentError(wording.no_certificate.format(url=url))
    if not verify_leaf_issued_by(cert, ca_cert):
        raise TrustError(wording.other_ca.format(url=url))
    if certificate_spki(cert) != spki(public_key):
        raise EnrollmentError(wording.other_key.format(url=url))
    if not isinstance(uri, str) or uri not in uri_names(cert):
        raise EnrollmentError(wording.other_identity.format(url=url, uri=uri))
    refuse_expired(cert, url, time)
    return cert


def refuse_expired(cert: x509.Certificate, url: str, time: TimeSource) -> None:
    """The one rule for a certificate that is expired on arrival (see the module docstring)."""
    if cert_not_after(cert).timestamp() > time.now():
        return
    if not time.measured:
        raise ClockError(
            f"the controller at {url} returned a certificate that has already expired by this gateway's clock, "
            "which could not be checked; set the clock or allow NTP (UDP port 123)"
        )
    raise EnrollmentError(f"the controller at {url} returned a certificate that has already expired; ask central ops")


def relay_list(answer: Mapping[str, Any], url: str) -> list[str]:
    """The answer's relay URLs (``wss://`` with a host), bounded; EnrollmentError otherwise."""
    relays = answer.get("relays", [])
    if not isinstance(relays, list) or len(relays) > MAX_RELAYS or not all(_is_relay_url(r) for r in relays):
        raise EnrollmentError(f"the controller at {url} returned an invalid relay list; ask central ops")
    return [str(r) for r in relays]


def certificate_spki(cert: x509.Certificate) -> bytes:
    """``spki(cert.public_key())``, through libcrypto where it can: that call loads cryptography 38's backend."""
    try:
        return libcrypto.Certificate(cert.public_bytes(serialization.Encoding.DER)).spki()
    except (libcrypto.Unavailable, ValueError):
        return spki(cert.public_key())


def spki(key: Any) -> bytes:
    """DER SubjectPublicKeyInfo: two keys are the same key exactly when these are equal."""
    der: bytes = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return der


def uri_names(cert: x509.Certificate) -> list[str]:
    """The certificate's URI SANs (the identity's ``spiffe://`` name among them)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    names: list[str] = san.get_values_for_type(x509.UniformResourceIdentifier)
    return names


def _is_relay_url(value: object) -> bool:
    if not isinstance(value, str) or len(value) > MAX_RELAY_URL:
        return False
    parts = urlsplit(value)
    return parts.scheme == "wss" and bool(parts.hostname)
