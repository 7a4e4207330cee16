"""TLS to the controller and its relays, judged by trusted time: the one place that does it.

Every connection the agent makes after pinning the CA (enrollment, renewal,
the controller's time, tunnels, ``doctor``) goes through ``PinnedTLS``,
directly or through the HTTPS proxy (agent.proxy: the TLS session runs end
to end inside the proxy's CONNECT, and is checked the same way):

1. OpenSSL verifies the chain to the pinned CA (the only trust anchor), every
   signature, the key usages and the host name. It does not compare the
   validity dates with the system clock, because a gateway without a
   real-time clock may read 1970 (``pinned_ssl_context``).
2. ``PinnedTLS.check`` then verifies, before anything the peer says is
   believed: the served leaf is signed by the pinned CA itself (the chain
   ends at the leaf, never at "some certificate in the chain"), and the leaf
   and the CA are valid at trusted time (agent.clock.trusted.TrustedClock).

Nothing is switched off: the date comparison OpenSSL would make against the
system clock is made here against the clock the agent trusts. A date failure
blames the peer when the time was measured (TrustError) and the clock when it
was not (ClockError), in plain words either way.

The one connection made before a CA is pinned, ``fetch_pinned_ca``, is here
too: it takes the same proxy, and its answer is believed only if it matches
the token's fingerprint.
"""

from __future__ import annotations

import contextlib
import ssl
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from cryptography import x509

from agent.errors import ControllerUnreachable, EnrollmentError, ProxyFailed, TrustError
from agent.identity.https import Channel, ProxyRefused, ProxyUnreachable
from agent.identity.tls_trust import (
    check_dates,
    describe_network_error,
    peer_certificate,
    pinned_ssl_context,
    read_bounded,
    served_ssl_object,
    trust_error_for,
)
from agent.proxy import DIRECT, ProxyRoute, ProxySettings
from shared.trust import ca_fingerprint, verify_leaf_issued_by

if TYPE_CHECKING:
    import aiohttp  # ``doctor`` only: enrollment, renewal and the clock use agent/identity/https.py

#: What a request on the agent's own client raises for a network failure (agent/identity/http1.py calls a
#: malformed or cut-short answer a ConnectionError).
NETWORK_ERRORS = (TimeoutError, OSError)

#: A CA certificate in PEM is about 1 KiB; 16 KiB leaves room for long names
#: and still bounds what an unverified peer can make us read.
MAX_CA_RESPONSE = 16 * 1024
#: The unverified CA fetch is one small request; a controller that needs more
#: than this is unusable anyway, and the technician is waiting.
CA_FETCH_TIMEOUT = 10.0


class TimeSource(Protocol):
    """What certificate dates are judged by (agent.clock.trusted.TrustedClock is one)."""

    def now(self) -> float: ...

    @property
    def measured(self) -> bool:
        """True when ``now`` comes from NTP or the controller, not the local clock alone."""
        ...


@dataclass(frozen=True)
class FixedTime:
    """A moment the caller vouches for (an explicit ``now``, as tests and tools pass)."""

    moment: float
    measured: bool = True

    def now(self) -> float:
        return self.moment


@dataclass(frozen=True)
class UncheckedTime:
    """A clock nobody measured (by default the local one): date failures blame the clock."""

    read: Callable[[], float] = time.time
    measured: bool = False

    def now(self) -> float:
        return self.read()


LOCAL_TIME = UncheckedTime()
Clock = TimeSource | Callable[[], float]


def as_time_source(clock: Clock | None) -> TimeSource:
    """``clock`` as a TimeSource; a bare callable counts as an unmeasured clock."""
    if clock is None:
        return LOCAL_TIME
    if hasattr(clock, "now") and hasattr(clock, "measured"):
        return clock
    return UncheckedTime(clock)


@dataclass(frozen=True)
class Served:
    """One HTTP answer over a checked channel, and the certificate it came with."""

    status: int
    body: bytes
    certificate: x509.Certificate


