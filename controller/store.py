"""The controller's store: one interface, two engines.

``Store(location)`` opens either: a path is an SQLite file (controller/store_sqlite.py,
the embedded default in the data directory), a ``postgresql://`` URL a PostgreSQL
database that several controller and relay processes share
(controller/store_postgres.py). Both keep the same guarantees:

- One writer's read-modify-write never interleaves with another's, in this
  process or any other: ``transaction()`` takes the store's one write lock
  before its first read (SQLite: ``BEGIN IMMEDIATE``; PostgreSQL: a
  transaction-scoped advisory lock), so two processes never both see a token unused.
- A commit is durable before ``transaction()`` returns, and a transaction
  that fails (an error, a crash, the database gone) leaves nothing behind.
- A read (``query``) never waits for a writer.

The SQL is written once, in the dialect both engines share: ``?``
placeholders (the PostgreSQL store translates them), ``INTEGER``, ``REAL``,
``TEXT`` and ``BLOB`` columns, ``INTEGER PRIMARY KEY AUTOINCREMENT`` for a
sequence, ``INSERT ... ON CONFLICT``, ``RETURNING`` instead of ``lastrowid``.

The schema, its version and how it grows are in controller/store_schema.py.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol

from controller.errors import ControllerError, StartupError
from controller.store_schema import (
    ADDED_COLUMNS,
    ADDED_INDEXES,
    APPEND_ONLY_TABLES,
    SCHEMA,
    SCHEMA_VERSION,
    split_statements,
)
from shared.errors import EXIT_DATAERR, EXIT_UNAVAILABLE, EXIT_USAGE

#: The values of one statement's ``?`` placeholders.
Parameters = tuple[object, ...]

#: How long a writer waits for another process's transaction before failing;
#: every transaction here is a handful of row writes, so seconds is generous.
BUSY_TIMEOUT_SECONDS = 10.0
class Row(Protocol):
    """One result row: by column name (``row["name"]``) or position; ``keys()`` names the columns."""

    def __getitem__(self, key: str | int, /) -> Any: ...

    def keys(self) -> list[str]: ...


class Cursor(Protocol):
    """What ``Transaction.execute`` returns: rows changed, and rows of a ``RETURNING`` clause."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class StoreUnavailable(ControllerError):
    """The store cannot be reached now (PostgreSQL down or restarting); nothing of the request was written.

    The sentence goes to peers, enrolled or not: where the store is stays in this process's log.
    """

    def __init__(self, where: str, reason: str = "") -> None:
        #: Where the store is and why it failed, as the database driver said it (logs and startup sentences).
        self.where = where
        self.reason = reason
        super().__init__(
            "store_unavailable",
            "The controller cannot reach its store right now; nothing was changed. Retry in a few seconds.",
            503,
        )


class StoreLocationError(StartupError):
    """``--store`` names nothing this controller can open."""

    exit_code = EXIT_USAGE


class StoreUnreachable(StartupError):
    """The store exists in the configuration but does not answer."""

    exit_code = EXIT_UNAVAILABLE


class StoreTooNew(StartupError):
    """The store was written by a newer controller; this one must not touch it."""

    exit_code = EXIT_DATAERR

    def __init__(self, where: str, version: int) -> None:
        super().__init__(
            f"The store {where} has schema version {version}, newer than this outpost-controller knows "
            f"({SCHEMA_VERSION}); upgrade outpost-controller (nothing was changed in the store)."
        )


def is_url(location: Path | str) -> bool:
    """True for a ``scheme://`` location (a database server); False for a file path."""
    return isinstance(location, str) and re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", location) is not None


class Store:
    """The store as this process's threads see it; ``Store(location)`` opens the engine the location names.

    Handlers run on the event loop, and the blocking work (transactions that
    fsync, CA signatures) runs in worker threads (controller/blocking.py);
    every thread has a connection of its own, and the write transactions of
    this process take one lock in turn, so they queue here rather than in the
    database, while the database's own lock orders them against other processes.
    """

    #: "sqlite" or "postgresql".
    engine: ClassVar[str] = ""
    #: Whether commits that insert ``status_changes`` rows wake ``wait_for_changes`` at once.
    notifies: ClassVar[bool] = False

    def __new__(cls, location: Path | str) -> Store:
        if cls is Store:
            if is_url(location):
                if not str(location).startswith(("postgresql://", "postgres://")):
                    scheme = str(location).split(":", 1)[0]
                    raise StoreLocationError(
                        f"--store {scheme}://... is not a store this controller knows; give a postgresql:// URL "
                        "or leave --store out for the SQLite file in the data directory."
                    )
                try:
                    from controller.store_postgres import PostgresStore
                except ImportError:
                    raise StoreLocationError(
                        "--store postgresql://... needs psycopg 3: apt install python3-psycopg "
                        "(or pip install 'outpost[postgresql]')."
                    ) from None
                return object.__new__(PostgresStore)
            from controller.store_sqlite import SQLiteStore

            return object.__new__(SQLiteStore)
        return object.__new__(cls)

    def __init__(self, location: Path | str) -> None:
        #: Write transactions committed by this process (the relay's tests count them).
        self.commits = 0

    def describe(self) -> str:
        """Where the store is, for sentences and logs (never a password)."""
        raise NotImplementedError

    def transaction(self) -> contextlib.AbstractContextManager[Transaction]:
        """A write transaction holding the store's write lock: commits on success, rolls back on error."""
        raise NotImplementedError

    def query(self, sql: str, parameters: Parameters = ()) -> list[Row]:
        """Rows of one read-only statement (its own implicit snapshot)."""
        raise NotImplementedError

    def query_one(self, sql: str, parameters: Parameters = ()) -> Row | None:
        rows = self.query(sql, parameters)
        return rows[0] if rows else None

    def close(self) -> None:
        """Close every thread's connection (after the last transaction of any thread)."""
        raise NotImplementedError

    async def wait_for_changes(self, timeout: float) -> None:
        """Return when another process may have committed a status change, or after ``timeout``."""
        import asyncio

        await asyncio.sleep(timeout)

    def _open_schema(self) -> None:
        """Bring the store to ``SCHEMA_VERSION``, or refuse a newer one before writing anything."""
        with self.transaction() as db:
            apply_schema(db, self.describe())


