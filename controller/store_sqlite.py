"""The SQLite store: the embedded default, one file in the data directory.

Several processes may share one store file, so every read-modify-write runs in
``BEGIN IMMEDIATE`` (the write lock is taken before the read, so two
processes can never both see a token unused) and the journal is WAL (readers
do not block the writer).

A commit is durable before ``transaction()`` returns (``synchronous=FULL``:
the WAL is flushed at every commit), so nothing the controller answers for
(a consumed token, an issued certificate) is lost with a crash or the power
after the answer went out; a crash before the commit loses the whole
transaction and the client, which got no answer, retries.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from controller.store import BUSY_TIMEOUT_SECONDS, Cursor, Parameters, Row, Store, Transaction


class SQLiteStore(Store):
    """The store file as this process's threads see it: one SQLite connection per thread."""

    engine = "sqlite"

    def __init__(self, location: Path | str) -> None:
        super().__init__(location)
        self.path = Path(location)
        if not self.path.exists():
            # The store names every identity and key; owner-only like the keys beside it.
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        self._local = threading.local()
        self._write_lock = threading.RLock()
        self._connections_lock = threading.Lock()
        self._connections: list[sqlite3.Connection] = []
        self._closed = False
        # Reads in progress, by any thread: close() waits for them, because closing a connection
        # another thread is reading through crashes the process, not just the read.
        self._reads = 0
        self._reads_done = threading.Condition(self._connections_lock)
        self._connection.execute("PRAGMA journal_mode=WAL")
        try:
            self._open_schema()
        except BaseException:
            self.close()
            raise

    def describe(self) -> str:
        return str(self.path)

    @property
    def _connection(self) -> sqlite3.Connection:
        """This thread's connection, opened on first use."""
        connection = getattr(self._local, "connection", None)
        if connection is None:
            if self._closed:
                raise sqlite3.ProgrammingError("the store is closed")
            # isolation_level=None: transactions are begun explicitly, never implicitly.
            connection = sqlite3.connect(
                str(self.path), timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None, check_same_thread=False
            )
            connection.row_factory = sqlite3.Row
            # Set up before close() can see it: close() ending a connection while this thread runs a
            # statement on it crashes the process.
            connection.execute("PRAGMA foreign_keys=ON")
            connection.execute("PRAGMA synchronous=FULL")
            with self._connections_lock:
                if self._closed:
                    connection.close()
                    raise sqlite3.ProgrammingError("the store is closed")
                self._connections.append(connection)
            self._local.connection = connection
        return connection

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """A write transaction (``BEGIN IMMEDIATE``): commits on success, rolls back on error."""
        connection = self._connection
        with self._write_lock:
            connection.execute("BEGIN IMMEDIATE")
            try:
                yield SQLiteTransaction(connection)
            except BaseException:
                connection.execute("ROLLBACK")
                raise
            connection.execute("COMMIT")
            self.commits += 1

    def query(self, sql: str, parameters: Parameters = ()) -> list[Row]:
        connection = self._connection
        with self._reads_done:
            if self._closed:
                raise sqlite3.ProgrammingError("the store is closed")
            self._reads += 1
        try:
            return list(connection.execute(sql, parameters))
        finally:
            with self._reads_done:
                self._reads -= 1
                self._reads_done.notify_all()

    def close(self) -> None:
        """Close every thread's connection, after the transactions and reads in progress ended."""
        with self._write_lock, self._reads_done:
            self._closed = True
            # A read is one statement: BUSY_TIMEOUT_SECONDS bounds even one that waits for a lock.
            if not self._reads_done.wait_for(lambda: self._reads == 0, BUSY_TIMEOUT_SECONDS):
                # A read still running (a long one on a starved machine) is stopped, not closed under:
                # interrupt() is SQLite's one call made for another thread, and the read ends in an error.
                for connection in self._connections:
                    connection.interrupt()
                if not self._reads_done.wait_for(lambda: self._reads == 0, BUSY_TIMEOUT_SECONDS):
                    return  # left open for the process's end: closing them under the read would crash it
            for connection in self._connections:
                connection.close()
            self._connections.clear()


