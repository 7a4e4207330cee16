"""The controller's SQLite store: identities, tokens, services, policies, certificates, audit.

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
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

#: The values of one statement's ``?`` placeholders.
Parameters = tuple[object, ...]

#: How long a writer waits for another process's transaction before failing;
#: every transaction here is a handful of row writes, so seconds is generous.
BUSY_TIMEOUT_SECONDS = 10.0
SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS identities (
    tenant TEXT NOT NULL,
    name TEXT NOT NULL,
    roles TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at REAL NOT NULL,
    enrolled_at REAL,
    cert_not_after REAL,
    key_sha256 TEXT,
    PRIMARY KEY (tenant, name)
);
CREATE TABLE IF NOT EXISTS tokens (
    jti TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    name TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    used_at REAL,
    used_key_sha256 TEXT,
    -- Set when a newer token of the identity was created (this one unused) or
    -- redeemed: the token enrolls nothing any more (controller/tokens.py).
    superseded_at REAL,
    superseded_by TEXT,
    -- The token's iss: the URL this controller minted it under.
    issuer TEXT
);
CREATE TABLE IF NOT EXISTS services (
    tenant TEXT NOT NULL,
    name TEXT NOT NULL,
    roles TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (tenant, name)
);
CREATE TABLE IF NOT EXISTS policies (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    tenant TEXT NOT NULL,
    identities TEXT NOT NULL,
    services TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS certificates (
    serial TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    name TEXT NOT NULL,
    purpose TEXT NOT NULL,
    issued_at REAL NOT NULL,
    not_after REAL NOT NULL,
    key_sha256 TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    event TEXT NOT NULL,
    fields TEXT NOT NULL
);
-- Every status change (revoked, disabled, enabled) and every change of an
-- identity's key (status 'rekeyed'), in order: each controller process polls
-- it by seq (the primary key index) to close tunnels it holds.
CREATE TABLE IF NOT EXISTS status_changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant TEXT NOT NULL,
    name TEXT NOT NULL,
    status TEXT NOT NULL,
    time REAL NOT NULL
);
-- Renewal looks an identity up by the SHA-256 of its enrolled key, and a key
-- no identity holds up among the certificates (whose key was it?): indexed,
-- because anyone may send such a request.
CREATE INDEX IF NOT EXISTS identities_by_key ON identities (key_sha256);
CREATE INDEX IF NOT EXISTS certificates_by_key ON certificates (key_sha256);
-- A new token, and every redemption, supersedes the identity's other tokens.
CREATE INDEX IF NOT EXISTS tokens_by_identity ON tokens (tenant, name);
-- The audit log is append-only: no process, not even this one, rewrites history.
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
"""


class Store:
    """The store file as this process's threads see it: one SQLite connection per thread.

    Handlers run on the event loop, and the blocking work (transactions that
    fsync, CA signatures) runs in worker threads (controller/blocking.py). A
    connection of its own per thread means a read on the event loop never
    waits for a worker's commit (WAL readers do not block on the writer);
    write transactions of this process take one lock in turn, so they queue
    here instead of sleeping in SQLite's busy handler, and ``BEGIN IMMEDIATE``
    still orders them against other processes.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        if not self.path.exists():
            # The store names every identity and key; owner-only like the keys beside it.
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        self._local = threading.local()
        self._write_lock = threading.RLock()
        self._connections_lock = threading.Lock()
        self._connections: list[sqlite3.Connection] = []
        self._closed = False
        #: Write transactions committed by this process (the relay's tests count them).
        self.commits = 0
        self._connection.execute("PRAGMA journal_mode=WAL")
        with self.transaction() as db:
            db.executescript_in_transaction(SCHEMA)
            _add_missing_columns(db)
            for index in ADDED_INDEXES:
                db.execute(index)
            db.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
            )

    @property
    def _connection(self) -> sqlite3.Connection:
        """This thread's connection, opened on first use."""
        connection = getattr(self._local, "connection", None)
        if connection is None:
            with self._connections_lock:
                if self._closed:
                    raise sqlite3.ProgrammingError("the store is closed")
                # isolation_level=None: transactions are begun explicitly, never implicitly.
                connection = sqlite3.connect(
                    str(self.path), timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None, check_same_thread=False
                )
                self._connections.append(connection)
            connection.row_factory = sqlite3.Row
            connection.execute("PRAGMA foreign_keys=ON")
            connection.execute("PRAGMA synchronous=FULL")
            self._local.connection = connection
        return connection

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """A write transaction (``BEGIN IMMEDIATE``): commits on success, rolls back on error."""
        connection = self._connection
        with self._write_lock:
            connection.execute("BEGIN IMMEDIATE")
            try:
                yield Transaction(connection)
            except BaseException:
                connection.execute("ROLLBACK")
                raise
            connection.execute("COMMIT")
            self.commits += 1

    def query(self, sql: str, parameters: Parameters = ()) -> list[sqlite3.Row]:
        """Rows of one read-only statement (its own implicit snapshot)."""
        return list(self._connection.execute(sql, parameters))

    def query_one(self, sql: str, parameters: Parameters = ()) -> sqlite3.Row | None:
        rows = self.query(sql, parameters)
        return rows[0] if rows else None

    def close(self) -> None:
        """Close every thread's connection (after the last transaction of any thread)."""
        with self._write_lock, self._connections_lock:
            self._closed = True
            for connection in self._connections:
                connection.close()
            self._connections.clear()


