"""``outpost-controller backup`` and ``restore``: a data directory, copied whole, while the controller runs.

A backup is a directory: the CA (``ca/``), the listener's certificate
(``tls/``), the admin credential's hash, the audit chain's key and the
metrics credential (without the key, the restored audit trail could not be
verified, nor continued as one chain), and, for the SQLite store, a copy of
``store.sqlite3`` made with SQLite's online backup API (a consistent
snapshot, taken while the controller keeps writing; a file copy could catch
a commit half-way). ``outpostctl.toml`` is left out: it holds the admin
token's only plaintext, which belongs with the operator. A PostgreSQL store
is backed up with ``pg_dump`` (docs/deployment.md); the backup then holds the
CA that store belongs to.

Both commands build in a hidden sibling directory and rename it into place,
so an interrupted run leaves nothing that looks complete; restore refuses a
data directory that already holds something, and a backup whose store is of
a newer schema (nothing restored).
"""

from __future__ import annotations

import os
import secrets
import shutil
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from controller.audit_chain import KEY_FILE as AUDIT_KEY_FILE
from controller.errors import StartupError
from controller.metrics_server import METRICS_TOKEN_FILE
from controller.settings import STORE_FILE, Settings
from controller.store import Store
from shared.fsutil import fsync_directory

#: What a data directory holds besides the store, each copied as it is.
KEPT = ("ca", "tls", "admin.hash", AUDIT_KEY_FILE, METRICS_TOKEN_FILE)
#: Pages copied per step of the online backup: small steps let the running
#: controller commit between them (SQLite restarts a step a writer disturbed).
BACKUP_PAGES_PER_STEP = 1024




def _copy_store(source: Path, target: Path) -> None:
    """A consistent copy of the SQLite store at ``source`` (another process may be writing it)."""
    os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    reader = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
    writer = sqlite3.connect(str(target))
    try:
        reader.backup(writer, pages=BACKUP_PAGES_PER_STEP)
    finally:
        writer.close()
        reader.close()
    with open(target, "rb") as handle:
        os.fsync(handle.fileno())


def _copy_tree(source: Path, target: Path) -> None:
    for name in KEPT:
        path = source / name
        if path.is_dir():
            shutil.copytree(path, target / name, symlinks=False)
        elif path.is_file():
            shutil.copy2(path, target / name)
    for root, _, files in os.walk(target):
        for name in files:
            with open(Path(root) / name, "rb") as handle:
                os.fsync(handle.fileno())
        fsync_directory(root)


def _reason(error: OSError) -> str:
    """The system's words for ``error``: copytree gathers its failures into one shutil.Error that has none itself."""
    if error.strerror:
        return error.strerror
    failures = error.args[0] if isinstance(error, shutil.Error) and error.args else None
    if isinstance(failures, list) and failures and isinstance(failures[0], tuple):
        return str(failures[0][-1])
    return str(error) or type(error).__name__


@contextmanager
def _staged(final: Path, doing: str) -> Iterator[Path]:
    """A hidden sibling of ``final`` to build in: renamed into place when the block ends well, removed otherwise.

    An OSError becomes "Cannot ``doing``" with the system's reason.
    """
    staging = final.parent / f".{final.name}.{secrets.token_hex(4)}.partial"
    staging.mkdir(mode=0o700)
    try:
        yield staging
        os.chmod(staging, 0o700)
        fsync_directory(staging)
        os.rename(staging, final)
        fsync_directory(final.parent)
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise StartupError(f"Cannot {doing} ({_reason(error)}); check the disk and its permissions.") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def backup(data_dir: Path, target: Path) -> bool:
    """Copy ``data_dir`` to the new directory ``target``; True when the SQLite store was in it."""
    settings = Settings(data_dir=data_dir)
    if not settings.ca_cert_path.is_file() or not settings.ca_key_path.is_file():
        raise StartupError(f"{data_dir} is not a controller data directory (no ca/ca.pem); check --data.")
    if target.exists():
        raise StartupError(f"{target} already exists; give the backup a new path.")
    if not target.parent.is_dir():
        raise StartupError(f"The directory {target.parent} does not exist; create it or choose another path.")
    with _staged(target, f"write the backup {target}") as staging:
        _copy_tree(data_dir, staging)
        with_store = settings.store_path.is_file()
        if with_store:
            _copy_store(settings.store_path, staging / STORE_FILE)
    return with_store


def restore(source: Path, data_dir: Path) -> bool:
    """Make ``data_dir`` (absent or empty) from the backup ``source``; True when it held a SQLite store."""
    if not (source / "ca" / "ca.pem").is_file() or not (source / "ca" / "ca.key").is_file():
        raise StartupError(f"{source} is not a backup made by outpost-controller backup (no ca/ca.key in it).")
    if data_dir.exists() and (not data_dir.is_dir() or any(data_dir.iterdir())):
        raise StartupError(
            f"The data directory {data_dir} is not empty; restore into a new directory (or move this one away first)."
        )
    if not data_dir.parent.is_dir():
        raise StartupError(f"The directory {data_dir.parent} does not exist; create it or choose another --data.")
    with _staged(data_dir, f"restore into {data_dir}") as staging:
        _copy_tree(source, staging)
        with_store = (source / STORE_FILE).is_file()
        if with_store:
            _copy_store(source / STORE_FILE, staging / STORE_FILE)
            # Opened once here: an older store is migrated, a newer one refused before anything is in place.
            Store(staging / STORE_FILE).close()
            for side in ("-wal", "-shm"):
                (staging / f"{STORE_FILE}{side}").unlink(missing_ok=True)
        if data_dir.exists():
            data_dir.rmdir()  # empty, checked above
    return with_store
