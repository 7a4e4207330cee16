"""Where the agent measures its clock: the typed settings the config file gives, and the one
way an NTP server is written (``host``, ``host:port``, ``[v6]:port``).

Plain values with no I/O, so both the config reader and the clock use them
and neither imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass

NTP_PORT = 123
#: Covers a satellite round trip (600 ms) three times over.
DEFAULT_NTP_TIMEOUT = 2.0


@dataclass(frozen=True)
class ClockSettings:
    """Where the agent measures its clock offset; no NTP servers = the controller's time only."""

    #: "host", "host:port" or "[v6]:port"; none by default, so nothing leaves
    #: the machine unless configured (production configs name their servers).
    ntp_servers: tuple[str, ...] = ()
    ntp_timeout: float = DEFAULT_NTP_TIMEOUT


def split_server(spec: str) -> tuple[str, int]:
    """``"host"``, ``"host:port"`` or ``"[v6]:port"`` -> (host, port); ValueError if malformed."""
    text = spec.strip()
    if not text or any(c.isspace() for c in text) or len(text) > 260:
        raise ValueError(f"{spec!r} is not a host name or address")
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not host:
            raise ValueError(f"{spec!r} has an unclosed '['")
        if not rest:
            return host, NTP_PORT
        if not rest.startswith(":"):
            raise ValueError(f"{spec!r} has text after ']' that is not ':port'")
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        # No colon: a name; several: a bare IPv6 address on the default port.
        return text, NTP_PORT
    if not host or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"{spec!r} has no valid port (1-65535)")
    return host, int(port_text)
