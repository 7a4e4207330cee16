"""TLS to the controller and its relays, judged by trusted time: the one place that does it.

Every connection the agent makes after pinning the CA (enrollment, renewal,
the controller's time, tunnels, ``doctor``) goes through ``PinnedTLS``:

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
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Protocol, Union

import aiohttp
from cryptography import x509

from agent.errors import ControllerUnreachable, TrustError
from agent.identity.trust import (
    check_dates,
    describe_network_error,
    peer_certificate,
    pinned_ssl_context,
    read_bounded,
    served_ssl_object,
    trust_error_for,
    verify_leaf_issued_by,
)


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
Clock = Union[TimeSource, Callable[[], float]]


def as_time_source(clock: Clock | None) -> TimeSource:
    """``clock`` as a TimeSource; a bare callable counts as an unmeasured clock."""
    if clock is None:
        return LOCAL_TIME
    if hasattr(clock, "now") and hasattr(clock, "measured"):
        return clock  # type: ignore[return-value]
    return UncheckedTime(clock)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Served:
    """One HTTP answer over a checked channel, and the certificate it came with."""

    status: int
    body: bytes
    certificate: x509.Certificate


class PinnedTLS:
    """The pinned CA and the time that judges dates; see the module docstring.

    ``time=None`` is for exactly one caller, the controller's-time fetch that
    bootstraps trusted time: it checks the reported time against the served
    certificates instead (agent.clock.controller_time), because there is no
    trusted time yet to check the certificates with.
    """

    def __init__(self, ca_pem: str, time: TimeSource | None = LOCAL_TIME) -> None:
        self.ca_pem = ca_pem
        self.ca_certificate = x509.load_pem_x509_certificate(ca_pem.encode())
        self.time = time
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
    async def client(self, controller_url: str, timeout: float, unreachable: str) -> AsyncIterator["PinnedClient"]:
        """HTTP requests to ``controller_url`` over one checked connection.

        ``unreachable`` is the sentence for a network failure, with
        ``{reason}`` where the short cause goes; a TLS failure becomes the
        plain TrustError of ``trust_error_for``. The proxy environment is not
        read here (the edge decides about proxies).
        """
        connector = aiohttp.TCPConnector(ssl=self.context(), limit=1)
        try:
            async with aiohttp.ClientSession(connector=connector, trust_env=False,
                                             timeout=aiohttp.ClientTimeout(total=timeout)) as http:
                yield PinnedClient(self, http, f"the controller at {controller_url}")
        except aiohttp.ClientConnectorCertificateError as error:
            raise trust_error_for(error, controller_url) from None
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as error:
            raise ControllerUnreachable(unreachable.format(reason=describe_network_error(error))) from None


class PinnedClient:
    """Requests over a ``PinnedTLS.client`` session; each answer's certificate is checked first."""

    def __init__(self, tls: PinnedTLS, http: aiohttp.ClientSession, who: str) -> None:
        self.tls = tls
        self.http = http
        self.who = who

    async def get(self, url: str, limit: int) -> Served:
        return await self.request("GET", url, limit)

    async def post(self, url: str, body: Any, limit: int) -> Served:
        return await self.request("POST", url, limit, body)

    async def request(self, method: str, url: str, limit: int, body: Any = None) -> Served:
        """One request; the answer is read (at most ``limit`` bytes) only after its certificate passed."""
        async with self.http.request(method, url, json=body) as response:
            leaf = self.tls.check(served_ssl_object(response), self.who)
            raw = await read_bounded(response, limit, url)
            return Served(response.status, raw, leaf)
