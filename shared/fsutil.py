"""Durable file writes: a reader sees the old file or the new one, never half.

A gateway loses power at any moment (a modem reset, a technician pulling the
plug). Every state file is therefore written to a temporary file in the same
directory, flushed to disk, renamed over the old one and the directory entry
flushed too, so the rename itself survives the power cut.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import time
from pathlib import Path

#: Private keys, tokens and credentials: readable by the owner only.
PRIVATE_FILE_MODE = 0o600
#: State directories hold private keys, so only the owner may list them.
PRIVATE_DIR_MODE = 0o700
#: A temporary this old belongs to a write that was cut short (a crash between
#: create and rename): no write of a few KiB takes ten minutes, even on a worn
#: SD card, and a younger one may be another process's write in progress.
UNFINISHED_WRITE_AGE = 600.0
#: The temporaries ``atomic_write`` makes: ``.NAME.<12 hex>.tmp``.
_TEMPORARY = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp$")


def atomic_write(path: Path | str, data: bytes, mode: int = PRIVATE_FILE_MODE) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old or the new file.

    The file gets exactly ``mode`` (not widened by the umask, not narrowed
    either). Raises OSError when the directory is not writable.
    """
    target = Path(path)
    temp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")  # matches _TEMPORARY
    # O_EXCL: never write through a file (or symlink) someone placed there.
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, target)
    except BaseException:
        try:
            os.unlink(temp)
        except FileNotFoundError:
            pass
        raise
    fsync_directory(target.parent)


def fsync_directory(directory: Path | str) -> None:
    """Flush a directory entry (a rename or unlink) to disk."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_private_dir(directory: Path | str) -> Path:
    """Create ``directory`` (and parents) if missing; a new one is owner-only.

    Each directory made here is flushed into its parent before anything is
    written inside it: a file made durable in a directory whose own entry was
    lost with the power is lost too.
    """
    path = Path(directory)
    missing: list[Path] = []
    level = path
    while not level.exists() and level != level.parent:
        missing.append(level)
        level = level.parent
    for level in reversed(missing):
        # Parents get the default mode, as ``mkdir -p`` gives them; only the leaf holds keys.
        try:
            level.mkdir(mode=PRIVATE_DIR_MODE if level == path else 0o777)
        except FileExistsError:
            if not level.is_dir():
                raise
            # Another process made it a moment ago; its flush may not have happened yet.
        fsync_directory(level.parent)
    if not path.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path))
    return path


def discard_unfinished_writes(directory: Path | str, now: float | None = None) -> list[str]:
    """Remove temporaries of writes that a crash cut short; returns their names.

    They are invisible to every reader (the real file is the old or the new
    one), but a cut-short write of a key leaves key bytes behind, and a
    gateway that loses power often would collect them.
    """
    now = time.time() if now is None else now
    removed: list[str] = []
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return removed
    for entry in entries:
        if not _TEMPORARY.match(entry.name) or not entry.is_file(follow_symlinks=False):
            continue
        try:
            if now - entry.stat(follow_symlinks=False).st_mtime < UNFINISHED_WRITE_AGE:
                continue
            os.unlink(entry.path)
        except FileNotFoundError:
            continue
        removed.append(entry.name)
    return removed