class Transaction:
    """The statements of one open transaction; each engine's subclass runs them."""

    #: Whether a store already at SCHEMA_VERSION gets the schema applied again at every open. SQLite:
    #: yes, stores from before the version was kept honest say 1 whatever they hold. PostgreSQL: no,
    #: so a controller whose database user may not change the schema starts on an up-to-date store.
    reapply_current_schema = True

    def execute(self, sql: str, parameters: Parameters = ()) -> Cursor:
        raise NotImplementedError

    def execute_many(self, sql: str, rows: list[Parameters]) -> None:
        """``sql`` once for each of ``rows``, in order; an engine hands them over in one call."""
        for parameters in rows:
            self.execute(sql, parameters)

    def insert_rows(self, table: str, columns: Sequence[str], rows: list[Parameters], on_conflict: str = "") -> None:
        """Insert ``rows`` (values in the order of ``columns``) into ``table``; ``on_conflict`` ends the statement.

        The values are numbers, text or None. For the many rows a worker writes at once (a stop's
        audit and presence rows); an engine may send them as one statement.
        """
        marks = ", ".join("?" for _ in columns)
        self.execute_many(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks}) {on_conflict}", rows)

    def delete_rows(self, table: str, where: str, rows: list[Parameters]) -> None:
        """``DELETE FROM table WHERE where`` once for each of ``rows``, whose values fill ``where``'s ``?`` in order.

        Each ``?`` takes one value of the row, and ``where`` names ``table``'s columns unqualified. For
        the many rows a worker deletes at once (older presence rows at a stop); an engine may send
        them as one statement.
        """
        self.execute_many(f"DELETE FROM {table} WHERE {where}", rows)

    def query(self, sql: str, parameters: Parameters = ()) -> list[Row]:
        return list(self.execute(sql, parameters).fetchall())

    def query_one(self, sql: str, parameters: Parameters = ()) -> Row | None:
        rows = self.query(sql, parameters)
        return rows[0] if rows else None

    # What differs between the engines: the schema's own statements and the catalogue.

    def translate_ddl(self, statement: str) -> str:
        return statement

    def execute_ddl(self, statement: str) -> None:
        self.execute(statement)

    def table_exists(self, table: str) -> bool:
        raise NotImplementedError

    def columns(self, table: str) -> set[str]:
        raise NotImplementedError

    def make_append_only(self, table: str) -> None:
        raise NotImplementedError

    def install_engine_schema(self) -> None:
        """What only this engine has (PostgreSQL: the notification of status changes)."""

    def supersede_older_tokens(self) -> None:
        """Once, for a store from before tokens were superseded (only SQLite stores are that old)."""

    def schema_version(self) -> int | None:
        """The version the store records; None for a new store or one from before versions were recorded."""
        if not self.table_exists("meta"):
            return None
        row = self.query_one("SELECT value FROM meta WHERE key = 'schema_version'")
        return int(row["value"]) if row is not None else None


def apply_schema(db: Transaction, where: str) -> None:
    """Bring the store ``db`` writes to ``SCHEMA_VERSION`` inside its transaction, or refuse a newer one.

    A function of the transaction, not of the store, so that ``store-move``
    (controller/store_move.py) creates the schema in the transaction that copies the rows.
    """
    version = db.schema_version()
    if version is not None and version > SCHEMA_VERSION:
        raise StoreTooNew(where, version)
    if version == SCHEMA_VERSION and not db.reapply_current_schema:
        return
    for statement in split_statements(SCHEMA):
        db.execute_ddl(db.translate_ddl(statement))
    for table in APPEND_ONLY_TABLES:
        db.make_append_only(table)
    db.install_engine_schema()
    added = _add_missing_columns(db)
    for index in ADDED_INDEXES:
        db.execute_ddl(db.translate_ddl(index))
    if ("tokens", "superseded_at") in added:
        db.supersede_older_tokens()
    for step in range((version or 0) + 1, SCHEMA_VERSION + 1):
        migration = MIGRATIONS.get(step)
        if migration is not None:
            migration(db)
    db.execute(
        "INSERT INTO meta (key, value) VALUES ('schema_version', ?) "
        "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (str(SCHEMA_VERSION),),
    )


#: Rewrites of existing rows, run once when a store reaches that version.
MIGRATIONS: dict[int, Callable[[Transaction], None]] = {}


def _add_missing_columns(db: Transaction) -> set[tuple[str, str]]:
    added = set()
    for table, column, kind in ADDED_COLUMNS:
        if column not in db.columns(table):
            db.execute_ddl(db.translate_ddl(f"ALTER TABLE {table} ADD COLUMN {column} {kind}"))
            added.add((table, column))
    return added
