"""Durable file writes: a reader sees the old file or the new one, never half.

A gateway loses power at any moment (a modem reset, a technician pulling the
plug). Every state file is therefore written to a temporary file in the same
directory, flushed to disk, renamed over the old one and the directory entry
flushed too, so the rename itself survives the power cut.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

#: Private keys, tokens and credentials: readable by the owner only.
PRIVATE_FILE_MODE = 0o600
#: State directories hold private keys, so only the owner may list them.
PRIVATE_DIR_MODE = 0o700


def atomic_write(path: Path | str, data: bytes, mode: int = PRIVATE_FILE_MODE) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old or the new file.

    The file gets exactly ``mode`` (not widened by the umask, not narrowed
    either). Raises OSError when the directory is not writable.
    """
    target = Path(path)
    temp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
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
    """Create ``directory`` (and parents) if missing; a new one is owner-only."""
    path = Path(directory)
    path.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
    return path
