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

The schema grows in one obvious step per change, on both engines:
- a table or an index: append its ``CREATE ... IF NOT EXISTS`` to ``SCHEMA``;
- a column of an existing table: append it to ``ADDED_COLUMNS`` (an index on it to ``ADDED_INDEXES``);
- a table nobody may rewrite: add it to ``APPEND_ONLY_TABLES``;
- rows to rewrite once: a function in ``MIGRATIONS`` under the new version;
and raise ``SCHEMA_VERSION`` by one (tests/controller/test_store_schema.py
checks that it was). Every open applies what is missing and records the
version; a controller refuses a store of a newer version before writing
anything, in one sentence (``StoreTooNew``).
"""

from __future__ import annotations

import contextlib
import re
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Protocol

from controller.errors import ControllerError, StartupError
from shared.errors import EXIT_DATAERR, EXIT_UNAVAILABLE, EXIT_USAGE

#: The values of one statement's ``?`` placeholders.
Parameters = tuple[object, ...]

#: How long a writer waits for another process's transaction before failing;
#: every transaction here is a handful of row writes, so seconds is generous.
BUSY_TIMEOUT_SECONDS = 10.0
#: The schema this code reads and writes; raise it with every change to SCHEMA,
#: ADDED_COLUMNS, APPEND_ONLY_TABLES or MIGRATIONS (see above).
SCHEMA_VERSION = 6

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
-- Presence (controller/presence.py): each controller process writes the rows
-- of its own tunnels, keyed by its relay id, in batches; readers merge them.
CREATE TABLE IF NOT EXISTS presence (
    tenant TEXT NOT NULL,
    name TEXT NOT NULL,
    relay TEXT NOT NULL,
    online INTEGER NOT NULL,
    connected_since REAL,
    last_seen REAL NOT NULL,
    remote TEXT,
    keepalive_s REAL,
    report TEXT,
    report_at REAL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (tenant, name, relay)
);
-- One heartbeat row per controller process: rows of a process whose heartbeat stopped read as offline.
CREATE TABLE IF NOT EXISTS presence_relays (
    relay TEXT PRIMARY KEY,
    started_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
-- People who signed in through an identity provider (controller/signin/): the
-- identity (tenant, name) of kind person; (provider, subject) says who they are.
CREATE TABLE IF NOT EXISTS people (
    tenant TEXT NOT NULL,
    name TEXT NOT NULL,
    provider TEXT NOT NULL,
    subject TEXT NOT NULL,
    display_name TEXT NOT NULL,
    grants TEXT NOT NULL,
    created_at REAL NOT NULL,
    signed_in_at REAL NOT NULL,
    PRIMARY KEY (tenant, name)
);
-- Just-in-time grants (controller/grants.py): a person's request, an approver's
-- answer, and the policy an approval created; one correlation id for its whole story.
CREATE TABLE IF NOT EXISTS grants (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant TEXT NOT NULL,
    requester TEXT NOT NULL,
    service TEXT NOT NULL,
    duration REAL NOT NULL,
    reason TEXT NOT NULL,
    status TEXT NOT NULL,
    correlation TEXT NOT NULL,
    requested_at REAL NOT NULL,
    pending_until REAL NOT NULL,
    decided_by TEXT,
    decided_at REAL,
    policy_id INTEGER
);
CREATE INDEX IF NOT EXISTS grants_by_status ON grants (status, pending_until);
CREATE UNIQUE INDEX IF NOT EXISTS people_by_subject ON people (provider, subject);
-- A person's session: only the SHA-256 of the bearer is kept.
CREATE TABLE IF NOT EXISTS person_sessions (
    token_sha256 TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    name TEXT NOT NULL,
    grants TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    ended_at REAL
);
-- ID tokens and nonces already used to sign in, until they expire: none is accepted twice.
CREATE TABLE IF NOT EXISTS signin_seen (
    digest TEXT PRIMARY KEY,
    expires_at REAL NOT NULL
);
-- Relays (controller/relays.py): added by an operator with a one-time token
-- (only its SHA-256 kept), enrolled with a key of their own, then each
-- running relay's heartbeat, public address and tunnel count.
CREATE TABLE IF NOT EXISTS relays (
    name TEXT PRIMARY KEY,
    address TEXT NOT NULL,
    status TEXT NOT NULL,
    token_sha256 TEXT,
    token_expires_at REAL,
    key_sha256 TEXT,
    serial TEXT,
    not_after REAL,
    created_at REAL NOT NULL,
    enrolled_at REAL,
    started_at REAL,
    heartbeat_at REAL,
    tunnels INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS relays_by_key ON relays (key_sha256);
-- Which relay hosts which service (controller/relay/directory.py): each relay
-- writes the services its tunnels bind, with the gateway binding each, in
-- batches; a relay whose heartbeat is stale is ignored by readers.
CREATE TABLE IF NOT EXISTS relay_services (
    tenant TEXT NOT NULL,
    service TEXT NOT NULL,
    relay TEXT NOT NULL,
    gateway TEXT NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (tenant, service, relay, gateway)
);
CREATE INDEX IF NOT EXISTS relay_services_by_relay ON relay_services (relay);
"""

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
    # Policies are edited in place (version counts the edits), may expire, and
    # keep their own decision counters, written in batches (controller/policy_counters.py).
    ("policies", "version", "INTEGER"),
    ("policies", "updated_at", "REAL"),
    ("policies", "expires_at", "REAL"),
    ("policies", "expiry_recorded_at", "REAL"),
    ("policies", "decisions", "INTEGER"),
    ("policies", "last_allowed_at", "REAL"),
    # How a dial of a service bound by several gateways picks one: NULL, refuse
    # with the choices (dial SERVICE@GATEWAY); 'any', the latest bound (controller/aiming.py).
    ("services", "choose", "TEXT"),
    # The ports a service declares (a JSON list; NULL: none), each dialed as SERVICE:PORT.
    ("services", "ports", "TEXT"),
    # The correlation id of the grant a policy was created for (controller/grants.py): its dials and expiry share it.
    ("policies", "correlation", "TEXT"),
)
#: Indexes on ADDED_COLUMNS: created once the columns exist.
ADDED_INDEXES = (
    "CREATE INDEX IF NOT EXISTS audit_by_correlation ON audit (correlation)",
    "CREATE INDEX IF NOT EXISTS audit_by_identity ON audit (identity, id)",
    "CREATE INDEX IF NOT EXISTS audit_by_service ON audit (service, id)",
    "CREATE INDEX IF NOT EXISTS audit_by_event ON audit (event, id)",
)

