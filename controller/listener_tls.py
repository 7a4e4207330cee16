"""The listeners' TLS: the context (Outpost's ALPN first), and their certificate renewed while running."""

from __future__ import annotations

import asyncio
import datetime
import logging
import ssl
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from controller.bootstrap import listener_cert_lifetimes, server_names
from controller.ca import ensure_server_certificate, not_after_of
from controller.context import ControllerContext
from controller.listener import Listener
from shared.protocol import TUNNEL_ALPN

log = logging.getLogger(__name__)

#: A renewal of the listener's certificate that failed (a full disk) is tried
#: again after this long, or sooner when less life is left: often enough to
#: succeed long before expiry, seldom enough not to fill the log.
CERT_RENEW_RETRY_SECONDS = 3600.0
#: Never wake sooner than this for a renewal: a clock that jumped does not spin the loop.
CERT_RENEW_MIN_WAIT = 1.0
#: Nor later than this: the wall clock may be set (NTP's first sync) while we sleep on the monotonic one.
CERT_RENEW_MAX_WAIT = 3600.0
#: TLS 1.3 session tickets sent after each handshake: none. No client of the
#: listener resumes a session (the agent and aiohttp make a full handshake every
#: time), and the two tickets OpenSSL sends by default cost the relay about
#: 40 us of CPU per connection (an encryption and a write each), a sixth of
#: the handshake, paid 10,000 times when a fleet comes back.
SESSION_TICKETS = 0


def server_ssl_context(context: ControllerContext) -> ssl.SSLContext:
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.minimum_version = ssl.TLSVersion.TLSv1_2
    tls.load_cert_chain(str(context.settings.server_cert_path), str(context.settings.server_key_path))
    # The server's order wins: a client offering Outpost's ALPN gets a tunnel on TLS directly
    # (controller/listener.py); HTTP clients (browsers, aiohttp, curl) get HTTP as before. A
    # controller-only process does not offer it: an agent's auto transport then goes elsewhere.
    tunnels = [TUNNEL_ALPN] if context.settings.serves_tunnels else []
    tls.set_alpn_protocols([*tunnels, "http/1.1"])
    tls.num_tickets = SESSION_TICKETS
    return tls


async def renew_certificate(context: ControllerContext, guards: Sequence[Listener]) -> None:
    """Renew the listeners' certificate while running, well before it expires; live tunnels keep theirs."""
    settings = context.settings
    lifetime, renew_before = listener_cert_lifetimes(settings)
    while True:
        current = x509.load_der_x509_certificate(context.server_certificate_der)
        due = not_after_of(current) - renew_before
        wait = (due - datetime.datetime.now(datetime.UTC)).total_seconds()
        if wait > CERT_RENEW_MAX_WAIT:
            await asyncio.sleep(CERT_RENEW_MAX_WAIT)
            continue
        await asyncio.sleep(max(CERT_RENEW_MIN_WAIT, wait))
        try:
            use_certificate(context, guards, *await asyncio.to_thread(issue_certificate, context))
        except Exception as error:  # a full disk must not end the controller; it is retried
            left = (not_after_of(current) - datetime.datetime.now(datetime.UTC)).total_seconds()
            retry = max(CERT_RENEW_MIN_WAIT, min(CERT_RENEW_RETRY_SECONDS, left / 10))
            log.error("renewing the listener's certificate failed (%s); trying again in %g s, %g s before "
                      "it expires", error, retry, left)
            await asyncio.sleep(retry)


def issue_certificate(context: ControllerContext) -> tuple[x509.Certificate, ssl.SSLContext]:
    """A new listener certificate for the same key, written, and a TLS context holding it (a worker thread)."""
    settings = context.settings
    lifetime, renew_before = listener_cert_lifetimes(settings)
    cert, _ = ensure_server_certificate(
        context.ca, settings.server_cert_path, settings.server_key_path, server_names(settings),
        lifetime, renew_before, force=True,
    )
    return cert, server_ssl_context(context)


def use_certificate(context: ControllerContext, guards: Sequence[Listener], cert: x509.Certificate,
                    tls: ssl.SSLContext) -> None:
    """Every new TLS handshake gets ``cert``; live connections keep theirs (the event loop)."""
    context.previous_server_certificate_der = context.server_certificate_der
    context.server_certificate_der = cert.public_bytes(serialization.Encoding.DER)
    for guard in guards:
        guard.tls = tls
    for listener in context.certificate_listeners:
        listener(context.server_certificate_der)
    log.info("renewed the listener's certificate (serial %x, valid until %s UTC)", cert.serial_number,
             not_after_of(cert).strftime("%Y-%m-%d %H:%M"))
