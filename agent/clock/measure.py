"""Measure the clock (NTP and the controller at once) and adopt the result.

The thin asyncio glue around the pure rule in agent.clock.trusted.combine.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import replace

from agent.clock.controller_time import fetch_controller_time
from agent.clock.ntp import query_servers
from agent.clock.trusted import NOTABLE_OFFSET, ClockEstimate, OffsetSample, TrustedClock, combine
from agent.errors import ClockError, OutpostError
from agent.proxy import DIRECT, ProxySettings

log = logging.getLogger(__name__)


async def refresh_clock(clock: TrustedClock, controller_url: str | None = None,
                        ca_pem: str | None = None, proxy: ProxySettings = DIRECT) -> ClockEstimate:
    """Measure now, adopt what the trust rules pick, and return it (the controller through ``proxy``).

    Raises ClockError when the controller's time is provably wrong and no NTP
    server answered: then nothing can be trusted, and the clock keeps what it
    had. A controller that cannot be reached is not an error here (the local
    clock, or the last measurement, stays in use and says so).
    """
    settings = clock.settings
    ntp_query = query_servers(settings.ntp_servers, settings.ntp_timeout)
    ntp, controller = await asyncio.gather(ntp_query, _controller_sample(clock, controller_url, ca_pem, proxy))
    if isinstance(controller, ClockError):
        if ntp is None:
            raise ClockError(f"{controller}; no NTP server answered either, so nothing can tell this gateway "
                             "the time: fix the controller's clock or allow NTP (UDP port 123)")
        estimate = replace(combine(ntp, None), note=str(controller))
    else:
        estimate = combine(ntp, controller)
    clock.adopt(estimate)
    log.info("%s", clock.report())
    return estimate


async def _controller_sample(clock: TrustedClock, controller_url: str | None, ca_pem: str | None,
                             proxy: ProxySettings) -> OffsetSample | ClockError | None:
    if not controller_url or not ca_pem:
        return None
    try:
        return await fetch_controller_time(controller_url, ca_pem, clock.local_now, proxy)
    except ClockError as error:
        return error
    except OutpostError as error:
        log.info("the controller's time is not available: %s", error)
        return None


#: A gateway's crystal drifts by tens of parts per million: under a second in
#: four hours. Each measurement costs two small HTTPS requests and one NTP
#: packet per server, which a metered link should not pay more often.
CLOCK_REFRESH_INTERVAL = 4 * 3600.0
#: After a measurement that found nothing to trust, try again sooner: the
#: link or the controller may be back, and decisions run on the local clock meanwhile.
CLOCK_RETRY_INTERVAL = 600.0


async def measure_once(clock: TrustedClock, controller_url: str, ca_pem: str,
                       proxy: ProxySettings = DIRECT) -> str | None:
    """Measure once; returns what is wrong with the clock, in plain words, or None."""
    try:
        estimate = await refresh_clock(clock, controller_url, ca_pem, proxy)
    except ClockError as error:
        log.error("%s", error)
        return str(error)
    if not clock.measured or abs(clock.offset) >= NOTABLE_OFFSET or estimate.note:
        # Said once per measurement, so the journal shows when and how far the clock was off.
        log.warning("%s", clock.report())
    return estimate.note


async def keep_clock(clock: TrustedClock, controller_url: str, ca_pem: str,
                     on_update: Callable[[TrustedClock, str | None], None],
                     interval: float = CLOCK_REFRESH_INTERVAL, retry: float = CLOCK_RETRY_INTERVAL,
                     proxy: ProxySettings = DIRECT) -> None:
    """Re-measure forever (cancel to stop); ``on_update(clock, problem)`` after each try."""
    while True:
        await asyncio.sleep(interval if clock.measured else retry)
        problem = await measure_once(clock, controller_url, ca_pem, proxy)
        on_update(clock, problem)
