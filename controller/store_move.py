"""``outpost-controller store-move``: a box's SQLite store copied into an empty PostgreSQL database.

For a box that started on SQLite and now needs relays (or a second
controller) on other machines, which share a store only through PostgreSQL.

- The source is read in one SQLite read transaction: a consistent snapshot
  even if a process writes meanwhile. But what a running box commits after
  the snapshot would not be moved, so the move refuses to run while any
  process has the store file open (``serve``, a relay beside it): every
  open SQLite connection in WAL mode holds a shared lock on one byte of the
  ``-shm`` file for as long as it is open, and the kernel drops it when the
  process dies, so the test cannot be fooled by a stale file.
- The target is written in ONE PostgreSQL transaction, the schema included
  (PostgreSQL's DDL is transactional), under the store's write lock: a
  failure anywhere (PostgreSQL stopped, a row PostgreSQL refuses, Ctrl-C)
  leaves the target as it was. Before committing, the copy is checked inside
  that transaction: the rows of every table counted on both sides and the
  audit chain verified on the target with the data directory's key.
- Identity counters (policy, audit, status change and grant ids) continue
  past the highest id SQLite ever gave out (its ``sqlite_sequence``, which
  remembers deleted rows too), so the next row never takes a moved row's id.
- A source whose newest audit events were deleted is refused: its
  ``sqlite_sequence`` gave out ids past the chain's last event.
- A source at an older schema version (or from before versions were
  recorded: every store ever written has the ``meta`` table, and
  ``apply_schema`` brings a version-less one up from nothing) is moved
  from a migrated copy, and the source stays exactly as it was, the way
  back. The copy is taken from the same read snapshot with SQLite's online
  backup API and brought to ``SCHEMA_VERSION`` by opening it as ``serve``
  does (``Store``, so ``apply_schema`` and its migrations, not a second
  copy of them), then moved like a current store. Where the copy lives, and
  how a killed move's copy is removed by the next: ``store_move_copy``.
- A source of a newer schema is refused: it needs a newer controller.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import re
import sqlite3
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from controller.audit_chain import KEY_FILE, read_key, rows_of, verify
from controller.errors import StartupError
from controller.settings import STORE_FILE
from controller.store import (
    BUSY_TIMEOUT_SECONDS,
    StoreLocationError,
    StoreTooNew,
    StoreUnreachable,
    apply_schema,
    is_url,
)
from controller.store_move_copy import discard_abandoned_copies, migrated_copy, out_of_room
from controller.store_schema import SCHEMA, SCHEMA_VERSION
from shared.errors import EXIT_DATAERR, EXIT_TEMPFAIL, EXIT_USAGE

#: Every table of the schema, in the order the schema creates them (the order they are copied in).
TABLES = tuple(re.findall(r"CREATE TABLE IF NOT EXISTS (\w+)", SCHEMA))
#: Source rows read and handed to COPY at a time: bounds the memory a large audit table takes.
COPY_BATCH_ROWS = 5000
#: EX_CANTCREAT (sysexits): the target cannot be written because it already holds a store.
EXIT_TARGET_NOT_EMPTY = 73
#: What a shell reports for a command ended by Ctrl-C (128 + SIGINT).
EXIT_INTERRUPTED = 130
#: The byte of an SQLite ``-shm`` file every open WAL connection holds a shared lock on
#: (SQLite's os_unix.c: UNIX_SHM_DMS = (22 + SQLITE_SHM_NLOCK) * 4 + SQLITE_SHM_NLOCK = 128).
SHM_DMS_OFFSET = 128
#: ``struct flock`` on Linux for F_GETLK: short, short, off_t, off_t, pid_t, padding (64-bit, and 32-bit
#: builds with large-file support, as Debian's Python is; l_type, the answer read, comes first in every layout).
_FLOCK = "hhqqi4x"
#: What SQLite's -shm file takes on disk from the start (its first 32 KiB region): room a reader of a
#: store in WAL mode needs before it reads anything.
SHM_FILE_BYTES = 32768


class MoveUsageError(StartupError):
    exit_code = EXIT_USAGE


class SourceRefused(StartupError):
    """The SQLite store cannot be moved as it is (not a store, damaged, another schema)."""

    exit_code = EXIT_DATAERR


class SourceBusy(StartupError):
    exit_code = EXIT_TEMPFAIL


class TargetNotEmpty(StartupError):
    exit_code = EXIT_TARGET_NOT_EMPTY


@dataclass(frozen=True)
class Moved:
    table: str
    rows: int


def store_in_use(path: Path) -> bool:
    """True while some process (not this one) has the SQLite store ``path`` open."""
    try:  # SQLite names the -shm file after the store's real path: a linked store.sqlite3 is held there
        descriptor = os.open(f"{path.resolve()}-shm", os.O_RDONLY)
    except FileNotFoundError:
        return False  # no process has opened it in WAL mode since the last one closed it
    try:
        probe = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, SHM_DMS_OFFSET, 1, 0)
        answer = fcntl.fcntl(descriptor, fcntl.F_GETLK, probe)
        return bool(struct.unpack(_FLOCK, answer)[0] != fcntl.F_UNLCK)
    finally:
        os.close(descriptor)


def source_path(data_dir: Path) -> Path:
    """The SQLite store of ``data_dir``; one sentence when there is none to move."""
    if not data_dir.is_dir():
        raise MoveUsageError(f"--data {data_dir} is not a directory; give the box's data directory.")
    path = data_dir / STORE_FILE
    if path.is_file():
        return path
    if (data_dir / "ca" / "ca.pem").is_file():
        raise MoveUsageError(
            f"{data_dir} holds no SQLite store ({STORE_FILE}): its controller keeps its store in PostgreSQL "
            "already (--store); to copy one PostgreSQL database into another use pg_dump (docs/deployment.md)."
        )
    raise MoveUsageError(f"{data_dir} is not a controller data directory (no {STORE_FILE}); check --data.")


def source_version(source: sqlite3.Connection) -> int | None:
    """The schema version a snapshot records; None for a store from before versions were recorded."""
    row = source.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    return int(row[0]) if row is not None else None


@contextlib.contextmanager
def snapshot(path: Path) -> Iterator[sqlite3.Connection]:
    """``path`` opened read-only inside one read transaction (a consistent snapshot), checked to be a store of ours."""
    try:
        connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    except sqlite3.Error as error:
        raise SourceRefused(f"Cannot open {path} ({error}); check its permissions.") from None
    try:
        try:
            connection.execute("BEGIN")
            tables = {row[0] for row in connection.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")}
            damage = [row[0] for row in connection.execute("PRAGMA quick_check")]
        except sqlite3.DatabaseError as error:
            if out_of_room(error):
                raise SourceRefused(
                    f"Cannot read {path}: the file system holding it is full ({error}: a reader of a store in WAL "
                    f"mode needs room for its {SHM_FILE_BYTES // 1024} KiB -shm file); free space there and run "
                    "store-move again. Nothing was written.") from None
            raise SourceRefused(f"{path} is not a readable SQLite store ({error}); restore it from a backup "
                                "(outpost-controller restore) and move that.") from None
        if damage != ["ok"]:
            raise SourceRefused(f"{path} is damaged ({damage[0]}); restore it from a backup "
                                "(outpost-controller restore) and move that.")
        if "meta" not in tables:
            raise SourceRefused(f"{path} is not an Outpost store (it has no meta table); check --data.")
        version = source_version(connection)
        if version is not None and version > SCHEMA_VERSION:
            raise StoreTooNew(str(path), version)
        unknown = sorted(tables - set(TABLES))
        if unknown:
            raise SourceRefused(f"{path} holds the table {unknown[0]!r}, which is not one of Outpost's schema "
                                f"{SCHEMA_VERSION}; nothing was moved.")
        yield connection
    finally:
        connection.close()


def check_to(url: str) -> None:
    """One sentence (exit 64) for a ``--to`` that is not a PostgreSQL URL libpq can read; nothing opened."""
    if not url.startswith(("postgresql://", "postgres://")):
        # Not echoed when it may hold a password (``USER:PASSWORD@HOST`` with the scheme forgotten).
        shown = f"{url.split(':', 1)[0]}://..." if is_url(url) else "..." if "@" in url else repr(url)
        raise MoveUsageError(f"--to {shown} is not a PostgreSQL URL; give postgresql://USER@HOST/DATABASE.")
    try:
        from controller.store_postgres import check_url
    except ImportError:
        raise StoreLocationError("store-move needs psycopg 3: apt install python3-psycopg "
                                 "(or pip install 'outpost[postgresql]').") from None
    check_url(url)


def _connect(url: str) -> Any:
    """An autocommit connection to ``url`` (the transaction is begun by hand, as the store does)."""
    import psycopg

    from controller.store_postgres import connection_string
    from controller.store_postgres_sql import row_factory, safe_url

    try:
        connection = psycopg.connect(connection_string(url), autocommit=True, row_factory=row_factory)
        connection.execute(f"SET lock_timeout = {int(BUSY_TIMEOUT_SECONDS * 1000)}")
    except psycopg.OperationalError as error:
        raise StoreUnreachable(f"Cannot reach {safe_url(url)} ({_first_line(error)}); check --to and that "
                               "PostgreSQL is running and lets this user in. Nothing was written.") from None
    return connection


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _check_empty(db: Any, where: str) -> None:
    for table in TABLES:
        if db.table_exists(table) and db.query_one(f"SELECT 1 AS present FROM {table} LIMIT 1") is not None:
            raise TargetNotEmpty(f"The database {where} already holds an Outpost store (its table {table} has rows); "
                                 "give an empty database (createdb) to move into. Nothing was written.")


def _copy_table(source: sqlite3.Connection, db: Any, connection: Any, table: str) -> int:
    """Every row of ``table`` from the snapshot into the target by COPY; the number of rows."""
    columns = [row[1] for row in source.execute(f"PRAGMA table_info({table})")]
    if not columns:
        return 0  # a table the source does not have yet holds nothing to move
    missing = sorted(set(columns) - db.columns(table))
    if missing:
        raise SourceRefused(f"The column {table}.{missing[0]} of the source is not in schema {SCHEMA_VERSION}; "
                            "nothing was moved.")
    names = ", ".join(columns)
    rows = source.execute(f"SELECT {names} FROM {table}")
    copied = 0
    with connection.cursor() as cursor, cursor.copy(f"COPY {table} ({names}) FROM STDIN") as copy:
        while batch := rows.fetchmany(COPY_BATCH_ROWS):
            for row in batch:
                copy.write_row(row)
            copied += len(batch)
    return copied


def _continue_counters(source: sqlite3.Connection, db: Any) -> None:
    """Each identity column's next value past every id the source ever gave out."""
    given: dict[str, int] = {}
    with contextlib.suppress(sqlite3.OperationalError):  # no sqlite_sequence: no AUTOINCREMENT row ever
        given = {str(name): int(seq) for name, seq in source.execute("SELECT name, seq FROM sqlite_sequence")}
    identities = db.query("SELECT table_name, column_name FROM information_schema.columns "
                          "WHERE table_schema = current_schema() AND is_identity = 'YES'")
    for row in identities:
        table, column = str(row["table_name"]), str(row["column_name"])
        if table not in TABLES:
            continue
        highest = db.query_one(f"SELECT coalesce(max({column}), 0) AS top FROM {table}")
        top = max(int(highest["top"]) if highest is not None else 0, given.get(table, 0))
        called = "true" if top > 0 else "false"  # false: the next value is 1 itself
        db.execute(f"SELECT setval(pg_get_serial_sequence(?, ?), ?::bigint, {called})", (table, column, max(top, 1)))


