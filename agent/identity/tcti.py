"""TCTI strings: how the agent reaches a TPM, checked before any TPM library is loaded.

The TSS's own loader accepts almost anything and fails later with a TSS log
line nobody reads, so the agent parses ``keystore.tcti`` itself and names a
valid example when it cannot. This module does not import tpm2-pytss: the
configuration can be checked on a gateway that has no TPM library at all.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from agent.errors import ConfigError

#: The kernel's resource manager device, which flushes what a crashed process left behind.
DEFAULT_TCTI = "device:/dev/tpmrm0"
#: A TPM simulator in socket mode (swtpm), as the tests and development machines use.
EXAMPLE_SOCKET_TCTI = "swtpm:host=127.0.0.1,port=2321"
#: Socket TCTIs: swtpm's own protocol, and Microsoft's simulator protocol.
SOCKET_TCTIS = ("swtpm", "mssim")
#: The port both simulators listen on when none is given.
DEFAULT_SOCKET_PORT = 2321
#: Linux paths are at most PATH_MAX (4096) bytes; longer is not a path.
MAX_TCTI_LENGTH = 4096

_HOST = re.compile(r"^[A-Za-z0-9.\-:\[\]]+$")


@dataclass(frozen=True)
class Tcti:
    """A parsed TCTI: the loader name (``device``, ``swtpm``, ``mssim``) and its settings."""

    name: str
    #: For ``device``: the character device path.
    device: str | None = None
    #: For socket TCTIs: where the simulator listens.
    host: str | None = None
    port: int | None = None

    @property
    def conf(self) -> str:
        """The configuration string the TSS loader expects for this TCTI."""
        if self.name == "device":
            return self.device or ""
        return f"host={self.host},port={self.port}"

    def __str__(self) -> str:
        return f"{self.name}:{self.conf}"


def parse_tcti(text: str) -> Tcti:
    """Parse ``device:/dev/PATH`` or ``swtpm|mssim:host=H,port=P``; else ConfigError."""
    if not isinstance(text, str) or len(text) > MAX_TCTI_LENGTH or any(c.isspace() for c in text):
        raise _bad(text)
    name, sep, conf = text.partition(":")
    if name == "device":
        # A relative path would depend on the service's working directory.
        if not sep or not conf.startswith("/dev/") or "\x00" in conf or "/../" in conf:
            raise _bad(text)
        return Tcti(name="device", device=conf)
    if name in SOCKET_TCTIS:
        return _parse_socket(name, conf, text)
    raise _bad(text)


def _parse_socket(name: str, conf: str, text: str) -> Tcti:
    host = "localhost"
    port = DEFAULT_SOCKET_PORT
    seen: set[str] = set()
    for item in filter(None, conf.split(",")):
        key, eq, value = item.partition("=")
        if not eq or key in seen or key not in ("host", "port") or not value:
            raise _bad(text)
        seen.add(key)
        if key == "host":
            if not _HOST.match(value):
                raise _bad(text)
            host = value
        else:
            if not value.isdigit() or not 0 < int(value) < 65535:
                # 65535 is excluded: the control channel listens on port + 1.
                raise _bad(text)
            port = int(value)
    return Tcti(name=name, host=host, port=port)


def _bad(text: object) -> ConfigError:
    shown = text if isinstance(text, str) and len(text) <= 200 else f"{str(text)[:200]}..."
    return ConfigError(
        f"keystore.tcti {shown!r} is not a TCTI string the agent understands; "
        f"use for example {DEFAULT_TCTI!r} or {EXAMPLE_SOCKET_TCTI!r}"
    )