#: Tables no process, not even this one, may update, delete from or empty:
#: history is never rewritten. Each engine enforces it with its own triggers.
APPEND_ONLY_TABLES = ("audit",)


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
            version = db.schema_version()
            if version is not None and version > SCHEMA_VERSION:
                raise StoreTooNew(self.describe(), version)
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


class Transaction:
    """The statements of one open transaction; each engine's subclass runs them."""

    #: Whether a store already at SCHEMA_VERSION gets the schema applied again at every open. SQLite:
    #: yes, stores from before the version was kept honest say 1 whatever they hold. PostgreSQL: no,
    #: so a controller whose database user may not change the schema starts on an up-to-date store.
    reapply_current_schema = True

    def execute(self, sql: str, parameters: Parameters = ()) -> Cursor:
        raise NotImplementedError

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


#: Rewrites of existing rows, run once when a store reaches that version.
MIGRATIONS: dict[int, Callable[[Transaction], None]] = {}


def _add_missing_columns(db: Transaction) -> set[tuple[str, str]]:
    added = set()
    for table, column, kind in ADDED_COLUMNS:
        if column not in db.columns(table):
            db.execute_ddl(db.translate_ddl(f"ALTER TABLE {table} ADD COLUMN {column} {kind}"))
            added.add((table, column))
    return added


def split_statements(script: str) -> list[str]:
    """Complete SQL statements of ``script``, comment lines left out (a trigger holds ';' inside BEGIN...END)."""
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
