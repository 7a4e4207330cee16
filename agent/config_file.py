"""The agent's configuration file: one TOML file, read and validated once at the edge (the CLI).

Example::

    state_dir = "/var/lib/outpost-agent"
    log_level = "info"
    event_loop = "auto"           # auto (uvloop where installed) | uvloop | asyncio

    [keystore]
    backend = "auto"              # auto | tpm | software
    tcti = "device:/dev/tpmrm0"

    [link]
    profile = "cellular"          # ethernet | cellular | satellite | metered
    nat_timeout = 120             # seconds the carrier keeps an idle mapping
    keepalive_interval = 110.0    # seconds; unset = derived from the profile
    ping_timeout = 20.0           # every [link] number is optional (docs/links.md)
    proxy = "http://proxy.lan:3128"   # HTTPS CONNECT proxy for every outbound connection
                                      # (user:password@ allowed); unset = HTTPS_PROXY
    no_proxy = ["relay.corp.lan"]     # hosts reached directly; unset = NO_PROXY
    prefer_relays = ["relay-eu-1.example.net"]  # tried first; unset = the controller's order
    transport = "auto"            # "tls", "websocket", or auto: TLS, WebSocket where only HTTP passes

    [[bind]]                      # host a local service under a name
    service = "modbus"
    target = "127.0.0.1:502"

    [[dial]]                      # expose a remote service as a local port
    service = "historian"         # or "TENANT/SERVICE": another tenant's, if it allows
    listen = "127.0.0.1:9000"

    [enrollment]                  # where to look for a token file, in order
    token_paths = ["/etc/outpost/enroll.token"]   # unset = the documented places

    [clock]                       # how the agent checks its own clock
    ntp_servers = ["pool.ntp.org"]   # unset = none: only the controller's time
    ntp_timeout = 2.0             # seconds per query

``load_config`` turns it into the typed, frozen ``AgentConfig``
(agent/config.py). Every mistake is one ConfigError sentence naming the
file, the key and what to do.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

from agent.clock.settings import DEFAULT_NTP_TIMEOUT, ClockSettings, split_server
from agent.config import DEFAULT_STATE_DIR, AgentConfig, BindConfig, DialConfig, LinkSettings
from agent.errors import ConfigError
from agent.identity.select import BACKENDS, DEFAULT_TCTI, KeyStoreSettings
from agent.proxy import ProxySettings, proxy_problem
from agent.tunnel.link_profiles import plan_from_settings
from agent.tunnel.relays import MAX_RELAYS
from shared.event_loop import EVENT_LOOPS
from shared.protocol.limits import MAX_BIND_SERVICES
from shared.toml_file import FileTooLarge, load_toml_file

LOG_LEVELS = ("debug", "info", "warning", "error")
LINK_PROFILES = ("ethernet", "cellular", "satellite", "metered")
#: Per-stream windows outside this range either stall a LAN stream or let one
#: stream hold more memory than a small gateway should give it.
MIN_LINK_WINDOW = 64 * 1024
MAX_LINK_WINDOW = 64 * 1024 * 1024
#: A config file is a few KiB; the bound stops a wrong path (a disk image) early.
MAX_CONFIG_FILE = 1024 * 1024
#: Keepalive and ping timers above an hour would hide a dead link for too long.
MAX_LINK_SECONDS = 3600.0
SERVICE_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
#: What a dial may name: a service of this gateway's tenant, or ``TENANT/SERVICE``
#: of another (reached only where a policy of that tenant allows it), optionally
#: aimed at one gateway binding it: ``modbus@gw-0042``.
DIAL_TARGET = re.compile(
    rf"(?:{SERVICE_NAME.pattern}/)?{SERVICE_NAME.pattern}(?::\d{{1,5}})?(?:@{SERVICE_NAME.pattern})?")

TOP_LEVEL_KEYS = {"state_dir", "log_level", "event_loop", "keystore", "link", "bind", "dial", "enrollment", "clock"}
CLOCK_KEYS = {"ntp_servers", "ntp_timeout"}
#: Queries run in parallel, one thread each; a few servers already outvote a bad one.
MAX_NTP_SERVERS = 8
#: An NTP answer slower than this is useless for timekeeping, and start-up waits for it.
MAX_NTP_TIMEOUT = 10.0
ENROLLMENT_KEYS = {"token_paths"}
#: A handful of places is plenty; the bound keeps the start-up scan cheap.
MAX_TOKEN_PATHS = 16
KEYSTORE_KEYS = {"backend", "tcti"}
LINK_KEYS = {"profile", "keepalive_interval", "ping_timeout", "nat_timeout", "window", "reconnect_initial",
             "reconnect_max", "stable_after", "proxy", "no_proxy", "prefer_relays", "transport"}
#: ``[link] transport``: TLS with Outpost's ALPN, the WebSocket, or TLS with the WebSocket as fallback.
LINK_TRANSPORTS = ("auto", "tls", "websocket")
#: Relays reached without the proxy: a few hosts or networks; more is a pasted file.
MAX_NO_PROXY = 64
BIND_KEYS = {"service", "target", "ports"}
DIAL_KEYS = {"service", "listen"}


def load_config(path: Path) -> AgentConfig:
    """Read and validate the agent config file at ``path``."""
    path = Path(path)
    try:
        document = load_toml_file(path, MAX_CONFIG_FILE)
    except FileNotFoundError:
        raise ConfigError(f"the config file {path} does not exist; create it or give another with --config") from None
    except OSError as error:
        raise ConfigError(f"the config file {path} cannot be read ({error.strerror or error}); check its permissions") from None
    except FileTooLarge:
        raise ConfigError(f"the config file {path} is larger than {MAX_CONFIG_FILE} bytes; is it the right file?") from None
    except UnicodeDecodeError:
        raise ConfigError(f"the config file {path} is not UTF-8 text; save it as UTF-8") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"the config file {path} is not valid TOML: {error}; fix that line") from None
    return _Parser(path).config(document)


class _Parser:
    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, key: str, what: str) -> ConfigError:
        return ConfigError(f"{self.path}: '{key}' {what}")

    def config(self, document: dict[str, Any]) -> AgentConfig:
        self.known(document, TOP_LEVEL_KEYS, "")
        state_dir = Path(self.string(document, "state_dir", str(DEFAULT_STATE_DIR), "state_dir"))
        if not state_dir.is_absolute():
            # Relative to the file, so the same file works from any working directory.
            state_dir = self.path.resolve().parent / state_dir
        log_level = self.string(document, "log_level", "info", "log_level").lower()
        if log_level not in LOG_LEVELS:
            raise self.fail("log_level", f"must be one of {', '.join(LOG_LEVELS)}, not {log_level!r}")
        loop = self.string(document, "event_loop", "auto", "event_loop").lower()
        if loop not in EVENT_LOOPS:
            raise self.fail("event_loop", f"must be one of {', '.join(EVENT_LOOPS)}, not {loop!r}")
        binds = tuple(self.bind(entry, i) for i, entry in enumerate(self.array(document, "bind")))
        dials = tuple(self.dial(entry, i) for i, entry in enumerate(self.array(document, "dial")))
        self.unique([b.service for b in binds], "bind", "service", "bind each service once")
        if len(binds) > MAX_BIND_SERVICES:
            raise self.fail("bind", f"has {len(binds)} entries; one tunnel binds at most {MAX_BIND_SERVICES} "
                            "services: split them across gateways' identities")
        self.unique([f"{d.listen_host}:{d.listen_port}" for d in dials], "dial", "listen", "give each dial its own port")
        link = self.table(document, "link")
        return AgentConfig(
            state_dir=state_dir,
            keystore=self.keystore(self.table(document, "keystore")),
            binds=binds,
            dials=dials,
            link=self.link(link),
            log_level=log_level,
            event_loop=loop,
            token_paths=self.token_paths(self.table(document, "enrollment")),
            clock=self.clock(self.table(document, "clock")),
            proxy=self.proxy(link),
        )

    def token_paths(self, table: dict[str, Any]) -> tuple[Path, ...] | None:
        self.known(table, ENROLLMENT_KEYS, "enrollment.")
        if "token_paths" not in table:
            return None
        value = table["token_paths"]
        if not isinstance(value, list) or not 1 <= len(value) <= MAX_TOKEN_PATHS:
            raise self.fail("enrollment.token_paths", f"must be a list of 1 to {MAX_TOKEN_PATHS} file paths in quotes")
        paths = []
        for item in value:
            if not isinstance(item, str) or not item.startswith("/"):
                raise self.fail("enrollment.token_paths", f"has {item!r}; give absolute paths such as \"/etc/outpost/enroll.token\"")
            paths.append(Path(item))
        return tuple(paths)

    def clock(self, table: dict[str, Any]) -> ClockSettings:
        self.known(table, CLOCK_KEYS, "clock.")
        servers = table.get("ntp_servers", [])
        if not isinstance(servers, list) or len(servers) > MAX_NTP_SERVERS:
            raise self.fail("clock.ntp_servers", f"must be a list of at most {MAX_NTP_SERVERS} server names in quotes")
        for server in servers:
            try:
                if not isinstance(server, str):
                    raise ValueError(server)
                split_server(server)
            except ValueError:
                raise self.fail("clock.ntp_servers", f"has {server!r}; give \"host\" or \"host:port\", "
                                "e.g. \"pool.ntp.org\"") from None
        timeout = table.get("ntp_timeout", DEFAULT_NTP_TIMEOUT)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= MAX_NTP_TIMEOUT:
            raise self.fail("clock.ntp_timeout", f"must be a number of seconds above 0 and at most {MAX_NTP_TIMEOUT:g}")
        return ClockSettings(ntp_servers=tuple(servers), ntp_timeout=float(timeout))

    def keystore(self, table: dict[str, Any]) -> KeyStoreSettings:
        self.known(table, KEYSTORE_KEYS, "keystore.")
        backend = self.string(table, "backend", "auto", "keystore.backend")
        if backend not in BACKENDS:
            raise self.fail("keystore.backend", f"must be one of {', '.join(BACKENDS)}, not {backend!r}")
        tcti = self.string(table, "tcti", DEFAULT_TCTI, "keystore.tcti")
        if not tcti:
            raise self.fail("keystore.tcti", f"is empty; remove it or give a TCTI such as {DEFAULT_TCTI!r}")
        try:
            return KeyStoreSettings(backend=backend, tcti=tcti)
        except ConfigError as error:
            # The settings know what is wrong; only this edge knows which file.
            raise ConfigError(f"{self.path}: {error}") from None

    def link(self, table: dict[str, Any]) -> LinkSettings:
        self.known(table, LINK_KEYS, "link.")
        profile = self.string(table, "profile", "ethernet", "link.profile")
        if profile not in LINK_PROFILES:
            raise self.fail("link.profile", f"must be one of {', '.join(LINK_PROFILES)}, not {profile!r}")
        window = table.get("window")
        if window is not None and (isinstance(window, bool) or not isinstance(window, int)
                                   or not MIN_LINK_WINDOW <= window <= MAX_LINK_WINDOW):
            raise self.fail("link.window", f"must be a whole number of bytes from {MIN_LINK_WINDOW} to {MAX_LINK_WINDOW}")
        settings = LinkSettings(
            profile=profile,
            keepalive_interval=self.seconds(table, "keepalive_interval"),
            ping_timeout=self.seconds(table, "ping_timeout"),
            nat_timeout=self.seconds(table, "nat_timeout"),
            window=window,
            reconnect_initial=self.seconds(table, "reconnect_initial"),
            reconnect_max=self.seconds(table, "reconnect_max"),
            stable_after=self.seconds(table, "stable_after"),
            prefer_relays=self.prefer_relays(table),
            transport=self.transport(table),
        )
        try:
            plan_from_settings(settings)  # the numbers must also make sense together
        except ConfigError as error:
            raise ConfigError(f"{self.path}: [link] {error}") from None
        return settings

    def prefer_relays(self, table: dict[str, Any]) -> tuple[str, ...]:
        value = table.get("prefer_relays", [])
        if (not isinstance(value, list) or len(value) > MAX_RELAYS
                or not all(isinstance(e, str) and e.strip() and not any(c.isspace() or c == "/" for c in e.strip())
                           for e in value)):
            raise self.fail("link.prefer_relays", f"must be a list of at most {MAX_RELAYS} relay host names (or "
                            "HOST:PORT) in quotes, e.g. [\"relay-eu-1.example.net\"]")
        return tuple(e.strip().lower() for e in value)

    def transport(self, table: dict[str, Any]) -> str:
        value = self.string(table, "transport", "auto", "link.transport")
        if value not in LINK_TRANSPORTS:
            raise self.fail("link.transport", f"must be one of {', '.join(LINK_TRANSPORTS)}, not {value!r}")
        return value

    def proxy(self, table: dict[str, Any]) -> ProxySettings:
        url = None
        if table.get("proxy") is not None:
            url = self.string(table, "proxy", "", "link.proxy")
            problem = proxy_problem(url)
            if problem is not None:
                raise self.fail("link.proxy", problem)
        return ProxySettings(url=url, no_proxy=self.no_proxy(table))

    def no_proxy(self, table: dict[str, Any]) -> tuple[str, ...]:
        value = table.get("no_proxy", [])
        if (not isinstance(value, list) or len(value) > MAX_NO_PROXY
                or not all(isinstance(e, str) and e.strip() and not any(c.isspace() for c in e.strip()) for e in value)):
            raise self.fail("link.no_proxy", f"must be a list of at most {MAX_NO_PROXY} host names, domains "
                            "or addresses in quotes, e.g. [\"relay.corp.lan\", \"10.0.0.0/8\"]")
        return tuple(e.strip().lower() for e in value)

    def bind(self, entry: Any, index: int) -> BindConfig:
        where = f"bind[{index}]"
        if not isinstance(entry, dict):
            raise self.fail(where, "must be a table: [[bind]] with service and target")
        self.known(entry, BIND_KEYS, where + ".")
        service = self.service(entry, where)
        host, port = self.address(entry, "target", where)
        return BindConfig(service=service, target_host=host, target_port=port, ports=self.ports(entry, where))

    def ports(self, entry: dict[str, Any], where: str) -> tuple[tuple[int, str, int], ...]:
        """``ports = { 502 = "127.0.0.1:502" }``: each port the service declares, mapped to a local target."""
        table = entry.get("ports", {})
        if not isinstance(table, dict):
            raise self.fail(f"{where}.ports", "must be a table: ports = { 502 = \"127.0.0.1:502\" }")
        mapped = []
        for declared in table:
            if not declared.isdigit() or not 1 <= int(declared) <= 65535:
                raise self.fail(f"{where}.ports", f"names {declared!r}; each key is a port, 1-65535")
            host, port = self.address(table, declared, f"{where}.ports")
            mapped.append((int(declared), host, port))
        return tuple(sorted(mapped))

    def dial(self, entry: Any, index: int) -> DialConfig:
        where = f"dial[{index}]"
        if not isinstance(entry, dict):
            raise self.fail(where, "must be a table: [[dial]] with service and listen")
        self.known(entry, DIAL_KEYS, where + ".")
        service = self.service(entry, where, dial=True)
        host, port = self.address(entry, "listen", where)
        return DialConfig(service=service, listen_host=host, listen_port=port)

    def service(self, entry: dict[str, Any], where: str, *, dial: bool = False) -> str:
        """A bind names a service of this gateway's tenant; a dial may also name ``TENANT/SERVICE``."""
        if "service" not in entry:
            raise self.fail(f"{where}.service", "is missing; name the service")
        service = self.string(entry, "service", "", f"{where}.service")
        if not (DIAL_TARGET if dial else SERVICE_NAME).fullmatch(service):
            form = (", optionally after a tenant as \"acme/scada\" and before a gateway as \"modbus@gw-0042\""
                    if dial else "")
            raise self.fail(
                f"{where}.service",
                f"is {service!r}; a service name is lowercase letters, digits and '-' (at most 63){form}",
            )
        return service

    def address(self, entry: dict[str, Any], key: str, where: str) -> tuple[str, int]:
        name = f"{where}.{key}"
        if key not in entry:
            raise self.fail(name, "is missing; give it as \"host:port\", e.g. \"127.0.0.1:502\"")
        text = self.string(entry, key, "", name)
        host, sep, port_text = text.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not sep or not host or not port_text.isdigit() or any(c in host for c in " /[]"):
            raise self.fail(name, f"is {text!r}; give it as \"host:port\", e.g. \"127.0.0.1:502\"")
        port = int(port_text)
        if not 1 <= port <= 65535:
            raise self.fail(name, f"has port {port}, outside 1-65535; fix the port")
        return host, port

    def seconds(self, table: dict[str, Any], key: str) -> float | None:
        value = table.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= MAX_LINK_SECONDS:
            raise self.fail(f"link.{key}", f"must be a number of seconds above 0 and at most {MAX_LINK_SECONDS:g}")
        return float(value)

    def string(self, table: dict[str, Any], key: str, default: str, name: str) -> str:
        value = table.get(key, default)
        if not isinstance(value, str):
            raise self.fail(name, "must be a string in quotes")
        return value

    def table(self, document: dict[str, Any], key: str) -> dict[str, Any]:
        value = document.get(key, {})
        if not isinstance(value, dict):
            raise self.fail(key, f"must be a table: [{key}]")
        return value

    def array(self, document: dict[str, Any], key: str) -> list[Any]:
        value = document.get(key, [])
        if not isinstance(value, list):
            raise self.fail(key, f"must be written as [[{key}]] tables")
        return value

    def known(self, table: dict[str, Any], allowed: set[str], prefix: str) -> None:
        for key in table:
            if key not in allowed:
                raise self.fail(prefix + key, f"is not a setting; remove it or use one of {', '.join(sorted(allowed))}")

    def unique(self, values: list[str], section: str, key: str, advice: str) -> None:
        seen: set[str] = set()
        for index, value in enumerate(values):
            if value in seen:
                raise self.fail(f"{section}[{index}].{key}", f"repeats {value!r}; {advice}")
            seen.add(value)