class PinnedTLS:
    """The pinned CA, the time that judges dates and the proxy connections take; see the module docstring.

    ``time=None`` is for exactly one caller, the controller's-time fetch that
    bootstraps trusted time: it checks the reported time against the served
    certificates instead (agent.clock.controller_time), because there is no
    trusted time yet to check the certificates with.
    """

    def __init__(self, ca_pem: str, time: TimeSource | None = LOCAL_TIME, proxy: ProxySettings = DIRECT) -> None:
        self.ca_pem = ca_pem
        self.ca_certificate = x509.load_pem_x509_certificate(ca_pem.encode())
        self.time = time
        self.proxy = proxy
        self._context: ssl.SSLContext | None = None

    def context(self) -> ssl.SSLContext:
        """The client TLS context; every connection made with it must pass ``check``."""
        if self._context is None:
            self._context = pinned_ssl_context(self.ca_pem)
        return self._context

    def check(self, ssl_object: ssl.SSLObject | ssl.SSLSocket | None, who: str) -> x509.Certificate:
        """The peer's leaf, once it is the pinned CA's own and valid at trusted time; else TrustError/ClockError."""
        leaf = peer_certificate(ssl_object, who)
        if not verify_leaf_issued_by(leaf, self.ca_certificate):
            raise TrustError(f"{who} presented a certificate not signed by the pinned controller CA; "
                             "check the address, or whether something intercepts TLS")
        if self.time is not None:
            now = self.time.now()
            for cert, what in ((leaf, f"{who} presented a certificate"),
                               (self.ca_certificate, "the pinned controller CA is")):
                check_dates(cert, now, what, self.time.measured)
        return leaf

    @contextlib.asynccontextmanager
    async def session(self, timeout: float) -> AsyncIterator[aiohttp.ClientSession]:
        """An aiohttp session on ``context()``, one connection at a time; raises aiohttp's own errors.

        The environment is never read here (``trust_env=False``): the proxy
        is ``self.proxy``, decided at the edge. One connection means that
        requests in a row share it, so a check on the first covers the rest.
        """
        import aiohttp

        connector = aiohttp.TCPConnector(ssl=self.context(), limit=1)
        async with aiohttp.ClientSession(connector=connector, trust_env=False,
                                         timeout=aiohttp.ClientTimeout(total=timeout)) as http:
            yield http

    async def fetch(self, http: aiohttp.ClientSession, method: str, url: str, limit: int, who: str,
                    body: Any = None) -> Served:
        """One request, through the proxy where it applies; the answer is read (at most ``limit``
        bytes) only after the certificate of the TLS session it came over passed ``check``."""
        async with http.request(method, url, json=body, **self.proxy.request_options(url)) as response:
            leaf = self.check(served_ssl_object(response), who)
            raw = await read_bounded(response, limit, url)
            return Served(response.status, raw, leaf)

    @contextlib.asynccontextmanager
    async def client(self, controller_url: str, timeout: float, unreachable: str) -> AsyncIterator[PinnedClient]:
        """HTTP requests to ``controller_url`` over one checked connection (agent/identity/https.py).

        The connection's certificate passes ``check`` before any request is
        sent. ``unreachable`` is the sentence for a network failure, with
        ``{reason}`` where the short cause goes; a proxy that cannot be
        reached or refuses is ProxyFailed with its own sentence; a TLS
        failure becomes the plain TrustError of ``trust_error_for``.
        """
        who = f"the controller at {controller_url}"
        channel = Channel(controller_url, self.context(), self.proxy, timeout)
        try:
            try:
                ssl_socket = await channel.connect()
                leaf = self.check(ssl_socket, who)
                yield PinnedClient(channel, leaf)
            except ssl.SSLCertVerificationError as error:
                raise trust_error_for(error, controller_url) from None
            except NETWORK_ERRORS as error:
                raise network_failure(error, self.proxy.route(controller_url), who, unreachable) from None
        finally:
            channel.close()


