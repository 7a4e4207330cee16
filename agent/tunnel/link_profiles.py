"""Link profiles: the ``[link]`` settings turned into the tunnel's timers, windows and backoff.

A pure mapping (no I/O): ``plan_for(settings)`` gives the ``Liveness``,
``ProtocolLimits`` and reconnect bounds the runner uses. docs/links.md tells
the arithmetic behind each number.

The keepalive PING does two jobs: it refreshes the NAT mapping (so it must
leave before the carrier forgets an idle connection) and it proves the relay
alive (a PING unanswered for ``ping_timeout`` ends the tunnel). Each PING and
PONG costs ~90 bytes of TCP payload (more with headers), so on a metered link
the interval follows the NAT timeout and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from agent.errors import ConfigError
from agent.tunnel.backoff import STABLE_AFTER
from shared.protocol.errors import InvalidLimits
from shared.protocol.limits import INITIAL_WINDOW, Liveness, ProtocolLimits

if TYPE_CHECKING:  # agent.config builds on this module
    from agent.config import LinkSettings

# The keepalive leaves this share of the NAT timeout early, and at least
# NAT_MARGIN_MIN seconds. What eats into the margin: the PING's one-way
# transit (under a second on GEO, seconds behind a bufferbloated uplink), a
# lost PING segment's TCP retransmissions (1-3 s RTO on cellular, doubling: a
# second try lands 3-9 s late), the event loop of a loaded gateway firing late,
# the NAT's sweep granularity (tables expire in passes of seconds), and a NAT
# timeout measured in the field that is only roughly right. Those grow with
# long timeouts, so the margin is a share: a 600 s NAT gets a PING every 540 s,
# 160 a day, about 39 KB/day with TCP/IP headers (docs/links.md), well inside
# a 100 KB/day budget, where a fixed 10 s margin would bet on all of the above
# fitting in 10 s. The keepalive is timed from the last byte received, and a
# NAT refreshes on packets either way (TCP ACKs included), so the NAT's own
# clock is never older than ours.
NAT_MARGIN_SHARE = 0.10
NAT_MARGIN_MIN = 10.0
# Below this the keepalive is a test setting, not a link: refuse sub-second timers
# that would flood even a LAN.
MIN_KEEPALIVE = 1.0
# A window this large fills a 600 ms, 20 Mbit/s satellite path (1.5 MB in
# flight) with room for the terminal's queue and for credit returned in
# half-window batches; memory stays bounded at one window per open stream.
SATELLITE_WINDOW = 8 * 1024 * 1024


@dataclass(frozen=True)
class ProfileDefaults:
    """What one link profile means, before the config's overrides."""

    #: the NAT idle timeout this link is assumed to have (s)
    nat_timeout: float
    #: the keepalive never waits longer than this, whatever the NAT allows (s);
    #: None = follow the NAT timeout alone (bytes matter more than detection time)
    keepalive_cap: float | None
    #: after a PING, dead if nothing arrives within this (s)
    ping_timeout: float
    #: per-stream receive window (bytes)
    window: int
    #: first reconnect wait bound (s), doubled per failure (full jitter)
    reconnect_initial: float
    #: longest reconnect wait bound (s)
    reconnect_max: float


PROFILES: dict[str, ProfileDefaults] = {
    # A wired uplink: bytes are free, so ping often and find a dead relay within
    # 35 s. Office firewalls keep idle TCP for 5 minutes or more.
    "ethernet": ProfileDefaults(nat_timeout=300.0, keepalive_cap=25.0, ping_timeout=10.0,
                                window=INITIAL_WINDOW, reconnect_initial=5.0, reconnect_max=300.0),
    # LTE behind carrier NAT: field reports 120-150 s, so assume 120 and ping at
    # 108. 20 s for the answer covers the radio waking from idle (1-2 s) and a
    # congested cell; a dead path is found within 128 s.
    "cellular": ProfileDefaults(nat_timeout=120.0, keepalive_cap=None, ping_timeout=20.0,
                                window=INITIAL_WINDOW, reconnect_initial=5.0, reconnect_max=300.0),
    # GEO/LEO satellite: 600 ms round trips, a LEO handover stall of 1-2 s every
    # 15 s, often carrier NAT. Ping every 60 s (half a 120 s NAT: one lost PING
    # does not lose the mapping); 30 s for the answer rides out many stalls. A
    # TLS handshake costs ~5 round trips (3 s), so reconnects start slower.
    "satellite": ProfileDefaults(nat_timeout=120.0, keepalive_cap=60.0, ping_timeout=30.0,
                                 window=SATELLITE_WINDOW, reconnect_initial=10.0, reconnect_max=600.0),
    # Billed by the megabyte: the keepalive follows the NAT timeout (set
    # nat_timeout to the carrier's measured value: each doubling halves the idle
    # bytes); reconnects back off to 15 minutes since each handshake costs ~6 KB.
    "metered": ProfileDefaults(nat_timeout=120.0, keepalive_cap=None, ping_timeout=30.0,
                               window=INITIAL_WINDOW, reconnect_initial=10.0, reconnect_max=900.0),
}
LINK_PROFILES = tuple(PROFILES)


