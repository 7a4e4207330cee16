"""What an emulated link does: delay, rate, stalls, a carrier NAT, random faults.

Every field is per direction unless it says otherwise. The named profiles are
the links gateways really sit behind (docs/links.md gives the field numbers).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

MBIT = 1_000_000 / 8  # bytes per second in one Mbit/s
BLACKHOLE_MODES = ("discard", "unread")


@dataclass(frozen=True)
class LinkProfile:
    """One emulated uplink. Zero/None turns a behaviour off."""

    name: str = "clean"
    #: seconds added to every byte in each direction (round trip = twice this)
    one_way_delay: float = 0.0
    #: bytes per second in each direction; None = as fast as loopback
    rate: float | None = None
    #: the bottleneck's buffer beyond the bytes in flight (bytes): a modem or
    #: satellite terminal queues this much before the sender feels it
    queue_bytes: int = 256 * 1024
    #: a stall of ``stall_for`` seconds every ``stall_every`` seconds (LEO handover)
    stall_every: float | None = None
    stall_for: float = 0.0
    #: a NAT mapping idle this long (no byte either way) is silently black-holed
    nat_timeout: float | None = None
    #: what a black-holed mapping does with the bytes still sent into it:
    #: "discard" reads and drops them (the emulator's kernel still ACKs, so the
    #: sender never blocks and the bytes are counted); "unread" stops reading
    #: both sockets, so the senders' socket buffers fill and their writes block,
    #: as when a carrier drops the mapping and no ACK ever returns
    blackhole: str = "discard"
    #: mean seconds between random connection resets (RST), per connection
    reset_mean_interval: float | None = None
    #: mean seconds between random stalls of ``random_stall_for`` seconds
    random_stall_mean_interval: float | None = None
    random_stall_for: float = 0.0
    #: seeds the random faults, so a run can be repeated
    seed: int = 0

    def __post_init__(self) -> None:
        if self.blackhole not in BLACKHOLE_MODES:
            raise ValueError(f"blackhole must be one of {', '.join(BLACKHOLE_MODES)}, not {self.blackhole!r}")

    def but(self, **changes) -> LinkProfile:
        """This profile with some numbers changed (tests shrink the timers)."""
        return replace(self, **changes)


CLEAN = LinkProfile()
# Geostationary satellite: 36,000 km up and down twice makes ~600 ms round trip;
# a consumer terminal gives ~20 Mbit/s.
GEO = LinkProfile(name="geo", one_way_delay=0.300, rate=20 * MBIT, queue_bytes=512 * 1024)
# Low-earth orbit: ~40 ms round trip, ~50 Mbit/s, and a satellite handover that
# stops traffic for 1-2 s every 15 s.
LEO = LinkProfile(name="leo", one_way_delay=0.020, rate=50 * MBIT, stall_every=15.0, stall_for=2.0)
# LTE behind carrier-grade NAT: ~60 ms round trip, ~10 Mbit/s, and a mapping
# that is dropped after 150 s without traffic (field reports: 120-150 s).
LTE_NAT = LinkProfile(name="lte-nat", one_way_delay=0.030, rate=10 * MBIT, nat_timeout=150.0)
# A bad link: resets about every two minutes, 3 s stalls about every 40 s.
FLAKY = LinkProfile(name="flaky", one_way_delay=0.050, rate=5 * MBIT, reset_mean_interval=120.0,
                    random_stall_mean_interval=40.0, random_stall_for=3.0)

PROFILES = {p.name: p for p in (CLEAN, GEO, LEO, LTE_NAT, FLAKY)}
