"""Which relay to try next: the failover decision, with no I/O.

The controller names its relays at enrollment and again in every AUTH_OK.
A relay that cannot be reached is left for the next one in the list; a tunnel
that was up and then dropped is retried on the same relay first, since a drop
is far more often the path (a NAT, a handover) than the relay. While some
relay of the list has not failed since the last tunnel was up, the next one
is tried after a short jitter rather than the backoff (``untried``): a relay
that went away costs its gateways one failed attempt, not a growing wait.
Once every relay failed in a row, the backoff applies. Relays the agent's
``[link] prefer_relays`` names (a region's own) come first in every list.
"""

from __future__ import annotations

from urllib.parse import urlsplit

# A relay list is a handful of addresses; more is a broken or hostile answer.
MAX_RELAYS = 16
# A relay address is a URL; longer is not one.
MAX_RELAY_URL = 2048


def valid_relay_list(value: object) -> list[str] | None:
    """The relay URLs in an AUTH_OK ``relays`` field, or None when it is absent or malformed."""
    if not isinstance(value, list) or not value or len(value) > MAX_RELAYS:
        return None
    relays: list[str] = []
    for url in value:
        if not isinstance(url, str) or len(url) > MAX_RELAY_URL or not url.startswith(("wss://", "ws://")):
            return None
        if url not in relays:
            relays.append(url)
    return relays


def preferred_first(relays: list[str], prefer: tuple[str, ...]) -> list[str]:
    """``relays`` with those ``[link] prefer_relays`` names first, in its order; the rest as the controller gave them.

    A preference is a host name or ``HOST:PORT``; a relay matches by its URL's host (and port).
    """
    def rank(url: str) -> int:
        parts = urlsplit(url)
        names = {parts.netloc.lower(), (parts.hostname or "").lower()}
        return next((i for i, name in enumerate(prefer) if name in names), len(prefer))

    return sorted(relays, key=rank)


class RelayRotation:
    """The ordered relay list and the one to try next."""

    def __init__(self, relays: list[str], prefer: tuple[str, ...] = ()) -> None:
        if not relays:
            raise ValueError("at least one relay is needed")
        #: ``[link] prefer_relays``: these first, whatever order the controller gives
        self.prefer = prefer
        self.relays = preferred_first(list(dict.fromkeys(relays)), prefer)
        self.index = 0
        #: connect failures in a row since the last tunnel was up
        self.failed_in_row = 0

    def current(self) -> str:
        return self.relays[self.index % len(self.relays)]

    def connect_failed(self) -> str:
        """The relay could not be reached or refused the upgrade: move on to the next one."""
        self.failed_in_row += 1
        self.index = (self.index + 1) % len(self.relays)
        return self.current()

    @property
    def untried(self) -> bool:
        """Whether some relay of the list has not failed since the last tunnel was up."""
        return self.failed_in_row < len(self.relays)

    def tunnel_up(self) -> None:
        self.failed_in_row = 0

    def tunnel_dropped(self) -> str:
        """An established tunnel ended: try the same relay again first."""
        return self.current()

    def refresh(self, relays: list[str], connected: str) -> bool:
        """Adopt the controller's list, keeping the relay we reached at the front.

        The address we reached may be an alias of one in the list (a load
        balancer, a path through a proxy): it stays first because it works
        (a working tunnel is never moved to a preferred relay; the next
        reconnect tries the preferred ones first).
        Returns whether the list changed.
        """
        updated = [connected] + preferred_first([r for r in relays if r != connected], self.prefer)
        changed = updated != self.relays
        self.relays = updated
        self.index = 0
        return changed