class PinnedClient:
    """Requests over a ``PinnedTLS.client`` connection, whose certificate was checked before the first."""

    def __init__(self, channel: Channel, certificate: x509.Certificate) -> None:
        self.channel = channel
        self.certificate = certificate

    async def get(self, url: str, limit: int) -> Served:
        return await self.request("GET", url, limit)

    async def post(self, url: str, body: Any, limit: int) -> Served:
        return await self.request("POST", url, limit, body)

    async def request(self, method: str, url: str, limit: int, body: Any = None) -> Served:
        answer = await self.channel.request(method, url, limit, body)
        return Served(answer.status, answer.body, self.certificate)


def proxy_failure(error: BaseException, route: ProxyRoute | None, who: str) -> ProxyFailed | None:
    """ProxyFailed when ``error`` is the proxy's doing on the way to ``who``, else None."""
    if route is None:
        return None
    if isinstance(error, ProxyRefused):
        return ProxyFailed(route.refused(error.status, who), error.status)
    if isinstance(error, ProxyUnreachable):
        return ProxyFailed(route.unreachable(describe_network_error(error)))
    aiohttp = sys.modules.get("aiohttp")  # its errors only where it was used (a WebSocket, doctor)
    if aiohttp is None:
        return None
    if isinstance(error, aiohttp.ClientHttpProxyError):
        return ProxyFailed(route.refused(error.status, who), error.status)
    if isinstance(error, aiohttp.ClientProxyConnectionError):
        return ProxyFailed(route.unreachable(describe_network_error(error)))
    return None


def network_failure(error: BaseException, route: ProxyRoute | None, who: str, unreachable: str) -> ControllerUnreachable:
    """The error for a connection to ``who`` that failed with ``error``: the proxy's fault (ProxyFailed),
    or ``unreachable`` with ``{reason}`` filled in (naming the proxy it went through, if any)."""
    failure = proxy_failure(error, route, who)
    if failure is not None:
        return failure
    reason = describe_network_error(error)
    if route is not None:
        reason = f"{reason}, through the proxy {route.url}"
    return ControllerUnreachable(unreachable.format(reason=reason))


def _unverified_ssl_context() -> ssl.SSLContext:
    # Used for exactly one request whose answer is checked against the token's
    # fingerprint before it is believed; nothing else may use this context.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


async def fetch_pinned_ca(base_url: str, expected_fingerprint: str, proxy: ProxySettings = DIRECT) -> x509.Certificate:
    """Fetch ``GET {base_url}/v1/ca`` unverified and return it only if its fingerprint matches.

    Raises TrustError on a fingerprint mismatch or a non-certificate answer,
    ControllerUnreachable (ProxyFailed for the proxy's doing) when the
    controller cannot be reached.
    """
    url = base_url.rstrip("/") + "/v1/ca"
    channel = Channel(url, _unverified_ssl_context(), proxy, CA_FETCH_TIMEOUT)
    try:
        await channel.connect()
        answer = await channel.request("GET", url, MAX_CA_RESPONSE)
    except NETWORK_ERRORS as error:
        raise network_failure(error, proxy.route(url), f"the controller at {base_url}",
                              f"could not reach the controller at {url} ({{reason}}); "
                              "check the network and the address in the token, then try again") from None
    finally:
        channel.close()
    body, status = answer.body, answer.status
    if status != 200:
        raise EnrollmentError(
            f"the server at {url} answered HTTP {status} instead of the CA certificate; check the address in the token"
        )
    try:
        ca_cert = x509.load_pem_x509_certificate(body)
    except ValueError:
        raise TrustError(
            f"the server at {url} did not answer with a CA certificate; check the address in the token"
        ) from None
    actual = ca_fingerprint(ca_cert)
    if actual != expected_fingerprint.lower():
        raise TrustError(
            f"wrong CA fingerprint: the controller at {base_url} serves a CA with {actual}, "
            f"but the token pins {expected_fingerprint}; the token was made for another controller "
            "or someone is in between; check the address or ask central ops for a new token"
        )
    return ca_cert
