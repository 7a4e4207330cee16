"""The HTTPS (CONNECT) proxy every outbound connection of the agent takes, or not.

One decision for every connection the agent opens: enrollment (the CA fetch
included), renewal and recovery, the controller's time, the tunnels and
``doctor``. ``ProxySettings.route(url)`` says whether ``url`` goes through the
proxy and with which CONNECT headers; ``request_options(url)`` turns that into
aiohttp's ``proxy`` and ``proxy_headers``. The TLS to the controller or relay
runs end to end through the proxy's CONNECT; the proxy sees only host and
port. A proxy may ask for Basic credentials, given in its URL
(``http://user:password@host:port``) in ``[link] proxy`` or HTTPS_PROXY alike;
they travel in a CONNECT header and never appear in a message, a log line or
a repr. Environment variables are read at the edge (``environment_proxy`` is
called with ``os.environ`` by the CLI); everything here takes plain values.
"""

from __future__ import annotations

import base64
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

# Checked in this order, as curl and most tools do: the lowercase name first.
PROXY_VARIABLES = ("https_proxy", "HTTPS_PROXY")
NO_PROXY_VARIABLES = ("no_proxy", "NO_PROXY")
# What a proxy URL looks like to the person who has to fix one.
PROXY_URL_FORM = '"http://host:port" or "http://user:password@host:port"'
#: Where a proxy from the config file is set, as the sentence that says what to fix names it.
CONFIG_SOURCE = "[link] proxy"
#: HTTP statuses by which a proxy says it could not reach the far end itself.
UPSTREAM_FAILURES = frozenset({502, 503, 504})


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
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")


@dataclass(frozen=True)
class ProxyRoute:
    """How one connection goes through the proxy: its URL without credentials and the CONNECT's headers."""

    url: str
    #: Proxy-Authorization when the proxy URL carries a login; never shown.
    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    source: str = CONFIG_SOURCE

    def unreachable(self, reason: str) -> str:
        """The sentence for a proxy that cannot be reached at all."""
        return (f"cannot reach the proxy {self.url} ({reason}); check the proxy address in {self.source} "
                "and that the proxy is running")

    def refused(self, status: int, who: str) -> str:
        """The sentence for a proxy that answered the CONNECT to ``who`` with HTTP ``status``."""
        target = f"the proxy {self.url} refused to carry the connection to {who} (HTTP {status})"
        if status == 407 and self.headers:
            return f"{target}; check the user and password in {self.source}"
        if status == 407:
            return (f"{target}: it asks for a login; give it in {self.source} as "
                    '"http://user:password@host:port"')
        if status in UPSTREAM_FAILURES:
            return (f"{target}: the proxy could not reach it; check that address, or ask whoever runs the proxy "
                    "whether it can reach the controller")
        return (f"{target}; ask whoever runs the proxy to allow CONNECT to that host and port, or list the "
                "host in [link] no_proxy if it is reachable without the proxy")


@dataclass(frozen=True)
class ProxySettings:
    """The proxy the agent's outbound connections take, and the hosts reached directly; built at the edge."""

    #: http://[user:password@]host:port of an HTTPS CONNECT proxy; None = every connection is direct.
    url: str | None = None
    #: Hosts, domains, addresses or networks reached without the proxy (NO_PROXY's forms).
    no_proxy: tuple[str, ...] = ()
    #: Where ``url`` was set ("[link] proxy", or the environment variable's name).
    source: str = CONFIG_SOURCE

    def __repr__(self) -> str:  # the password must not reach a log line through a repr
        url = redact(self.url) if self.url else None
        return f"ProxySettings(url={url!r}, no_proxy={self.no_proxy!r}, source={self.source!r})"

    def route(self, url: str) -> ProxyRoute | None:
        """The way to ``url`` through the proxy, or None for a direct connection (no proxy, or a no_proxy host)."""
        if not self.url or bypasses_proxy(urlsplit(url).hostname or "", self.no_proxy):
            return None
        # Credentials travel as a header of the CONNECT, never inside a URL an error message could show.
        bare, login = proxy_credentials(self.url)
        headers = (("Proxy-Authorization", basic_authorization(*login)),) if login else ()
        return ProxyRoute(bare, headers, self.source)

    def request_options(self, url: str) -> dict[str, Any]:
        """aiohttp's ``proxy`` and ``proxy_headers`` for a request or WebSocket to ``url``; empty when direct."""
        route = self.route(url)
        if route is None:
            return {}
        # A fresh dict each time: aiohttp 3.8 adds its Host header to the one it is given.
        return {"proxy": route.url, "proxy_headers": dict(route.headers) or None}


#: No proxy: every connection is direct.
DIRECT = ProxySettings()


def no_proxy_from_environment(env: Mapping[str, str]) -> tuple[str, ...]:
    """The entries of no_proxy/NO_PROXY, lowercased."""
    text = next((env[name] for name in NO_PROXY_VARIABLES if env.get(name, "").strip()), "")
    return tuple(e.strip().lower() for e in text.split(",") if e.strip())


def environment_proxy(settings: ProxySettings, env: Mapping[str, str]) -> ProxySettings:
    """``settings`` (from the config file) with the environment filling in what they left unset.

    https_proxy/HTTPS_PROXY counts only without ``[link] proxy``;
    no_proxy/NO_PROXY counts without ``[link] no_proxy`` whichever of the two
    named the proxy. Raises ValueError with a sentence for a malformed one.
    """
    url, source = settings.url, settings.source
    if url is None:
        name = next((name for name in PROXY_VARIABLES if env.get(name, "").strip()), None)
        if name is not None:
            url, source = env[name].strip(), name
            problem = proxy_problem(url)
            if problem is not None:
                raise ValueError(f"{name} {problem}, or set [link] proxy in the config")
    return ProxySettings(url, settings.no_proxy or no_proxy_from_environment(env), source)


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