def _chain_key(source: sqlite3.Connection, data_dir: Path) -> bytes | None:
    """The audit chain's key; None for a box from before the chain, which has no key and no chained event
    (``serve --store`` makes the key and starts the chain after the moved events, as it would on SQLite)."""
    path = data_dir / KEY_FILE
    if not path.exists():
        audit = {row[1] for row in source.execute("PRAGMA table_info(audit)")}
        if "mac" not in audit or source.execute("SELECT 1 FROM audit WHERE mac IS NOT NULL LIMIT 1").fetchone() is None:
            return None
    return read_key(path)


def _check_copy(source: sqlite3.Connection, db: Any, moved: list[Moved], key: bytes | None, where: str) -> None:
    """The rows counted on both sides, and the audit chain verified on the target, before anything commits."""
    for entry in moved:
        there = db.query_one(f"SELECT count(*) AS n FROM {entry.table}")
        here = source.execute(f"SELECT count(*) FROM {entry.table}").fetchone() if entry.rows else (0,)
        if there is None or int(there["n"]) != entry.rows or int(here[0]) != entry.rows:
            raise SourceRefused(f"The table {entry.table} counted {there['n'] if there else '?'} rows in {where} "
                                f"after copying {entry.rows}; nothing was written.")
    if key is None:
        return  # no event is chained: nothing a key could verify
    chain = verify(rows_of(db), key)
    if not chain.ok:
        raise SourceRefused(f"The audit chain does not verify on the copy (event {chain.first_bad}: {chain.problem}); "
                            "nothing was written. Check the source with outpost-controller audit verify --data DIR.")


