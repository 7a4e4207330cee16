"""The controller's time, over TLS pinned to the controller's CA.

Bootstrapping a clock that may read 1970: the connection is verified against
the pinned CA with OpenSSL's date check off (our clock cannot judge dates
yet), and the controller's answer is then checked against the certificate it
was served with. A time outside that certificate's validity, or before the
CA existed, cannot be right, so the agent refuses it and says why instead of
adopting it. Within those bounds the time is as trustworthy as the channel.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable

from cryptography import x509

from agent.clock.trusted import OffsetSample
from agent.errors import ClockError, ControllerUnreachable
from agent.identity.pinned_tls import PinnedTLS
from agent.proxy import DIRECT, ProxySettings
from shared.trust import cert_not_after, cert_not_before
from shared.utc import format_utc

#: Two small requests; a controller slower than this gives an offset too
#: uncertain to be worth waiting for.
CONTROLLER_TIME_TIMEOUT = 10.0
#: ``{"time": 1795386097.123}`` is 30 bytes; 1 KiB bounds a hostile answer.
MAX_TIME_RESPONSE = 1024
#: The first request pays for TCP and TLS set-up, which skews its midpoint;
#: the second reuses the connection, so its round trip is one request long.
TIME_REQUESTS = 2


async def fetch_controller_time(controller_url: str, ca_pem: str, local: Callable[[], float] = time.time,
                                proxy: ProxySettings = DIRECT) -> OffsetSample:
    """Measure the local clock's offset from the controller's (``GET /v1/time``), through ``proxy`` where it applies.

    Raises ClockError when the controller's time cannot be trusted (says why),
    TrustError when the controller is not certified by the pinned CA, and
    ControllerUnreachable on network failures.
    """
    url = controller_url.rstrip("/") + "/v1/time"
    # No trusted time yet to judge the dates with: the answer is judged by the certificates instead.
    tls = PinnedTLS(ca_pem, time=None, proxy=proxy)
    samples: list[OffsetSample] = []
    unreachable = f"could not ask the controller at {url} for its time ({{reason}})"
    async with tls.client(controller_url, CONTROLLER_TIME_TIMEOUT, unreachable) as channel:
        for _ in range(TIME_REQUESTS):
            started = local()
            served = await channel.get(url, MAX_TIME_RESPONSE)
            finished = local()
            if served.status != 200:
                raise ControllerUnreachable(
                    f"the controller at {url} did not answer with its time (HTTP {served.status}); "
                    "is it an older version? try again later"
                )
            reported = parse_time(served.body, url)
            check_reported_time(reported, served.certificate, tls.ca_certificate, controller_url)
            midpoint = (started + finished) / 2
            samples.append(OffsetSample(source="controller", offset=reported - midpoint,
                                        delay=max(0.0, finished - started), local_time=midpoint,
                                        origin=controller_url))
    return min(samples, key=lambda s: s.delay)


def parse_time(body: bytes, url: str) -> float:
    """The ``time`` of a ``/v1/time`` answer, or ClockError."""
    try:
        value = json.loads(body)["time"]
    except (ValueError, KeyError, TypeError):
        value = None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ClockError(f"the controller at {url} answered with something that is not a time; "
                         "is the address right?")
    return float(value)


def check_reported_time(reported: float, served: x509.Certificate, ca_cert: x509.Certificate, url: str) -> None:
    """Refuse a controller time its own certificates prove wrong (ClockError saying why)."""
    ca_from, ca_until = cert_not_before(ca_cert).timestamp(), cert_not_after(ca_cert).timestamp()
    if reported < ca_from:
        raise ClockError(
            f"the controller at {url} reports {format_utc(reported)}, before its own CA was created "
            f"({format_utc(ca_from)}); refusing to trust that time — check the controller's clock"
        )
    if reported > ca_until:
        raise ClockError(
            f"the controller at {url} reports {format_utc(reported)}, after its own CA expired "
            f"({format_utc(ca_until)}); refusing to trust that time — check the controller's clock"
        )
    served_from, served_until = cert_not_before(served).timestamp(), cert_not_after(served).timestamp()
    if not served_from <= reported <= served_until:
        raise ClockError(
            f"the controller at {url} reports {format_utc(reported)}, outside the validity of its own TLS "
            f"certificate ({format_utc(served_from)} to {format_utc(served_until)}); refusing to trust that "
            "time — check the controller's clock"
        )
