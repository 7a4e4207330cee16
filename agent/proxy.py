"""Which HTTPS (CONNECT) proxy, if any, carries the tunnel to a relay.

The tunnel's TLS runs end to end through the proxy's CONNECT; the proxy sees
only the relay's host and port. A proxy may ask for Basic credentials, given
in its URL (``http://user:password@host:port``) in ``[link] proxy`` or
HTTPS_PROXY alike; the password never appears in a message or a log line.
Environment variables are read at the edge (``environment_proxy`` is called by
the CLI with ``os.environ``); everything else takes plain values.
"""

from __future__ import annotations

import base64
import ipaddress
import re
from typing import Mapping
from urllib.parse import unquote, urlsplit

# Checked in this order, as curl and most tools do: the lowercase name first.
PROXY_VARIABLES = ("https_proxy", "HTTPS_PROXY")
NO_PROXY_VARIABLES = ("no_proxy", "NO_PROXY")
# What a proxy URL looks like to the person who has to fix one.
PROXY_URL_FORM = '"http://host:port" or "http://user:password@host:port"'


def redact(url: str) -> str:
    """``url`` with anything before an ``@`` (user and password) masked, for messages."""
    return re.sub(r"//[^/@]*@", "//***@", url)


def proxy_problem(url: str) -> str | None:
    """What is wrong with a proxy URL, as the end of a sentence (the password left out); None when it is fine."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not one
    except ValueError:
        parts = None
    if parts is not None and parts.scheme == "https":
        return (f"uses https://; give the proxy as {PROXY_URL_FORM} (the tunnel's own TLS still runs end to "
                "end through the proxy's CONNECT)")
    if (parts is None or parts.scheme != "http" or not parts.hostname or parts.path not in ("", "/")
            or parts.query or parts.fragment or any(c.isspace() for c in url)):
        return f"is {redact(url)!r}; give it as {PROXY_URL_FORM}"
    return None


def proxy_credentials(url: str) -> tuple[str, tuple[str, str] | None]:
    """(the proxy URL without credentials, (user, password) or None), for the CONNECT request."""
    parts = urlsplit(url)
    if parts.username is None:
        return url, None
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    bare = f"{parts.scheme}://{host}" + (f":{parts.port}" if parts.port else "")
    return bare, (unquote(parts.username), unquote(parts.password or ""))


def basic_authorization(user: str, password: str) -> str:
    """The Proxy-Authorization value for HTTP Basic (RFC 7617, UTF-8)."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode("utf-8")).decode("ascii")


def proxy_settings_from_environment(env: Mapping[str, str]) -> tuple[str | None, tuple[str, ...]]:
    """(proxy URL, no-proxy entries) from HTTPS_PROXY/https_proxy and NO_PROXY/no_proxy."""
    proxy = next((env[name].strip() for name in PROXY_VARIABLES if env.get(name, "").strip()), None)
    no_proxy_text = next((env[name] for name in NO_PROXY_VARIABLES if env.get(name, "").strip()), "")
    entries = tuple(e.strip().lower() for e in no_proxy_text.split(",") if e.strip())
    return proxy, entries


def environment_proxy(proxy: str | None, no_proxy: tuple[str, ...],
                      env: Mapping[str, str]) -> tuple[str | None, tuple[str, ...]]:
    """The config's proxy and no-proxy entries with the environment filling in what the config left unset.

    HTTPS_PROXY counts only without ``[link] proxy``; NO_PROXY counts without
    ``[link] no_proxy`` whichever of the two named the proxy. Raises
    ValueError with a sentence for a malformed HTTPS_PROXY.
    """
    env_proxy, env_no_proxy = proxy_settings_from_environment(env)
    if proxy is None and env_proxy is not None:
        problem = proxy_problem(env_proxy)
        if problem is not None:
            raise ValueError(f"HTTPS_PROXY {problem}, or set [link] proxy in the config")
        proxy = env_proxy
    return proxy, no_proxy or env_no_proxy


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