def _check_audit_tail(source: sqlite3.Connection, path: Path) -> None:
    """The audit chain cannot show its newest events deleted, but SQLite's counter remembers the ids it
    gave out: moved with a gap at its end, the first event written after the move would follow the gap
    and the chain would read as broken by the move."""
    try:
        given = source.execute("SELECT seq FROM sqlite_sequence WHERE name = 'audit'").fetchone()
    except sqlite3.OperationalError:
        return  # no sqlite_sequence: no audit event was ever written
    newest = int(source.execute("SELECT coalesce(max(id), 0) FROM audit").fetchone()[0])
    if given is not None and int(given[0]) > newest:
        raise SourceRefused(f"The audit log of {path} ends at event {newest}, but the store gave out ids up to "
                            f"{int(given[0])}: events {newest + 1} to {int(given[0])} were deleted; nothing was "
                            "written. Restore the store from a backup (outpost-controller restore) and move that.")


@dataclass(frozen=True)
class Outcome:
    moved: list[Moved]
    #: The source's schema version when it was older and a migrated copy was moved (None: from before
    #: versions); SCHEMA_VERSION when it was moved as it was.
    source_version: int | None
    #: The directories of killed moves' copies removed first (``discard_abandoned_copies``).
    discarded: list[str] = field(default_factory=list)


