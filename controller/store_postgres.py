"""The PostgreSQL store: one database shared by several controller and relay processes (psycopg 3).

Writers are serialised exactly as on SQLite: ``transaction()`` begins with
``pg_advisory_xact_lock`` on one key, so the store has one writer at a time
across every process and the lock is held until commit or rollback (also
when the connection dies: the server ends the transaction with it). A
read-modify-write under it sees the rows of every earlier commit (READ
COMMITTED, each statement a fresh snapshot) and no other writer can slip in
between its read and its write, the guarantee ``BEGIN IMMEDIATE`` gives. The
alternative, SERIALIZABLE with retries, would let writers run side by side but
must re-run a transaction's body after a conflict, and the bodies here sign
certificates and announce changes; one lock keeps them run exactly once
(docs/deployment.md has the enrollment rate it allows). The one writer also
makes sequence numbers appear in order: a row numbered N+1 is never
committed before row N, so the status watcher's ``seq > last`` never skips
a row that committed late. Unlike SQLite, a rolled-back insert leaves a gap
in the numbers: nothing may assume they are contiguous.

Commits are durable before they return (PostgreSQL's default
``synchronous_commit``). Every ``status_changes`` row notifies
``NOTIFY_CHANNEL`` when its transaction commits, which is how revocation
reaches every process within a second (controller/watcher.py).

The SQL of the callers is SQLite's shared dialect: ``?`` placeholders become
``%s`` (outside string literals, quoted names and comments), ``%`` is
escaped, and the schema's ``INTEGER``/``REAL``/``BLOB``/``AUTOINCREMENT`` become
``BIGINT``/``DOUBLE PRECISION``/``BYTEA``/identity columns.

A connection that fails (the server stopped, restarted, or killed this
backend) is dropped and the request refused with ``StoreUnavailable``; the
next request connects again, so the controller recovers without a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from controller.store import (
    BUSY_TIMEOUT_SECONDS,
    Cursor,
    Parameters,
    Row,
    Store,
    StoreLocationError,
    StoreUnavailable,
    StoreUnreachable,
    Transaction,
)
from controller.store_postgres_sql import adapt, query_bytes, row_factory, safe_url, translate_ddl, without_secrets

log = logging.getLogger(__name__)

#: The key of the store's one write lock (any 64-bit number works; this is "outpost" in ASCII).
#: Every writer of every process takes it first, so it must never change between versions.
WRITE_LOCK_KEY = 0x6F7574706F7374
_BEGIN_LOCKED = f"BEGIN; SELECT pg_advisory_xact_lock({WRITE_LOCK_KEY})".encode()
#: The channel ``status_changes`` rows are announced on.
NOTIFY_CHANNEL = "outpost_status_changes"
#: How long a new connection may take. The store is on the local network and
#: answers in milliseconds; a few seconds bounds how long a request (or a
#: start) waits on a server that is down before it is told so.
CONNECT_TIMEOUT_SECONDS = 3
#: A database host that vanished without a word (power cut, network gone) leaves a TCP
#: connection that would wait for minutes; these libpq settings notice it within
#: about ten seconds: keepalives after 5 s idle, every 2 s, 3 missed; and data
#: unacknowledged for 10 s. A URL that sets one of them keeps its own value.
TCP_DEFAULTS = {
    "keepalives": "1",
    "keepalives_idle": "5",
    "keepalives_interval": "2",
    "keepalives_count": "3",
    "tcp_user_timeout": "10000",
    "connect_timeout": str(CONNECT_TIMEOUT_SECONDS),
}
#: After a new connection failed, how long requests are refused at once instead of each
#: trying (and waiting up to CONNECT_TIMEOUT_SECONDS for) a server that is not there: a
#: flood of dials during an outage then costs the relay's workers nothing, and a server
#: that is back is used within a second.
CONNECT_HOLDOFF_SECONDS = 1.0
#: How long the notification listener waits before connecting again after it lost the
#: server: short enough to meet revocation's 2 s once the server is back, and
#: one attempt a second from each process costs a restarting server nothing.
LISTEN_RETRY_SECONDS = 1.0

def connection_string(url: str) -> str:
    """``url`` with ``TCP_DEFAULTS`` for what it leaves unset (libpq ignores them on a unix socket)."""
    given = conninfo_to_dict(url)
    return make_conninfo(url, **{key: value for key, value in TCP_DEFAULTS.items() if key not in given})


def check_url(url: str) -> str:
    """``url`` when libpq can parse it; otherwise one sentence (exit code 64), nothing opened."""
    try:
        conninfo_to_dict(url)
    except psycopg.Error as error:
        raise StoreLocationError(
            f"--store {safe_url(url)!r} is not a PostgreSQL URL libpq can read "
            f"({without_secrets(_first_line(error), url)}); "
            "write it like postgresql://USER@HOST:5432/DATABASE."
        ) from None
    return url


class PostgresStore(Store):
    """One connection per thread to a shared PostgreSQL database."""

    engine = "postgresql"
    notifies = True

    def __init__(self, location: Path | str) -> None:
        super().__init__(location)
        self.url = check_url(str(location))
        self._conninfo = connection_string(self.url)
        self._local = threading.local()
        self._write_lock = threading.RLock()
        self._connections_lock = threading.Lock()
        self._connections: list[psycopg.Connection[Any]] = []
        self._closed = False
        self._listener: psycopg.AsyncConnection[Any] | None = None
        self._opened = False
        #: When and why the last new connection failed: for a moment, requests are refused without trying.
        self._last_failure: tuple[float, str] | None = None
        try:
            self._connection()
        except StoreUnavailable as error:
            raise StoreUnreachable(
                f"Cannot reach the store {self.describe()} ({error.reason}); check --store and that "
                "PostgreSQL is running and lets this user in."
            ) from None
        try:
            self._open_schema()
        except StoreUnavailable as error:
            self.close()
            raise StoreUnreachable(f"The store {self.describe()} went away while opening ({error.reason}).") from None
        except BaseException:
            self.close()
            raise
        self._opened = True

    def describe(self) -> str:
        return safe_url(self.url)

    def _unavailable(self, error: BaseException) -> StoreUnavailable:
        reason = _first_line(error)
        if self._opened:  # a start that fails says so in its own sentence
            log.warning("store %s unavailable: %s", self.describe(), reason)
        return StoreUnavailable(self.describe(), reason)

    def _connection(self) -> psycopg.Connection[Any]:
        return self._connection_and_freshness()[0]

    def _connection_and_freshness(self) -> tuple[psycopg.Connection[Any], bool]:
        """This thread's connection, and whether it was opened just now (a new one when there was none or it broke)."""
        connection: psycopg.Connection[Any] | None = getattr(self._local, "connection", None)
        if connection is not None and not connection.closed and not connection.broken:
            return connection, False
        if connection is not None:
            self._drop(connection)
        with self._connections_lock:
            if self._closed:
                raise psycopg.InterfaceError("the store is closed")
            last_failure = self._last_failure
        if last_failure is not None and time.monotonic() - last_failure[0] < CONNECT_HOLDOFF_SECONDS:
            raise StoreUnavailable(self.describe(), last_failure[1])
        try:
            connection = psycopg.connect(self._conninfo, autocommit=True, row_factory=row_factory)
            # A writer waits for another process's transaction as long as on SQLite, then fails.
            connection.execute(f"SET lock_timeout = {int(BUSY_TIMEOUT_SECONDS * 1000)}")
        except psycopg.OperationalError as error:
            unavailable = self._unavailable(error)
            with self._connections_lock:
                self._last_failure = (time.monotonic(), unavailable.reason)
            raise unavailable from None
        with self._connections_lock:
            self._last_failure = None
        with self._connections_lock:
            self._connections.append(connection)
        self._local.connection = connection
        return connection, True

    def _drop(self, connection: psycopg.Connection[Any]) -> None:
        with contextlib.suppress(Exception):
            connection.close()
        with self._connections_lock:
            if connection in self._connections:
                self._connections.remove(connection)
        if getattr(self._local, "connection", None) is connection:
            self._local.connection = None

    def _begin(self) -> psycopg.Connection[Any]:
        """This thread's connection inside a new transaction that holds the write lock."""
        for attempt in (1, 2):
            connection, fresh = self._connection_and_freshness()
            try:
                # One round trip for both (no parameters: the simple protocol takes two statements).
                connection.execute(_BEGIN_LOCKED)
                return connection
            except psycopg.OperationalError as error:
                self._drop(connection)
                # A connection kept from before a server restart fails at its first use; nothing was sent yet.
                if fresh or attempt == 2:
                    raise self._unavailable(error) from None
        raise AssertionError("unreachable")

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """A write transaction under the store's advisory lock: commits on success, rolls back on error."""
        with self._write_lock:
            connection = self._begin()
            try:
                yield PostgresTransaction(connection)
            except BaseException as error:
                try:
                    connection.execute("ROLLBACK")
                except psycopg.Error:
                    self._drop(connection)  # the server rolls back what it had when the connection ends
                if isinstance(error, psycopg.OperationalError):
                    raise self._unavailable(error) from None
                raise
            try:
                connection.execute("COMMIT")
            except psycopg.OperationalError as error:
                # Whether the server committed is unknown; every request here is safe to retry (docs/deployment.md).
                self._drop(connection)
                raise self._unavailable(error) from None
            self.commits += 1

    def query(self, sql: str, parameters: Parameters = ()) -> list[Row]:
        for attempt in (1, 2):
            connection, fresh = self._connection_and_freshness()
            try:
                return list(connection.execute(query_bytes(sql), adapt(parameters)).fetchall())
            except psycopg.OperationalError as error:
                self._drop(connection)
                if fresh or attempt == 2:  # a read is safe to send again on a new connection, once
                    raise self._unavailable(error) from None
        raise AssertionError("unreachable")

    def close(self) -> None:
        with self._write_lock, self._connections_lock:
            self._closed = True
            for connection in self._connections:
                with contextlib.suppress(Exception):
                    connection.close()
            self._connections.clear()

    async def wait_for_changes(self, timeout: float) -> None:
        """Return at the next ``status_changes`` notification, or after ``timeout``.

        The listening connection lives from call to call, so no notification
        is lost between them. A call that has to (re)connect returns as soon
        as it listens: the caller's poll that follows finds whatever was
        committed while nobody listened.
        """
        listener = self._listener
        try:
            if listener is None or listener.closed or listener.broken:
                self._listener = None
                listener = await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True)
                await listener.execute(f"LISTEN {NOTIFY_CHANNEL}")
                self._listener = listener
                return
            notifications = listener.notifies()
            try:
                async with asyncio.timeout(timeout):
                    await notifications.__anext__()
            except TimeoutError:
                pass
            finally:
                await notifications.aclose()
        except psycopg.Error as error:
            if listener is not None:
                with contextlib.suppress(Exception):
                    await listener.close()
            self._listener = None
            log.warning("store notifications unavailable (%s); polling", _first_line(error))
            await asyncio.sleep(min(timeout, LISTEN_RETRY_SECONDS))
        except asyncio.CancelledError:
            if self._listener is not None:
                with contextlib.suppress(Exception):
                    await self._listener.close()
                self._listener = None
            raise


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class PostgresTransaction(Transaction):
    reapply_current_schema = False

    def __init__(self, connection: psycopg.Connection[Any]) -> None:
        self._connection = connection

    def execute(self, sql: str, parameters: Parameters = ()) -> Cursor:
        return self._connection.execute(query_bytes(sql), adapt(parameters))

    def execute_many(self, sql: str, rows: list[Parameters]) -> None:
        with self._connection.cursor() as cursor:
            cursor.executemany(query_bytes(sql), [adapt(parameters) for parameters in rows])

    def translate_ddl(self, statement: str) -> str:
        return translate_ddl(statement)

    def execute_ddl(self, statement: str) -> None:
        self._connection.execute(statement.encode())  # no parameters: psycopg leaves it as it is

    def table_exists(self, table: str) -> bool:
        row = self.query_one("SELECT to_regclass(?) IS NOT NULL AS present", (table,))
        return row is not None and row["present"] is True

    def columns(self, table: str) -> set[str]:
        rows = self.query(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = current_schema() "
            "AND table_name = ?",
            (table,),
        )
        return {row["column_name"] for row in rows}

    def make_append_only(self, table: str) -> None:
        self.execute_ddl(
            "CREATE OR REPLACE FUNCTION outpost_append_only() RETURNS trigger LANGUAGE plpgsql AS $$ "
            "BEGIN RAISE EXCEPTION 'the % log is append-only', TG_TABLE_NAME; END $$"
        )
        self.execute_ddl(
            f"CREATE OR REPLACE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON {table} "
            "FOR EACH STATEMENT EXECUTE FUNCTION outpost_append_only()"
        )

    def install_engine_schema(self) -> None:
        # Sent by the server when the inserting transaction commits, never before, never for a rollback.
        self.execute_ddl(
            "CREATE OR REPLACE FUNCTION outpost_notify_status_change() RETURNS trigger LANGUAGE plpgsql AS $$ "
            f"BEGIN PERFORM pg_notify('{NOTIFY_CHANNEL}', NEW.seq::text); RETURN NULL; END $$"
        )
        self.execute_ddl(
            "CREATE OR REPLACE TRIGGER status_changes_notify AFTER INSERT ON status_changes "
            "FOR EACH ROW EXECUTE FUNCTION outpost_notify_status_change()"
        )
