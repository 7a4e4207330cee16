"""The management API's admin credential: the controller keeps only a salted hash of it.

The plaintext exists in one place, the operator's ``outpostctl.toml``, written
when the data directory is created and at each rotation
(``outpost-controller admin-token rotate``). The controller holds
``admin.hash`` (``hmac-sha256$SALT$DIGEST``, 0600) and compares the presented
token's digest with it in constant time. The file is looked at again whenever
it changed (one ``stat`` per management request), so a rotation invalidates
the old credential at once, also in a controller that is running.

A fast hash is enough: the credential is 32 random bytes, which no guessing
reaches, so a slow password hash would only put tens of milliseconds of CPU
on the event loop for every management request. The salt keeps two data
directories with the same token from having the same hash file.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import secrets
from pathlib import Path

from controller.errors import StartupError
from shared.fsutil import atomic_write, fsync_directory

log = logging.getLogger(__name__)

#: The management credential: 32 random bytes, urlsafe base64 (256 bits: never guessed).
ADMIN_TOKEN_BYTES = 32
#: A random salt per hash: 128 bits, so no two data directories share a hash line.
SALT_BYTES = 16
SCHEME = "hmac-sha256"
#: A hash line is under 100 bytes; a larger file is not ours and is not read whole.
MAX_HASH_FILE_BYTES = 4096


def new_token() -> str:
    return secrets.token_urlsafe(ADMIN_TOKEN_BYTES)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _digest(salt: bytes, token: str) -> bytes:
    return hmac.new(salt, token.encode("utf-8"), hashlib.sha256).digest()


def hash_line(token: str) -> str:
    """What ``admin.hash`` holds for ``token``: ``hmac-sha256$SALT$DIGEST``."""
    salt = secrets.token_bytes(SALT_BYTES)
    return f"{SCHEME}${_b64(salt)}${_b64(_digest(salt, token))}"


def parse_hash_line(text: str) -> tuple[bytes, bytes]:
    """(salt, digest) of a hash line; ValueError if it is not one."""
    scheme, salt, digest = text.strip().split("$")
    if scheme != SCHEME:
        raise ValueError(f"unknown scheme {scheme!r}")
    return _unb64(salt), _unb64(digest)


def matches(salt: bytes, digest: bytes, presented: str) -> bool:
    """Whether ``presented`` is the credential; constant time in what was right of a guess."""
    return hmac.compare_digest(_digest(salt, presented), digest)


def write_hash(path: Path, token: str, owner: tuple[int, int] | None = None) -> None:
    """Replace ``path`` with the hash of ``token`` (0600), owned by ``owner`` (uid, gid) from its first byte."""
    data = (hash_line(token) + "\n").encode("ascii")
    if owner is None:
        atomic_write(path, data, mode=0o600)
        return
    # Owned by the controller's user before it is renamed into place: a running controller
    # never sees a hash it cannot read (root rotating the packaged service's credential).
    temp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        try:
            os.fchown(fd, *owner)
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def data_dir_owner(data_dir: Path) -> tuple[int, int] | None:
    """(uid, gid) new credential files must have when root writes into another user's data directory."""
    info = data_dir.stat()
    if os.geteuid() != 0 or info.st_uid == 0:
        return None
    return info.st_uid, info.st_gid


def read_hash(path: Path) -> tuple[bytes, bytes]:
    """(salt, digest) from ``path``; StartupError with what to do when it is missing or unreadable."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_HASH_FILE_BYTES + 1)
        if len(raw) > MAX_HASH_FILE_BYTES:
            raise ValueError("too large")
        return parse_hash_line(raw.decode("ascii"))
    except OSError as error:
        raise StartupError(
            f"Cannot read the admin credential's hash {path} ({error.strerror}); "
            "run outpost-controller admin-token rotate --data DIR to set a new one."
        ) from None
    except (ValueError, UnicodeDecodeError):
        raise StartupError(
            f"{path} is not an admin credential hash; "
            "run outpost-controller admin-token rotate --data DIR to set a new one."
        ) from None


def migrate_plaintext(plaintext_path: Path, hash_path: Path) -> bool:
    """Replace a plaintext ``admin.token`` (older data directories) by its hash; True if one was migrated.

    The same credential keeps working (operators have it in outpostctl.toml);
    only the controller's copy becomes a hash. The hash is in place before
    the plaintext goes, so a crash in between loses nothing.
    """
    if not plaintext_path.exists():
        return False
    if not hash_path.exists():
        token = plaintext_path.read_text(encoding="ascii").strip()
        if not token:
            raise StartupError(
                f"{plaintext_path} is empty; run outpost-controller admin-token rotate --data DIR to set a new credential."
            )
        write_hash(hash_path, token)
    plaintext_path.unlink()
    fsync_directory(plaintext_path.parent)
    log.warning("the admin credential in %s is now kept as a hash only (%s); the plaintext file was removed",
                plaintext_path, hash_path.name)
    return True


class AdminCredential:
    """Checks presented tokens against ``admin.hash``, reloaded whenever the file changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int, int, int] | None = None
        self._hash: tuple[bytes, bytes] | None = None
        self._reload()
        if self._hash is None:
            read_hash(path)  # raises the StartupError that says what to do

    def _reload(self) -> None:
        try:
            info = os.stat(self.path)
        except OSError:
            self._stamp, self._hash = None, None
            return
        stamp = (info.st_ino, info.st_mtime_ns, info.st_ctime_ns, info.st_size)
        if stamp == self._stamp:
            return
        try:
            self._hash = read_hash(self.path)
        except StartupError as error:
            log.error("the admin credential refuses every request: %s", error)
            self._hash = None
        self._stamp = stamp

    def check(self, presented: str) -> bool:
        """True if ``presented`` is the current admin credential (a missing or broken hash file: never)."""
        self._reload()
        if self._hash is None:
            return False
        salt, digest = self._hash
        return matches(salt, digest, presented)
