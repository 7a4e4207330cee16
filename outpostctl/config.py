"""Where ``outpostctl`` finds the controller, and the typed config it builds once.

The controller writes ``outpostctl.toml`` (keys ``url``: the management API,
its own listener with ``--api-listen``; ``ca``; ``token``) into its data
directory on first start and at ``outpost-controller admin-token rotate``;
it is the only copy of the token (the controller keeps a hash). ``find_config_file`` looks for it in
a fixed, documented order so that a new operator gets a working command
without reading anything; ``load_config`` turns it into a ``CtlConfig``.
This module is the edge: it is the only place that reads the environment or
the config file, and it is handed ``environ``, ``cwd`` and ``home`` so that
callers (and tests) decide what those are.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from outpostctl.errors import ConfigError
from shared.toml_file import FileTooLarge, load_toml_file

CONFIG_FILE_NAME = "outpostctl.toml"
#: Names an explicit config file; beats every implicit location but --config.
CONFIG_ENV_VAR = "OUTPOSTCTL_CONFIG"
#: Looked at after --config, $OUTPOSTCTL_CONFIG, --data and ./outpostctl.toml:
#: the operator's own file, then a host-wide one, then the data directory of a
#: controller installed from the .deb on this same host.
USER_CONFIG_RELATIVE = Path(".config") / "outpost" / CONFIG_FILE_NAME
SYSTEM_CONFIG_PATHS: tuple[Path, ...] = (
    Path("/etc/outpost") / CONFIG_FILE_NAME,
    Path("/var/lib/outpost-controller") / CONFIG_FILE_NAME,
    # Where the packaged unit's controller (--data /var/lib/outpost-controller/data) writes it.
    Path("/var/lib/outpost-controller/data") / CONFIG_FILE_NAME,
)
#: The file holds three short values; anything bigger is not our file.
MAX_CONFIG_FILE_BYTES = 64 * 1024
#: A bearer token is visible ASCII (RFC 6750's b64token is a subset of it).
VISIBLE_ASCII_FIRST, VISIBLE_ASCII_LAST = 0x21, 0x7E
START_HINT = (
    "start the controller (outpost-controller serve --data DIR) and pass --data DIR "
    f"or set {CONFIG_ENV_VAR}"
)


@dataclass(frozen=True)
class CtlConfig:
    """How to reach one controller's management API as its administrator."""

    #: Base URL of the controller, ``https://host:port`` without a trailing slash.
    url: str
    #: The controller CA's PEM file; the only CA the client trusts.
    ca_path: Path
    #: The bearer: the admin token, a person's session (outpostctl login), or "" for neither.
    #: Kept out of ``repr`` so it never reaches a log.
    token: str = field(repr=False)
    #: The file this config was read from, named in error sentences.
    source: Path | None = None


def find_config_file(
    *,
    config_flag: Path | None,
    data_flag: Path | None,
    environ: Mapping[str, str],
    cwd: Path,
    home: Path | None,
    system_paths: tuple[Path, ...] | None = None,
) -> Path:
    """The config file to use, first match in the documented order.

    An explicitly named file (``--config``, ``$OUTPOSTCTL_CONFIG``, ``--data``)
    must exist: silently falling back to another controller's file would send
    commands to the wrong fleet. ``system_paths`` defaults to SYSTEM_CONFIG_PATHS.
    Raises ConfigError naming every place looked.
    """
    explicit: list[tuple[Path | None, str]] = [
        (config_flag, "--config"),
        (Path(environ[CONFIG_ENV_VAR]) if environ.get(CONFIG_ENV_VAR) else None, CONFIG_ENV_VAR),
        (data_flag / CONFIG_FILE_NAME if data_flag is not None else None, "--data"),
    ]
    for path, origin in explicit:
        if path is None:
            continue
        resolved = path if path.is_absolute() else cwd / path
        if not resolved.is_file():
            raise ConfigError(
                f"the config file {resolved} (from {origin}) does not exist; {START_HINT}"
            )
        return resolved

    implicit = [cwd / CONFIG_FILE_NAME]
    if home is not None:
        implicit.append(home / USER_CONFIG_RELATIVE)
    implicit.extend(SYSTEM_CONFIG_PATHS if system_paths is None else system_paths)
    for path in implicit:
        if path.is_file():
            return path
    looked = ", ".join(str(p) for p in implicit)
    raise ConfigError(
        f"no outpostctl config found (looked for --config, ${CONFIG_ENV_VAR}, --data DIR, {looked}); "
        f"{START_HINT}"
    )


def load_config(path: Path) -> CtlConfig:
    """Read and check ``path``; a relative ``ca`` is relative to the file's folder."""
    try:
        values = load_toml_file(path, MAX_CONFIG_FILE_BYTES)
    except PermissionError:
        raise ConfigError(
            f"cannot read {path}: permission denied (it holds the admin token, so it is "
            "readable only by the controller's user; run outpostctl as that user or copy the file)"
        ) from None
    except OSError as error:
        raise ConfigError(f"cannot read {path}: {error.strerror or error}") from None
    except FileTooLarge:
        raise ConfigError(f"{path} is larger than {MAX_CONFIG_FILE_BYTES} bytes; it is not an outpostctl config") from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise ConfigError(f"{path} is not valid TOML ({error}); fix it or let the controller write it again") from None
    return config_from_values(values, path)


def config_from_values(values: Mapping[str, object], source: Path) -> CtlConfig:
    """Check the three keys of an outpostctl config and build the typed config."""
    def required(key: str) -> str:
        value = values.get(key)
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{source} has no {key!r} value (a non-empty string); add it or let the controller write the file again")
        return value.strip()

    url = required("url").rstrip("/")
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise ConfigError(f"{source}: url must be https://HOST:PORT, the controller's address (got {url!r})")
    ca_path = Path(required("ca"))
    if not ca_path.is_absolute():
        ca_path = source.parent / ca_path
    if not ca_path.is_file():
        raise ConfigError(f"{source}: the CA file {ca_path} does not exist; point 'ca' at the controller's ca/ca.pem")
    # A person's file names the controller only: they sign in (outpostctl login) instead.
    token = required("token") if "token" in values else ""
    if not all(VISIBLE_ASCII_FIRST <= ord(char) <= VISIBLE_ASCII_LAST for char in token):
        # Refused here, not by http.client, whose error would quote the token.
        raise ConfigError(
            f"{source}: the token holds spaces or characters an HTTP header cannot carry; "
            "copy the file again, or make a new token with outpost-controller admin-token rotate"
        )
    return CtlConfig(url=url, ca_path=ca_path, token=token, source=source)