@dataclass(frozen=True)
class LinkPlan:
    """Everything the runner needs from the link settings."""

    profile: str
    nat_timeout: float
    liveness: Liveness
    limits: ProtocolLimits
    reconnect_initial: float
    reconnect_max: float
    #: a tunnel up this long (s) was stable: its drop restarts the backoff
    stable_after: float = STABLE_AFTER

    @property
    def detection_bound(self) -> float:
        """Longest time a silently dead path goes unnoticed (s)."""
        return (self.liveness.keepalive_interval or 0.0) + self.liveness.ping_timeout

    def pings_per_day(self) -> float:
        """Keepalive PINGs a fully idle tunnel sends in a day."""
        return 86400.0 / (self.liveness.keepalive_interval or 86400.0)


def nat_margin(nat_timeout: float) -> float:
    """How long before the NAT timeout the keepalive leaves (s)."""
    return max(NAT_MARGIN_MIN, NAT_MARGIN_SHARE * nat_timeout)


def keepalive_for(nat_timeout: float, cap: float | None) -> float:
    """The keepalive interval that leaves before the NAT forgets us, at most ``cap``.

    A short NAT timeout that cannot spare the margin gets a PING at half of it.
    Raises ConfigError for a NAT timeout too short for any keepalive.
    """
    interval = max(nat_timeout - nat_margin(nat_timeout), nat_timeout / 2)
    if interval < MIN_KEEPALIVE:
        raise ConfigError(
            f"a NAT timeout of {nat_timeout:g} s leaves no room for a keepalive (at least {MIN_KEEPALIVE:g} s, "
            f"at most half the timeout); set nat_timeout to at least {2 * MIN_KEEPALIVE:g} s"
        )
    return interval if cap is None else min(cap, interval)


def plan_for(profile: str, *, keepalive_interval: float | None = None, ping_timeout: float | None = None,
             nat_timeout: float | None = None, window: int | None = None, reconnect_initial: float | None = None,
             reconnect_max: float | None = None, stable_after: float | None = None) -> LinkPlan:
    """The plan for ``profile`` with any number overridden (None = the profile's)."""
    defaults = PROFILES.get(profile)
    if defaults is None:
        raise ConfigError(f"unknown link profile {profile!r}; use one of {', '.join(LINK_PROFILES)}")
    nat = nat_timeout if nat_timeout is not None else defaults.nat_timeout
    keepalive = keepalive_interval if keepalive_interval is not None else keepalive_for(nat, defaults.keepalive_cap)
    if keepalive >= nat:
        raise ConfigError(
            f"the keepalive interval ({keepalive:g} s) must be below the NAT timeout ({nat:g} s), "
            "or the carrier forgets the idle tunnel; lower keepalive_interval"
        )
    initial = reconnect_initial if reconnect_initial is not None else defaults.reconnect_initial
    maximum = reconnect_max if reconnect_max is not None else defaults.reconnect_max
    if initial > maximum:
        raise ConfigError(f"reconnect_initial ({initial:g} s) must not exceed reconnect_max ({maximum:g} s)")
    try:
        liveness = Liveness(keepalive_interval=keepalive,
                            ping_timeout=ping_timeout if ping_timeout is not None else defaults.ping_timeout)
        limits = ProtocolLimits(initial_window=window if window is not None else defaults.window)
    except InvalidLimits as exc:
        raise ConfigError(str(exc)) from None
    return LinkPlan(
        profile=profile,
        nat_timeout=nat,
        liveness=liveness,
        limits=limits,
        reconnect_initial=initial,
        reconnect_max=maximum,
        stable_after=stable_after if stable_after is not None else STABLE_AFTER,
    )


def plan_from_settings(settings: LinkSettings) -> LinkPlan:
    """The plan for an ``agent.config.LinkSettings`` (fields it lacks are the profile's)."""
    return plan_for(
        settings.profile,
        keepalive_interval=settings.keepalive_interval,
        ping_timeout=settings.ping_timeout,
        nat_timeout=getattr(settings, "nat_timeout", None),
        window=getattr(settings, "window", None),
        reconnect_initial=getattr(settings, "reconnect_initial", None),
        reconnect_max=getattr(settings, "reconnect_max", None),
        stable_after=getattr(settings, "stable_after", None),
    )
