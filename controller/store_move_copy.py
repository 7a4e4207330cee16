"""The private, migrated copy ``store-move`` moves an older store from, and what a killed move left of one.

The copy lives in a directory of the data directory (``WORK_PREFIX``, 0700;
the store file 0600, as it holds every identity): on the file system the
store already lives on, writable by the store's owner, outside what
``backup`` copies. The block that makes it removes it on every way out,
Ctrl-C included. Only a killed process (SIGKILL, power loss) leaves one
behind, a full copy of the store; so for as long as the directory is in use
its maker holds an exclusive ``flock`` on it (the kernel lets go when the
process dies, however it dies), and the next ``store-move`` removes every
such directory nobody holds (``discard_abandoned_copies``). A move running
at the same moment keeps its own.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import sqlite3
import tempfile
from collections.abc import Iterator
from pathlib import Path

from controller.errors import StartupError
from controller.settings import STORE_FILE
from controller.store import Store
from controller.store_schema import SCHEMA_VERSION
from shared.errors import EXIT_DATAERR

#: Prefix of the private directory an older source is copied and migrated in, inside the data directory.
WORK_PREFIX = ".store-move-"
#: Pages copied per step of the online backup of an older source (4 MiB at 4 KiB pages): between steps
#: Python code runs, so Ctrl-C stops a copy of a large store within one step, not at its end.
BACKUP_PAGES_PER_STEP = 1024
#: SQLite's answers when a file system has no room left: SQLITE_FULL, and the extended codes of a write
#: refused (SQLITE_IOERR_WRITE) and of a -shm file that could not grow (SQLITE_IOERR_SHMSIZE, which is
#: how a read-only open of a WAL store on a full disk fails).
SQLITE_OUT_OF_ROOM = frozenset({13, 778, 4874})


class CopyRefused(StartupError):
    """The older store could not be copied or migrated; the store itself is unchanged."""

    exit_code = EXIT_DATAERR


def discard_abandoned_copies(data_dir: Path) -> list[str]:
    """Remove the copies of moves that were killed (nobody holds their lock); returns their names."""
    removed = []
    for work in sorted(data_dir.glob(f"{WORK_PREFIX}*")):
        try:
            fd = os.open(work, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:
            continue  # not a directory of ours (a symlink, a file), or gone meanwhile
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a move in progress
            shutil.rmtree(work, ignore_errors=True)
            removed.append(work.name)
        finally:
            os.close(fd)
    return removed


@contextlib.contextmanager
def _held(work: Path) -> Iterator[None]:
    """An exclusive lock on the directory ``work`` for as long as the block runs (or the process lives)."""
    fd = os.open(work, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def migrated_copy(source: sqlite3.Connection, path: Path, data_dir: Path) -> Iterator[Path]:
    """The snapshot ``source`` of the store ``path`` copied into a private directory of ``data_dir`` and
    brought to SCHEMA_VERSION there as ``serve`` would; the directory is removed when the block ends, however."""
    pages, page_size = (int(source.execute(f"PRAGMA {name}").fetchone()[0]) for name in ("page_count", "page_size"))
    needed = pages * page_size

    def no_room(reason: str) -> CopyRefused:
        return CopyRefused(
            f"Cannot write the migrated copy of {path} in {data_dir} ({reason}); it needs about "
            f"{_size(needed)} free there (more while it migrates): free space on that file system and run "
            "store-move again. Nothing was written and the store is unchanged.")

    def cannot_write(error: OSError) -> CopyRefused:
        reason = error.strerror or type(error).__name__
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            return no_room(reason)
        return CopyRefused(f"Cannot write the migrated copy of {path} in {data_dir} ({reason}); run store-move as "
                           "the user who owns the data directory. Nothing was written and the store is unchanged.")

    try:
        work = Path(tempfile.mkdtemp(prefix=WORK_PREFIX, dir=data_dir))  # 0700
    except OSError as error:
        raise cannot_write(error) from None
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, work, ignore_errors=True)
        cleanup.enter_context(_held(work))
        free = os.statvfs(work)
        if free.f_bavail * free.f_frsize < needed:
            raise no_room(f"{_size(free.f_bavail * free.f_frsize)} free")
        copy = work / STORE_FILE
        try:
            os.close(os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            writer = sqlite3.connect(str(copy))
            try:
                source.backup(writer, pages=BACKUP_PAGES_PER_STEP, progress=_between_steps)
            finally:
                writer.close()
            Store(copy).close()  # what serve does on opening it: apply_schema and the migrations, committed
        except OSError as error:
            raise cannot_write(error) from None
        except sqlite3.Error as error:
            if out_of_room(error):
                raise no_room(str(error)) from None
            raise CopyRefused(f"Migrating a copy of {path} to schema version {SCHEMA_VERSION} failed ({error}); "
                              "nothing was written and the store is unchanged.") from None
        yield copy


def _between_steps(status: int, remaining: int, total: int) -> None:
    """Nothing: being Python, it lets a pending Ctrl-C stop the backup between two steps."""


def out_of_room(error: sqlite3.Error) -> bool:
    return getattr(error, "sqlite_errorcode", None) in SQLITE_OUT_OF_ROOM


def _size(size: int) -> str:
    return f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size // 1024} KiB"
