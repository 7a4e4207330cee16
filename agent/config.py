"""The agent's configuration as everything below the CLI receives it: typed, frozen, validated.

The file it comes from, ``agent.toml``, is read and checked once at the edge
(agent/config_file.py ``load_config``); nothing else reads files or the
environment (the CLI passes ``os.environ`` to ``with_environment_proxy``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from agent.clock.settings import ClockSettings
from agent.errors import ConfigError
from agent.identity.select import KeyStoreSettings
from agent.proxy import DIRECT, ProxySettings, environment_proxy

DEFAULT_STATE_DIR = Path("/var/lib/outpost-agent")
DEFAULT_CONFIG_PATH = Path("/etc/outpost/agent.toml")


@dataclass(frozen=True)
class BindConfig:
    """A local service this gateway hosts under ``service``."""

    service: str
    target_host: str
    target_port: int
    #: (declared port, host, port): a dial of ``SERVICE:PORT`` reaches that local target.
    ports: tuple[tuple[int, str, int], ...] = ()


@dataclass(frozen=True)
class DialConfig:
    """A remote ``service`` (``NAME`` or ``TENANT/NAME``) exposed on a local port of this gateway."""

    service: str
    listen_host: str
    listen_port: int


@dataclass(frozen=True)
class LinkSettings:
    """How the tunnel treats the uplink; None means the profile's default."""

    profile: str = "ethernet"
    keepalive_interval: float | None = None
    ping_timeout: float | None = None
    nat_timeout: float | None = None
    window: int | None = None
    reconnect_initial: float | None = None
    reconnect_max: float | None = None
    stable_after: float | None = None
    #: ``prefer_relays``: host names (or HOST:PORT) of relays tried first, in this order (agent/tunnel/relays.py).
    prefer_relays: tuple[str, ...] = ()
    #: What the tunnel runs on (agent/tunnel/client.py says when ``auto`` falls back).
    transport: str = "auto"


@dataclass(frozen=True)
class AgentConfig:
    """Everything the agent needs, typed and validated."""

    state_dir: Path = DEFAULT_STATE_DIR
    keystore: KeyStoreSettings = field(default_factory=KeyStoreSettings)
    binds: tuple[BindConfig, ...] = ()
    dials: tuple[DialConfig, ...] = ()
    link: LinkSettings = field(default_factory=LinkSettings)
    log_level: str = "info"
    #: ``auto`` runs on uvloop where it is installed (less memory and CPU per tunnel), ``asyncio``
    #: forces the standard loop (shared.event_loop).
    event_loop: str = "auto"
    #: Token files to enroll from, first found wins; None = the documented
    #: places (agent.enrollment.field.default_token_paths).
    token_paths: tuple[Path, ...] | None = None
    clock: ClockSettings = field(default_factory=ClockSettings)
    #: ``[link] proxy`` and ``no_proxy``, for every outbound connection (agent.proxy); the CLI
    #: fills in HTTPS_PROXY and NO_PROXY where the file is silent (``with_environment_proxy``).
    proxy: ProxySettings = DIRECT


def with_environment_proxy(config: AgentConfig, env: Mapping[str, str]) -> AgentConfig:
    """``config`` with https_proxy/HTTPS_PROXY and no_proxy/NO_PROXY filling in what ``[link]`` leaves unset."""
    try:
        proxy = environment_proxy(config.proxy, env)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    return config if proxy == config.proxy else dataclasses.replace(config, proxy=proxy)