class SQLiteTransaction(Transaction):
    def __init__(self, connection: sqlite3.Connection) -> None:
        self._connection = connection

    def execute(self, sql: str, parameters: Parameters = ()) -> Cursor:
        return self._connection.execute(sql, parameters)

    def execute_many(self, sql: str, rows: list[Parameters]) -> None:
        # One call, but sqlite3 still lets go of the interpreter lock for each row's step: many rows
        # at once go through insert_rows instead.
        self._connection.executemany(sql, rows)

    def insert_rows(self, table: str, columns: Sequence[str], rows: list[Parameters], on_conflict: str = "") -> None:
        # One statement over a JSON array of the rows: sqlite3 lets go of the interpreter lock around
        # every step, and a worker beside the busy event loop then waits up to the switch interval
        # (5 ms) to get it back. executemany steps once per row: a stop's 10,000 audit rows took
        # 2.5-25 s beside a busy thread, as one statement 0.76 s (tests/bench/audit_write.py).
        # Each number is parsed from the array's text, so a float arrives to the last bit (an audit
        # time is in its row's MAC); "WHERE true" keeps SQLite from reading ON CONFLICT as a join's.
        if not rows:
            return
        values = ", ".join(f"json_extract(value, '$[{n}]')" for n in range(len(columns)))
        self._connection.execute(
            f"INSERT INTO {table} ({', '.join(columns)}) SELECT {values} FROM json_each(?) WHERE true {on_conflict}",
            (json.dumps(rows, allow_nan=False),))

    def delete_rows(self, table: str, where: str, rows: list[Parameters]) -> None:
        # One statement for the same reason as insert_rows: a write of 10,000 offline presence rows took
        # 10.6-10.8 s beside a busy thread with its DELETE stepped once per row, 0.33 s as one statement.
        # The batch is the outer loop (CROSS JOIN keeps that order), so each row is found through the
        # table's index rather than the table scanned once per row. ``where``'s columns must not be
        # named as json_each's own (key, value, type, atom, id, parent, fullkey, path).
        if not rows:
            return
        count = itertools.count()
        condition = re.sub(r"\?", lambda _: f"json_extract(batch.value, '$[{next(count)}]')", where)
        self._connection.execute(
            f"DELETE FROM {table} WHERE rowid IN (SELECT {table}.rowid FROM json_each(?) AS batch "
            f"CROSS JOIN {table} ON {condition})",
            (json.dumps(rows, allow_nan=False),))

    def query(self, sql: str, parameters: Parameters = ()) -> list[Row]:
        return list(self._connection.execute(sql, parameters))

    def executescript_in_transaction(self, script: str) -> None:
        # executescript() would COMMIT first; run the statements one by one instead.
        from controller.store_schema import split_statements

        for statement in split_statements(script):
            self._connection.execute(statement)

    def table_exists(self, table: str) -> bool:
        row = self.query_one("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,))
        return row is not None

    def columns(self, table: str) -> set[str]:
        return {row["name"] for row in self.query(f"PRAGMA table_info({table})")}

    def make_append_only(self, table: str) -> None:
        for action in ("update", "delete"):
            self.execute(
                f"CREATE TRIGGER IF NOT EXISTS {table}_no_{action} BEFORE {action.upper()} ON {table} "
                f"BEGIN SELECT RAISE(ABORT, 'the {table} log is append-only'); END"
            )

    def supersede_older_tokens(self) -> None:
        """An unused token with a newer one of its identity stops working, as it would have had the
        newer one been created today (controller/tokens.py).

        Rows are inserted, never deleted, so ``rowid`` is the order they were created in.
        """
        self.execute(
            "UPDATE tokens SET superseded_at = ?, superseded_by = ("
            " SELECT newer.jti FROM tokens AS newer WHERE newer.tenant = tokens.tenant AND newer.name = tokens.name"
            " AND newer.rowid > tokens.rowid ORDER BY newer.rowid DESC LIMIT 1) "
            "WHERE used_at IS NULL AND EXISTS ("
            " SELECT 1 FROM tokens AS newer WHERE newer.tenant = tokens.tenant AND newer.name = tokens.name"
            " AND newer.rowid > tokens.rowid)",
            (time.time(),),
        )
