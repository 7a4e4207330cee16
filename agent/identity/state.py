"""The agent's state directory: what enrollment stored, and the live status.

Layout (docs/architecture.md): ``key.pem`` or ``key.tpm.json`` (the key
store's), ``ca.pem``, ``cert.pem``, ``identity.json`` and ``status.json``.
Enrollment is committed when ``identity.json`` exists; it is written last.

Every file is replaced atomically and durably (shared/fsutil.py), so a crash
at any point leaves each file whole, old or new; the crash guarantees and
what a restart does with each half-finished state are in docs/architecture.md.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509

from agent.errors import NotEnrolledError
from shared.fsutil import atomic_write, discard_unfinished_writes, ensure_private_dir
from shared.trust import cert_not_after

CA_FILE = "ca.pem"
CERT_FILE = "cert.pem"
IDENTITY_FILE = "identity.json"
STATUS_FILE = "status.json"
#: The controller's relay list as last sent in AUTH_OK (refreshes enrollment's).
RELAYS_FILE = "relays.json"
#: identity.json holds names, a URI and a relay list: a few KiB at most. The
#: bound keeps a damaged or hostile file from being read into memory whole.
MAX_STATE_FILE = 256 * 1024
#: Bumped when identity.json changes incompatibly.
IDENTITY_FORMAT = 1
#: The certificates are public; 0644 lets monitoring read them.
PUBLIC_FILE_MODE = 0o644


@dataclass(frozen=True)
class EnrolledIdentity:
    """Who this gateway is, as stored by a completed enrollment."""

    name: str
    tenant: str
    uri: str
    controller_url: str
    relays: list[str] = field(default_factory=list)
    ca_pem: str = ""
    cert_pem: str = ""
    key_backend: str = ""
    #: Unix seconds when enrollment completed.
    enrolled_at: float = 0.0

    def certificate(self) -> x509.Certificate:
        """The current leaf certificate."""
        return x509.load_pem_x509_certificate(self.cert_pem.encode())

    def ca_certificate(self) -> x509.Certificate:
        """The pinned controller CA."""
        return x509.load_pem_x509_certificate(self.ca_pem.encode())

    def not_after(self) -> datetime.datetime:
        """When the current certificate expires (aware, UTC)."""
        return cert_not_after(self.certificate())


class StateDir:
    """One agent state directory (default ``/var/lib/outpost-agent``)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def is_enrolled(self) -> bool:
        return (self.path / IDENTITY_FILE).exists()

    def load(self) -> EnrolledIdentity:
        """The stored identity; NotEnrolledError when enrollment never completed."""
        if not self.is_enrolled():
            raise NotEnrolledError(
                f"this gateway is not enrolled (no {IDENTITY_FILE} in {self.path}); "
                "enroll it with: outpost-agent enroll --token FILE"
            )
        try:
            record = json.loads(self._read_text(IDENTITY_FILE))
            ca_pem = self._read_text(CA_FILE)
            cert_pem = self._read_text(CERT_FILE)
            identity = EnrolledIdentity(
                name=str(record["name"]),
                tenant=str(record["tenant"]),
                uri=str(record["uri"]),
                controller_url=str(record["controller_url"]),
                relays=[str(relay) for relay in record["relays"]],
                ca_pem=ca_pem,
                cert_pem=cert_pem,
                key_backend=str(record["key_backend"]),
                enrolled_at=float(record["enrolled_at"]),
            )
            identity.certificate()
            identity.ca_certificate()
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise NotEnrolledError(
                f"the enrolled state in {self.path} is damaged ({_short(error)}); "
                f"remove {self.path / IDENTITY_FILE} and enroll again with a new token"
            ) from None
        return identity

    def save_enrollment(self, identity: EnrolledIdentity) -> None:
        """Store a completed enrollment; ``identity.json`` goes last as the commit marker."""
        ensure_private_dir(self.path)
        discard_unfinished_writes(self.path)
        atomic_write(self.path / CA_FILE, identity.ca_pem.encode(), PUBLIC_FILE_MODE)
        atomic_write(self.path / CERT_FILE, identity.cert_pem.encode(), PUBLIC_FILE_MODE)
        record = asdict(identity)
        del record["ca_pem"], record["cert_pem"]
        record["format"] = IDENTITY_FORMAT
        atomic_write(self.path / IDENTITY_FILE, _json_bytes(record), PUBLIC_FILE_MODE)

    def replace_certificate(self, cert_pem: str) -> None:
        """Store a renewed leaf; the old one stays in place until the new one is durable."""
        x509.load_pem_x509_certificate(cert_pem.encode())
        discard_unfinished_writes(self.path)
        atomic_write(self.path / CERT_FILE, cert_pem.encode(), PUBLIC_FILE_MODE)

    def save_relays(self, relays: list[str]) -> None:
        """Store the relay list the controller sent last, for the next start."""
        atomic_write(self.path / RELAYS_FILE, _json_bytes({"relays": list(relays)}), PUBLIC_FILE_MODE)

    def load_relays(self) -> list[str] | None:
        """The stored relay list, or None (absent or unreadable: enrollment's list is used)."""
        try:
            record = json.loads(self._read_text(RELAYS_FILE))
            relays = record["relays"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if not isinstance(relays, list) or not relays or not all(isinstance(r, str) for r in relays):
            return None
        return relays

    def write_status(self, status: dict[str, Any]) -> None:
        """Replace ``status.json`` (tunnel state and counters, for ``outpost-agent status``)."""
        ensure_private_dir(self.path)
        atomic_write(self.path / STATUS_FILE, _json_bytes(status), PUBLIC_FILE_MODE)

    def read_status(self) -> dict[str, Any] | None:
        """The last status written by ``outpost-agent run``, or None when there is none."""
        try:
            status = json.loads(self._read_text(STATUS_FILE))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            # A status that cannot be read is reported as absent: it is advisory.
            return None
        return status if isinstance(status, dict) else None

    def _read_text(self, name: str) -> str:
        with open(self.path / name, "rb") as handle:
            data = handle.read(MAX_STATE_FILE + 1)
        if len(data) > MAX_STATE_FILE:
            raise ValueError(f"{name} is larger than {MAX_STATE_FILE} bytes")
        return data.decode()


def _json_bytes(record: dict[str, Any]) -> bytes:
    return (json.dumps(record, indent=2, sort_keys=True) + "\n").encode()


def _short(error: BaseException) -> str:
    if isinstance(error, KeyError):
        return f"missing field {error}"
    if isinstance(error, OSError):
        return f"{Path(error.filename).name if error.filename else 'a file'}: {error.strerror or error}"
    return str(error).splitlines()[0][:200] if str(error) else type(error).__name__