class Transaction:
    """The statements of one open transaction."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        self._connection = connection

    def execute(self, sql: str, parameters: Parameters = ()) -> sqlite3.Cursor:
        return self._connection.execute(sql, parameters)

    def query(self, sql: str, parameters: Parameters = ()) -> list[sqlite3.Row]:
        return list(self._connection.execute(sql, parameters))

    def query_one(self, sql: str, parameters: Parameters = ()) -> sqlite3.Row | None:
        rows = self.query(sql, parameters)
        return rows[0] if rows else None

    def executescript_in_transaction(self, script: str) -> None:
        # executescript() would COMMIT first; run the statements one by one instead.
        for statement in _split_statements(script):
            self._connection.execute(statement)


#: Columns added after a store could first have been created; ``CREATE TABLE IF
#: NOT EXISTS`` leaves an older table as it is, so each is added when missing.
ADDED_COLUMNS = (
    ("tokens", "superseded_at", "REAL"),
    ("tokens", "superseded_by", "TEXT"),
    ("tokens", "issuer", "TEXT"),
    # An audit event's correlation id, and the identity and service it names,
    # copied from its fields so the audit and connection filters use an index.
    ("audit", "correlation", "TEXT"),
    ("audit", "identity", "TEXT"),
    ("audit", "service", "TEXT"),
    # The event's link in the keyed hash chain (controller/audit_chain.py); NULL on rows from before it.
    ("audit", "mac", "TEXT"),
)
#: Indexes on ADDED_COLUMNS: created once the columns exist.
ADDED_INDEXES = (
    "CREATE INDEX IF NOT EXISTS audit_by_correlation ON audit (correlation)",
    "CREATE INDEX IF NOT EXISTS audit_by_identity ON audit (identity, id)",
    "CREATE INDEX IF NOT EXISTS audit_by_service ON audit (service, id)",
    "CREATE INDEX IF NOT EXISTS audit_by_event ON audit (event, id)",
)


def _add_missing_columns(db: Transaction) -> None:
    added = set()
    for table, column, kind in ADDED_COLUMNS:
        present = {row["name"] for row in db.query(f"PRAGMA table_info({table})")}
        if column not in present:
            db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
            added.add((table, column))
    if ("tokens", "superseded_at") in added:
        _supersede_older_tokens(db)


def _supersede_older_tokens(db: Transaction) -> None:
    """Once, for a store from before tokens were superseded: an unused token with a newer one of its
    identity stops working, as it would have had the newer one been created today (controller/tokens.py).

    Rows are inserted, never deleted, so ``rowid`` is the order they were created in.
    """
    db.execute(
        "UPDATE tokens SET superseded_at = ?, superseded_by = ("
        " SELECT newer.jti FROM tokens AS newer WHERE newer.tenant = tokens.tenant AND newer.name = tokens.name"
        " AND newer.rowid > tokens.rowid ORDER BY newer.rowid DESC LIMIT 1) "
        "WHERE used_at IS NULL AND EXISTS ("
        " SELECT 1 FROM tokens AS newer WHERE newer.tenant = tokens.tenant AND newer.name = tokens.name"
        " AND newer.rowid > tokens.rowid)",
        (time.time(),),
    )


def _split_statements(script: str) -> list[str]:
    """Complete SQL statements of ``script`` (triggers contain ';' inside BEGIN...END)."""
    statements: list[str] = []
    current = ""
    for line in script.splitlines(keepends=True):
        if line.lstrip().startswith("--"):
            continue
        current += line
        if sqlite3.complete_statement(current):
            statements.append(current.strip())
            current = ""
    if current.strip():
        statements.append(current.strip())
    return statements
