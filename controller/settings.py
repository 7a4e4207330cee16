"""The controller's configuration: a typed object built by the CLI.

The core never reads flags, files or the environment itself; everything it
needs arrives here.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import socket
from pathlib import Path

from controller.listener import ListenerLimits
from controller.relay.pacing import MAX_ADMITTING
from controller.signin.config import SigninSettings

#: The SQLite store's file in a data directory (and in the copies backup and store-move make of one).
STORE_FILE = "store.sqlite3"

#: Agents renew at about two thirds of this; a day bounds what a stolen
#: certificate is worth while leaving a long night offline harmless.
DEFAULT_CERT_LIFETIME = 24 * 3600
#: A gateway whose certificate expired less than this long ago recovers by
#: proving its enrolled key, without a new token: a month covers a site that
#: lost power over a holiday or waited weeks for a spare modem.
DEFAULT_RECOVERY_GRACE = 30 * 24 * 3600
#: A week covers shipping a gateway and waiting for a technician on site.
DEFAULT_TOKEN_TTL = 7 * 24 * 3600
DEFAULT_LISTEN_HOST = "127.0.0.1"
DEFAULT_LISTEN_PORT = 8443
DEFAULT_TRUST_DOMAIN = "outpost.local"
#: `outpostctl connect` sessions are interactive; an hour outlives a working
#: session yet expires soon after the laptop is closed.
SESSION_CERT_LIFETIME = 3600
WILDCARD_HOSTS = ("", "0.0.0.0", "::")
#: The listener's own certificate: a year, renewed while running (below) and
#: reissued on start when it would not last (controller/ca.py).
DEFAULT_LISTENER_CERT_LIFETIME = 365 * 24 * 3600
#: A relay's certificate is all a gateway checks of a relay (gateways pin the
#: CA, not each relay), so a revoked relay stays trusted by gateways until its
#: certificate ends. Six hours bounds that; a relay renews at two thirds of
#: its life, which leaves two hours of controller outage before relays stop.
DEFAULT_RELAY_CERT_LIFETIME = 6 * 3600
#: The listener's certificate is renewed once this fraction of its life has
#: passed: four months before expiry for a year, so a renewal that fails (a
#: full disk) is retried for months, and loudly, before any agent is refused.
LISTENER_CERT_RENEW_FRACTION = 2 / 3
#: ``serve --role``: all (controller and relay in one process, the single box),
#: controller (enrollment, renewal, management API; no tunnels), relay (tunnels only, no CA key).
ROLES = ("all", "controller", "relay")


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything `outpost-controller serve` was told, with defaults applied."""

    data_dir: Path
    listen_host: str = DEFAULT_LISTEN_HOST
    listen_port: int = DEFAULT_LISTEN_PORT
    #: Base URL agents and tokens use; None: derived from the bound address.
    advertise_url: str | None = None
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    cert_lifetime: int = DEFAULT_CERT_LIFETIME
    token_ttl: int = DEFAULT_TOKEN_TTL
    session_lifetime: int = SESSION_CERT_LIFETIME
    recovery_grace: int = DEFAULT_RECOVERY_GRACE
    extra_sans: tuple[str, ...] = ()
    #: Tunnels awaiting their AUTH answer on one relay process before new ones are told to come back.
    max_admitting: int = MAX_ADMITTING
    #: The management API's own listener (``--api-listen``); None: /api/ on the public listener.
    api_listen_host: str | None = None
    api_listen_port: int | None = None
    #: The metrics listener (``--metrics-listen``); None: no /metrics at all (controller/metrics_server.py).
    metrics_listen_host: str | None = None
    metrics_listen_port: int | None = None
    listener_cert_lifetime: int = DEFAULT_LISTENER_CERT_LIFETIME
    #: ``--relay-cert-lifetime``: what the CA gives a ``--role relay`` process (DEFAULT_RELAY_CERT_LIFETIME).
    relay_cert_lifetime: int = DEFAULT_RELAY_CERT_LIFETIME
    #: Deadlines and caps for connections that have not authenticated (controller/listener.py).
    limits: ListenerLimits = ListenerLimits()
    #: Identity providers, group to role mapping, sessions, the admin credential on or off (``--config``).
    signin: SigninSettings = SigninSettings()
    #: ``--store``: a ``postgresql://`` URL shared by several processes; None: the SQLite file in the data directory.
    store_url: str | None = None
    #: ``--role``: which parts this process serves (ROLES).
    role: str = "all"
    #: ``--enroll-token``: a relay's one-time token (``outpostctl relay add``), redeemed at its first start.
    enroll_token: Path | None = None

    @property
    def serves_tunnels(self) -> bool:
        return self.role in ("all", "relay")

    @property
    def serves_controller(self) -> bool:
        return self.role in ("all", "controller")

    #: ``--store FILE``: another process's SQLite store on this machine (a relay beside its controller).
    store_file: Path | None = None

    @property
    def store_path(self) -> Path:
        return self.store_file if self.store_file is not None else self.data_dir / STORE_FILE

    @property
    def store_location(self) -> Path | str:
        """What ``Store()`` opens: the ``--store`` URL, or the SQLite file in the data directory."""
        return self.store_url if self.store_url is not None else self.store_path

    @property
    def ca_cert_path(self) -> Path:
        return self.data_dir / "ca" / "ca.pem"

    @property
    def ca_key_path(self) -> Path:
        return self.data_dir / "ca" / "ca.key"

    @property
    def server_cert_path(self) -> Path:
        return self.data_dir / "tls" / "server.pem"

    @property
    def server_key_path(self) -> Path:
        return self.data_dir / "tls" / "server.key"

    @property
    def admin_token_path(self) -> Path:
        """Where older data directories kept the admin credential in plaintext (migrated on start)."""
        return self.data_dir / "admin.token"

    @property
    def admin_hash_path(self) -> Path:
        return self.data_dir / "admin.hash"

    @property
    def outpostctl_config_path(self) -> Path:
        return self.data_dir / "outpostctl.toml"

    def with_port(self, port: int, api_port: int | None = None) -> Settings:
        """The same settings once the listeners are bound (``--listen HOST:0``, ``--api-listen HOST:0``)."""
        return dataclasses.replace(self, listen_port=port, api_listen_port=api_port)

    @property
    def separate_api(self) -> bool:
        return self.api_listen_host is not None

    @property
    def base_url(self) -> str:
        """The URL agents, tokens and outpostctl use to reach this controller."""
        if self.advertise_url:
            return self.advertise_url.rstrip("/")
        host = self.listen_host
        if host in WILDCARD_HOSTS:
            # Listening everywhere: the machine's name is what others can reach.
            host = socket.gethostname()
        return "https://" + host_port(host, self.listen_port)

    @property
    def api_url(self) -> str:
        """Where the management API is: its own listener, or the public base URL."""
        if self.api_listen_host is None or self.api_listen_port is None:
            return self.base_url
        host = self.api_listen_host
        if host in WILDCARD_HOSTS:
            host = socket.gethostname()
        return "https://" + host_port(host, self.api_listen_port)

    @property
    def relay_urls(self) -> list[str]:
        base = self.base_url
        return ["wss://" + base[len("https://"):] + "/v1/tunnel"]


def host_port(host: str, port: int) -> str:
    """``host:port`` with IPv6 literals in brackets, as URLs want them."""
    try:
        if ipaddress.ip_address(host).version == 6:
            return f"[{host}]:{port}"
    except ValueError:
        pass
    return f"{host}:{port}"