def move(data_dir: Path, url: str) -> list[Moved]:
    """Copy ``data_dir``'s SQLite store into the empty PostgreSQL database ``url``: all of it or nothing."""
    return move_store(data_dir, url).moved


def move_store(data_dir: Path, url: str) -> Outcome:
    """``move``, and the schema version the source was at."""
    check_to(url)
    path = source_path(data_dir)
    if store_in_use(path):
        raise SourceBusy(f"A process has {path} open (outpost-controller serve, or a relay beside it); stop every "
                         "process on this data directory first, so the move is complete. Nothing was written.")
    discarded = discard_abandoned_copies(data_dir)
    with snapshot(path) as source:
        _check_audit_tail(source, path)
        key = _chain_key(source, data_dir)
        version = source_version(source)
        if version == SCHEMA_VERSION:
            return Outcome(_move_snapshot(source, key, url), version, discarded)
        with migrated_copy(source, path, data_dir) as copy, snapshot(copy) as migrated:
            return Outcome(_move_snapshot(migrated, key, url), version, discarded)


def _move_snapshot(source: sqlite3.Connection, key: bytes | None, url: str) -> list[Moved]:
    """The snapshot ``source`` (at SCHEMA_VERSION) written into ``url`` in one transaction, checked, committed."""
    connection = _connect(url)
    import psycopg

    from controller.store_postgres import WRITE_LOCK_KEY, PostgresTransaction
    from controller.store_postgres_sql import safe_url

    where = safe_url(url)
    doing = "the schema"
    committing = False
    try:
        connection.execute(f"BEGIN; SELECT pg_advisory_xact_lock({WRITE_LOCK_KEY})".encode())
        db = PostgresTransaction(connection)
        _check_empty(db, where)
        apply_schema(db, where)
        # The version row the schema just wrote comes again with the source's meta rows (the same version).
        db.execute("DELETE FROM meta")
        moved = []
        for table in TABLES:
            doing = f"a row of {table}"
            moved.append(Moved(table, _copy_table(source, db, connection, table)))
        doing = "the identity counters"
        _continue_counters(source, db)
        _check_copy(source, db, moved, key, where)
        committing = True
        connection.execute("COMMIT")
    except psycopg.errors.LockNotAvailable:
        raise SourceBusy(f"{where} is locked: another process is writing it (a second store-move, or a serve "
                         f"--store on it) and held its write lock past {BUSY_TIMEOUT_SECONDS:g} s; nothing was "
                         "written. Let it finish or stop it, then run store-move again.") from None
    except psycopg.OperationalError as error:
        if committing:
            raise StoreUnreachable(
                f"{where} went away while committing ({_first_line(error)}); whether the move committed is "
                "unknown: run store-move again, it refuses a target that holds the store.") from None
        raise StoreUnreachable(f"{where} went away while writing {doing} ({_first_line(error)}); nothing was "
                               "written (the transaction was rolled back). Run store-move again.") from None
    except psycopg.Error as error:
        advice = ("fix the row in the SQLite store" if doing.startswith("a row") else
                  "check that the --to user owns the database (docs/deployment.md)")
        raise SourceRefused(f"PostgreSQL refused {doing} ({_first_line(error)}); nothing was written: "
                            f"{advice}.") from None
    finally:
        # Closing without COMMIT is a rollback: the server drops the whole transaction.
        connection.close()
    return moved


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "store-move", help="copy this box's SQLite store into an empty PostgreSQL database (the box stopped)")
    parser.add_argument("--data", required=True, help="the box's data directory (its store.sqlite3 is moved)")
    parser.add_argument("--to", required=True, help="postgresql://USER@HOST/DATABASE: an empty database")


def run(args: argparse.Namespace) -> int:
    """Move; one line per table and the next step."""
    data = Path(args.data).absolute()
    try:
        outcome = move_store(data, args.to)
    except KeyboardInterrupt:
        print("store-move interrupted; nothing was written (the transaction was rolled back).")
        return EXIT_INTERRUPTED
    from controller.store_postgres_sql import safe_url

    for name in outcome.discarded:
        print(f"removed {data / name}: the copy of a store-move that was killed before it ended")
    for entry in outcome.moved:
        print(f"{entry.table}: {entry.rows} rows")
    if outcome.source_version != SCHEMA_VERSION:
        print(f"the store was at schema version {outcome.source_version or 'from before versions'}: a copy of it was "
              f"migrated to {SCHEMA_VERSION} and moved; the store itself was not changed.")
    print(f"moved {data / STORE_FILE} into {safe_url(args.to)}: the counts match and the audit chain verifies. "
          f"Next: outpost-controller serve --data {data} --store {safe_url(args.to)} (and the same --listen and "
          f"--advertise); the SQLite file is left as it was, do not start serve on it again.")
    return 0
