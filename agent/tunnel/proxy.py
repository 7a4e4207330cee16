"""Which HTTPS (CONNECT) proxy, if any, carries the tunnel to a relay.

The tunnel's TLS runs end to end through the proxy's CONNECT; the proxy sees
only the relay's host and port. Environment variables are read at the edge
(``proxy_settings_from_environment`` is called by the CLI with ``os.environ``);
everything else takes plain values.
"""

from __future__ import annotations

import ipaddress
from typing import Mapping
from urllib.parse import urlsplit

# Checked in this order, as curl and most tools do: the lowercase name first.
PROXY_VARIABLES = ("https_proxy", "HTTPS_PROXY")
NO_PROXY_VARIABLES = ("no_proxy", "NO_PROXY")


def proxy_settings_from_environment(env: Mapping[str, str]) -> tuple[str | None, tuple[str, ...]]:
    """(proxy URL, no-proxy entries) from HTTPS_PROXY/https_proxy and NO_PROXY/no_proxy."""
    proxy = next((env[name].strip() for name in PROXY_VARIABLES if env.get(name, "").strip()), None)
    no_proxy_text = next((env[name] for name in NO_PROXY_VARIABLES if env.get(name, "").strip()), "")
    entries = tuple(e.strip().lower() for e in no_proxy_text.split(",") if e.strip())
    return proxy, entries


def bypasses_proxy(host: str, no_proxy: tuple[str, ...]) -> bool:
    """Whether ``host`` matches a NO_PROXY entry: ``*``, a domain suffix, an address or a CIDR."""
    host = host.lower().strip("[]")
    for entry in no_proxy:
        entry = entry.split(":", 1)[0] if entry.count(":") == 1 else entry
        if entry == "*":
            return True
        if "/" in entry:
            try:
                if ipaddress.ip_address(host) in ipaddress.ip_network(entry, strict=False):
                    return True
            except ValueError:
                pass
            continue
        bare = entry.lstrip(".")
        if host == bare or host.endswith("." + bare):
            return True
    return False


def proxy_for(relay_url: str, proxy: str | None, no_proxy: tuple[str, ...] = ()) -> str | None:
    """The proxy URL to reach ``relay_url`` through, or None for a direct connection."""
    if not proxy:
        return None
    host = urlsplit(relay_url).hostname or ""
    return None if bypasses_proxy(host, no_proxy) else proxy
