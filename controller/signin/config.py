"""The sign-in part of the controller's configuration file: providers, the group to role mapping, sessions.

```toml
admin_credential = true          # false: the break-glass admin token is refused

[signin]
session_lifetime = "8h"

[[signin.provider]]
name = "corp"
issuer = "https://login.example.com/realms/ops"
client_id = "outpost"
client_secret = "..."            # optional: a confidential client
name_claim = "preferred_username"
groups_claim = "groups"
ca_file = "/etc/outpost/idp-ca.pem"   # optional: the issuer's TLS CA when not a public one

[signin.roles]
ops-admins = ["admin"]
acme-admins = ["admin:acme"]
```
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from controller.errors import StartupError
from controller.names import NAME_PATTERN

#: Eight hours: one working day; a person signs in again the next morning.
DEFAULT_SESSION_LIFETIME = 8 * 3600
#: Five minutes: shorter than a sign-in itself takes; a day: past it a lost
#: laptop holds a working credential for too long.
MIN_SESSION_LIFETIME = 300
MAX_SESSION_LIFETIME = 24 * 3600
#: Roles a group may map to; each may be tenant-scoped as ``ROLE:TENANT``.
ROLES = ("admin", "operator", "approver", "auditor")
_DURATION = re.compile(r"(\d+)([smhd]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def config_error(message: str) -> StartupError:
    return StartupError(message)


@dataclasses.dataclass(frozen=True)
class Provider:
    name: str
    issuer: str
    client_id: str
    client_secret: str | None = dataclasses.field(default=None, repr=False)
    name_claim: str = "preferred_username"
    groups_claim: str = "groups"
    ca_file: Path | None = None
    #: The tenant people of this provider are created in.
    tenant: str = "default"


@dataclasses.dataclass(frozen=True)
class Grant:
    """One role, everywhere (``tenant`` None) or in one tenant."""

    role: str
    tenant: str | None = None

    def __str__(self) -> str:
        return self.role if self.tenant is None else f"{self.role}:{self.tenant}"


@dataclasses.dataclass(frozen=True)
class SigninSettings:
    providers: tuple[Provider, ...] = ()
    #: group name -> the grants its members get
    roles: dict[str, tuple[Grant, ...]] = dataclasses.field(default_factory=dict)
    session_lifetime: int = DEFAULT_SESSION_LIFETIME
    #: False: the break-glass admin token is refused on every request.
    admin_credential: bool = True

    def provider(self, name: str | None) -> Provider | None:
        if name is None:
            return self.providers[0] if len(self.providers) == 1 else None
        return next((p for p in self.providers if p.name == name), None)

    def grants_of(self, groups: list[str]) -> tuple[Grant, ...]:
        found = {grant for group in groups for grant in self.roles.get(group, ())}
        return tuple(sorted(found, key=str))


def parse_grant(value: object, where: str) -> Grant:
    if not isinstance(value, str):
        raise config_error(f"{where}: a role is a string such as \"admin\" or \"admin:acme\".")
    role, _, tenant = value.partition(":")
    if role not in ROLES or (tenant and not NAME_PATTERN.fullmatch(tenant)) or (_ and not tenant):
        raise config_error(f"{where}: {value!r} is not a role; use one of {', '.join(ROLES)}, "
                           "optionally with :TENANT (admin:acme).")
    return Grant(role, tenant or None)


def parse_duration(value: object, where: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    match = _DURATION.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise config_error(f"{where}: {value!r} is not a duration; write seconds or 30m, 8h, 1d.")
    return int(match.group(1)) * _UNITS[match.group(2)]


def _string(table: dict[str, Any], key: str, where: str, default: str | None = None) -> str:
    value = table.get(key, default)
    if not isinstance(value, str) or not value:
        raise config_error(f"{where}: {key} must be a non-empty string.")
    return value


def parse_provider(table: object, base: Path, index: int) -> Provider:
    where = f"[[signin.provider]] number {index + 1}"
    if not isinstance(table, dict):
        raise config_error(f"{where} must be a table.")
    known = {"name", "issuer", "client_id", "client_secret", "name_claim", "groups_claim", "ca_file", "tenant"}
    unknown = sorted(set(table) - known)
    if unknown:
        raise config_error(f"{where}: unknown setting {unknown[0]!r}; the settings are {', '.join(sorted(known))}.")
    issuer = _string(table, "issuer", where).rstrip("/")
    parts = urlsplit(issuer)
    if parts.scheme != "https" or not parts.hostname or parts.query or parts.fragment:
        raise config_error(f"{where}: issuer {issuer!r} must be an https:// URL (an issuer is never plain HTTP).")
    secret = table.get("client_secret")
    if secret is not None and (not isinstance(secret, str) or not secret):
        raise config_error(f"{where}: client_secret must be a non-empty string, or left out for a public client.")
    ca_file = table.get("ca_file")
    ca_path = None
    if ca_file is not None:
        ca_path = base / _string(table, "ca_file", where)
        if not ca_path.is_file():
            raise config_error(f"{where}: ca_file {str(ca_path)!r} does not exist.")
    name = _string(table, "name", where, default=f"provider{index + 1}")
    tenant = _string(table, "tenant", where, default="default")
    for value, what in ((name, "name"), (tenant, "tenant")):
        if not NAME_PATTERN.fullmatch(value):
            raise config_error(f"{where}: {what} {value!r} must be lowercase letters, digits or hyphens.")
    return Provider(name=name, issuer=issuer, client_id=_string(table, "client_id", where), client_secret=secret,
                    name_claim=_string(table, "name_claim", where, "preferred_username"),
                    groups_claim=_string(table, "groups_claim", where, "groups"), ca_file=ca_path, tenant=tenant)


def parse_config(document: dict[str, Any], base: Path) -> SigninSettings:
    unknown = sorted(set(document) - {"admin_credential", "signin"})
    if unknown:
        raise config_error(f"unknown setting {unknown[0]!r} in the configuration; known: admin_credential, [signin].")
    admin = document.get("admin_credential", True)
    if not isinstance(admin, bool):
        raise config_error("admin_credential must be true or false.")
    signin = document.get("signin", {})
    if not isinstance(signin, dict):
        raise config_error("[signin] must be a table.")
    unknown = sorted(set(signin) - {"provider", "roles", "session_lifetime"})
    if unknown:
        raise config_error(f"[signin]: unknown setting {unknown[0]!r}; known: provider, roles, session_lifetime.")
    raw_providers = signin.get("provider", [])
    if not isinstance(raw_providers, list):
        raise config_error("[[signin.provider]] must be an array of tables.")
    providers = tuple(parse_provider(t, base, i) for i, t in enumerate(raw_providers))
    if len({p.name for p in providers}) != len(providers):
        raise config_error("[[signin.provider]]: two providers have the same name; give each its own name.")
    raw_roles = signin.get("roles", {})
    if not isinstance(raw_roles, dict):
        raise config_error("[signin.roles] must be a table of group = [roles].")
    roles: dict[str, tuple[Grant, ...]] = {}
    for group, grants in raw_roles.items():
        where = f"[signin.roles] {group}"
        if isinstance(grants, str):
            grants = [grants]
        if not isinstance(grants, list):
            raise config_error(f"{where} must be a list of roles.")
        roles[group] = tuple(parse_grant(g, where) for g in grants)
    lifetime = parse_duration(signin.get("session_lifetime", DEFAULT_SESSION_LIFETIME), "[signin] session_lifetime")
    if not MIN_SESSION_LIFETIME <= lifetime <= MAX_SESSION_LIFETIME:
        raise config_error(f"[signin] session_lifetime must be between {MIN_SESSION_LIFETIME} and "
                           f"{MAX_SESSION_LIFETIME} seconds, not {lifetime}.")
    if not admin and not providers:
        raise config_error("admin_credential = false needs at least one [[signin.provider]]: "
                           "otherwise nobody could manage this controller.")
    return SigninSettings(providers, roles, lifetime, admin)


def load_config(path: Path) -> SigninSettings:
    try:
        document = tomllib.loads(path.read_text())
    except OSError as error:
        raise config_error(f"cannot read the configuration {str(path)!r}: {error.strerror}.") from None
    except tomllib.TOMLDecodeError as error:
        raise config_error(f"the configuration {str(path)!r} is not valid TOML: {error}.") from None
    return parse_config(document, path.parent)
