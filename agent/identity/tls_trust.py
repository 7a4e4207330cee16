"""Trusting the controller: the CA pinned from the enrollment token.

Before enrollment the agent knows only the token's claim ``ca`` (the SHA-256
of the CA certificate). It fetches the CA once without verification and keeps
it only if the fingerprint matches (agent.identity.pinned_tls.fetch_pinned_ca);
from then on every TLS connection trusts that CA and nothing else, and every
certificate check ends at the leaf.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from typing import TYPE_CHECKING

from cryptography import x509

from agent.errors import ClockError, EnrollmentError, TrustError
from shared.trust import cert_not_after, cert_not_before
from shared.utc import format_utc as _utc

if TYPE_CHECKING:
    import aiohttp  # only ``doctor``'s requests are aiohttp's (agent/identity/https.py does the rest)

# OpenSSL verify codes for a certificate that names another host or address.
_X509_V_ERR_HOSTNAME_MISMATCH = 62
_X509_V_ERR_IP_ADDRESS_MISMATCH = 64
#: OpenSSL's X509_V_FLAG_NO_CHECK_TIME (x509_vfy.h, OpenSSL 1.1.0 and later);
#: Python's ssl module has no name for it. It skips only the comparison of
#: validity dates with the system clock; chain, signatures and host name are
#: still verified, and the dates are then checked against trusted time
#: (agent.identity.pinned_tls).
X509_V_FLAG_NO_CHECK_TIME = 0x200000


def pinned_ssl_context(ca_pem: str) -> ssl.SSLContext:
    """A client TLS context that trusts only ``ca_pem``, checks host names, TLS 1.2+.

    OpenSSL verifies the chain, every signature and the host name, but does
    not read the system clock (a gateway's may say 1970): the caller MUST
    judge the dates with trusted time right after the handshake, which
    agent.identity.pinned_tls.PinnedTLS does for every connection the agent makes.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cadata=ca_pem)
    context.verify_flags |= X509_V_FLAG_NO_CHECK_TIME
    return context


def peer_certificate(ssl_object: ssl.SSLObject | ssl.SSLSocket | None, who: str) -> x509.Certificate:
    """The leaf certificate the peer presented in this TLS session."""
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    if not der:
        raise TrustError(f"{who} presented no certificate; check the address")
    return x509.load_der_x509_certificate(der)


def served_ssl_object(response: aiohttp.ClientResponse) -> ssl.SSLObject | None:
    """The TLS session an HTTP answer came over (for ``PinnedTLS.check``).

    aiohttp hands a small, fully read answer back with its connection already
    released, so ``response.connection`` is often None; the protocol it was
    read from stays on the response (aiohttp 3.8 to 3.14, covered by tests).
    Through a CONNECT proxy it is the same: aiohttp wraps the tunnelled
    socket with ``loop.start_tls`` and hands the resulting TLS transport to a
    fresh protocol, whose ``ssl_object`` is the session with the far end.
    """
    connection = response.connection
    transport = connection.transport if connection is not None else None
    if transport is None:
        protocol = getattr(response, "_protocol", None)
        transport = getattr(protocol, "transport", None)
    return transport.get_extra_info("ssl_object") if transport is not None else None


def check_dates(cert: x509.Certificate, now: float, what: str, time_measured: bool) -> None:
    """Raise TrustError or ClockError unless ``cert`` is valid at ``now``.

    ``time_measured`` says whether ``now`` came from NTP or the controller
    (then a failure is the peer's: TrustError) or only from the local clock
    (then the clock is the likely culprit: ClockError).
    """
    not_before, not_after = cert_not_before(cert), cert_not_after(cert)
    if not_before.timestamp() <= now <= not_after.timestamp():
        return
    span = f"valid from {_utc(not_before.timestamp())} to {_utc(not_after.timestamp())}"
    if not time_measured:
        raise ClockError(
            f"{what} {span}, but this gateway's clock reads {_utc(now)}; the clock is probably wrong and "
            "could not be checked (no NTP server answered and the controller's time could not be used); "
            "set the clock or allow NTP (UDP port 123), then try again"
        )
    state = "not yet valid" if now < not_before.timestamp() else "expired"
    raise TrustError(
        f"{what} {span}: {state} at the checked time {_utc(now)}; "
        "ask central ops to renew the controller's certificates"
    )


def trust_error_for(error: BaseException, url: str) -> TrustError:
    """The plain sentence for a TLS certificate failure against the pinned CA."""
    cause = getattr(error, "certificate_error", error)
    code = getattr(cause, "verify_code", None)
    if code in (_X509_V_ERR_HOSTNAME_MISMATCH, _X509_V_ERR_IP_ADDRESS_MISMATCH):
        return TrustError(
            f"the controller at {url} presented a certificate for another host name or address; "
            "check the address in the token or the controller's --listen name"
        )
    return TrustError(
        f"the controller at {url} presented a certificate not issued by the CA pinned from your token; "
        "check the token or the address"
    )


async def read_bounded(response: aiohttp.ClientResponse, limit: int, url: str) -> bytes:
    """The response body, refusing one longer than ``limit`` bytes."""
    if response.content_length is not None and response.content_length > limit:
        raise EnrollmentError(f"the answer from {url} is larger than {limit} bytes; check the address in the token")
    chunks: list[bytes] = []
    total = 0
    async for chunk in response.content.iter_chunked(4096):
        total += len(chunk)
        if total > limit:
            raise EnrollmentError(f"the answer from {url} is larger than {limit} bytes; check the address in the token")
        chunks.append(chunk)
    return b"".join(chunks)


def describe_network_error(error: BaseException) -> str:
    """A short reason for a network failure, without a traceback."""
    if isinstance(error, asyncio.TimeoutError):
        return "timed out"
    for candidate in (getattr(error, "os_error", None), error):
        if isinstance(candidate, OSError):
            # asyncio's strerror repeats the address; the errno's own text reads better.
            if candidate.errno:
                return os.strerror(candidate.errno).lower()
            if candidate.strerror:
                return candidate.strerror.lower()
    text = str(error).strip().splitlines()
    return text[0][:200] if text else type(error).__name__
