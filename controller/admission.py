"""Who may still connect: caps on unauthenticated connections, and memory handed back after a burst.

``Admission`` counts the connections of one listener that have not
authenticated, per source address (an IPv6 peer per /64) and in total, and
refuses past the caps with one log line per episode (controller/listener.py
calls it before each TLS handshake). ``return_freed_memory`` gives the heap
that a burst of such connections left behind back to the system.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable, Iterable
from typing import Any

log = logging.getLogger(__name__)

#: Connections not yet authenticated from one source address. A whole site (or
#: a carrier-grade NAT) of gateways shares one address; each spends a second
#: or two unauthenticated per reconnection, spread by full-jitter backoff, so a
#: few dozen at once is a large site after an outage; 128 leaves room for that
#: while keeping one address from holding more than a few percent of the total.
MAX_UNAUTHENTICATED_PER_ADDRESS = 128
#: Connections not yet authenticated in total: bounds what anonymous peers may
#: hold of the controller's memory (4,096 x 30 KiB = 120 MiB on uvloop; 1.1 GiB
#: on asyncio's 256 KiB TLS read buffers: tests/bench/idle_connections.py) while
#: a fleet of thousands reconnecting after a relay restart still gets through.
MAX_UNAUTHENTICATED = 4096
#: TLS handshakes in progress at once. A server handshake costs ~1 ms of CPU
#: (tests/bench/fleet_scale.py): 1,024 queued are done in about two seconds even on
#: half a core, well inside the 10 s handshake deadline; past the cap a new
#: connection is reset at accept, before it costs a handshake that could only
#: miss its deadline behind the others and be dropped after it was paid for.
MAX_HANDSHAKES_IN_FLIGHT = 1024
#: IPv6 peers are counted per /64: one subscriber (a home, a phone, a
#: server's subnet) gets a whole /64, so counting single addresses would give
#: one attacker 2^64 separate caps.
IPV6_CAP_PREFIX = 64
#: Freed memory is handed back to the system when at least this many
#: connections closed since the last look: a burst of anonymous connections
#: (a scan, a fleet's reconnection storm) must not leave the process at its
#: peak size, while a quiet relay never pays for the heap walk.
MEMORY_TRIM_MIN_CLOSED = 256
#: How often to look: the walk costs a few milliseconds on a large heap.
MEMORY_TRIM_INTERVAL = 30.0
#: A cap "bites" in episodes: one warning when it starts refusing, one line
#: with the count when no connection was refused for this long.
CAP_EPISODE_QUIET = 60.0


def cap_key(address: str) -> str:
    """What the per-address cap counts ``address`` under: itself (IPv4), its /64 (IPv6)."""
    try:
        parsed = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(parsed, ipaddress.IPv6Address):
        if parsed.ipv4_mapped is not None:
            return str(parsed.ipv4_mapped)
        return str(ipaddress.IPv6Network((parsed, IPV6_CAP_PREFIX), strict=False))
    return str(parsed)


class Admission:
    """How many connections are unauthenticated, per source address and in total; refuses past the caps."""

    def __init__(self, name: str, limits: Any) -> None:  # a ListenerLimits
        self.name = name
        self.limits = limits
        self.total = 0
        self.per_address: dict[str, int] = {}
        self.refused = 0
        self._episode_refused = 0
        self._episode_addresses: set[str] = set()
        self._episode_end: asyncio.TimerHandle | None = None

    def enter(self, address: str) -> bool:
        """Count one more unauthenticated connection from ``address``; False (and counted as refused) past a cap."""
        held = self.per_address.get(address, 0)
        if held >= self.limits.max_unauthenticated_per_address:
            self._refuse(address, f"{held} from {address} (the cap per address is "
                                  f"{self.limits.max_unauthenticated_per_address})")
            return False
        if self.total >= self.limits.max_unauthenticated:
            self._refuse(address, f"{self.total} in total (the cap is {self.limits.max_unauthenticated})")
            return False
        self.per_address[address] = held + 1
        self.total += 1
        return True

    def leave(self, address: str) -> None:
        held = self.per_address.get(address, 0) - 1
        if held > 0:
            self.per_address[address] = held
        else:
            self.per_address.pop(address, None)
        self.total -= 1

    def _refuse(self, address: str, why: str) -> None:
        self.refused += 1
        self._episode_refused += 1
        self._episode_addresses.add(address)
        loop = asyncio.get_running_loop()
        if self._episode_end is None:
            log.warning(
                "%s: refusing new connections, too many not yet authenticated (%s); authenticated "
                "tunnels are not affected; one line follows when this stops", self.name, why,
            )
        else:
            self._episode_end.cancel()
        self._episode_end = loop.call_later(CAP_EPISODE_QUIET, self._episode_over)

    def _episode_over(self) -> None:
        log.warning(
            "%s: refused %d connections from %d addresses over the unauthenticated cap; none refused for %g s",
            self.name, self._episode_refused, len(self._episode_addresses), CAP_EPISODE_QUIET,
        )
        self._episode_end = None
        self._episode_refused = 0
        self._episode_addresses.clear()

    def close(self) -> None:
        if self._episode_end is not None:
            self._episode_end.cancel()
            self._episode_end = None


def _libc_malloc_trim() -> Callable[[int], int] | None:
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to trim this way
        return None


_malloc_trim = _libc_malloc_trim()


async def return_freed_memory(listeners: Iterable[Any]) -> None:
    """Forever: after a burst of connections closed, give the freed heap back to the system.

    glibc keeps freed memory in the process (the 256 KiB TLS read buffers of
    asyncio's SSL layer fragment the heap), so without this a controller stays
    at the size of its largest burst of anonymous connections.
    """
    if _malloc_trim is None:
        return
    while True:
        await asyncio.sleep(MEMORY_TRIM_INTERVAL)
        closed = sum(listener.closed_since_trim for listener in listeners)
        if closed >= MEMORY_TRIM_MIN_CLOSED:
            for listener in listeners:
                listener.closed_since_trim = 0
            _malloc_trim(0)
