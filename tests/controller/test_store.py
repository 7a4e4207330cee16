"""The store: append-only audit log, shared by several connections; a commit survives a crash.

The tests that take ``store_location`` run on both engines (SQLite and a real PostgreSQL).
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from controller.audit import AuditLog
from controller.store import Store
from tests.controller.harness import TEST_CHAIN_KEY
from tests.e2e.harness import python_env
from tests.syscall_trace import FLUSHES, traced_run


def test_the_audit_log_cannot_be_rewritten_or_deleted(store_location: Path | str) -> None:
    store = Store(store_location)
    try:
        AuditLog(store, chain_key=TEST_CHAIN_KEY).record("identity_created", identity="default/gw")
        with pytest.raises(Exception, match="append-only"):
            with store.transaction() as db:
                db.execute("UPDATE audit SET event = 'nothing'")
        with pytest.raises(Exception, match="append-only"):
            with store.transaction() as db:
                db.execute("DELETE FROM audit")
        events = AuditLog(store, chain_key=TEST_CHAIN_KEY).recent()
        assert [(e["event"], e["fields"]["identity"]) for e in events] == [("identity_created", "default/gw")]
    finally:
        store.close()


def test_an_unknown_audit_event_is_a_programming_error(store_location: Path | str) -> None:
    store = Store(store_location)
    try:
        with pytest.raises(ValueError):
            AuditLog(store, chain_key=TEST_CHAIN_KEY).record("something_else")
        assert AuditLog(store, chain_key=TEST_CHAIN_KEY).recent() == []
    finally:
        store.close()


def test_the_store_file_is_wal_and_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite3"
    store = Store(path)
    try:
        assert store.query_one("PRAGMA journal_mode")[0] == "wal"
        assert path.stat().st_mode & 0o777 == 0o600
    finally:
        store.close()


def test_the_store_rolls_back_a_failed_transaction(store_location: Path | str) -> None:
    store = Store(store_location)
    try:
        with pytest.raises(RuntimeError):
            with store.transaction() as db:
                db.execute("INSERT INTO meta (key, value) VALUES ('x', 'y')")
                raise RuntimeError("abandon")
        assert store.query_one("SELECT * FROM meta WHERE key = 'x'") is None
    finally:
        store.close()


def test_every_commit_is_flushed_to_disk_before_the_transaction_returns(tmp_path: Path) -> None:
    # A real process under strace: the calls SQLite makes, not what it is configured to make.
    path = tmp_path / "store.sqlite3"
    commits = 5
    result, calls = traced_run([sys.executable, "-c", (
        "from controller.store import Store\n"
        f"store = Store({str(path)!r})\n"
        f"for n in range({commits}):\n"
        "    with store.transaction() as db:\n"
        "        db.execute('INSERT INTO meta (key, value) VALUES (?, ?)', (f'k{n}', 'v'))\n"
    )], env=python_env(), cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    wal_flushes = [c for c in calls if c.name in FLUSHES and c.paths == (f"{path}-wal",)]
    # One flush per commit at least (opening the store commits its schema once more).
    assert len(wal_flushes) >= commits + 1
    # SQLite flushes the directory when it creates the WAL beside a new store file, which
    # makes the store file's own entry durable too (a build with SQLITE_DISABLE_DIRSYNC would not).
    assert any(c.name in FLUSHES and c.paths == (str(tmp_path),) for c in calls), "the new store's directory entry"


def test_a_store_reopened_after_a_crash_has_every_committed_row(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite3"
    writer = subprocess.Popen([sys.executable, "-c", (
        "from controller.store import Store\n"
        f"store = Store({str(path)!r})\n"
        "n = 0\n"
        "while True:\n"
        "    with store.transaction() as db:\n"
        "        db.execute('INSERT INTO meta (key, value) VALUES (?, ?)', (f'k{n}', 'v'))\n"
        "    print(n, flush=True)\n"
        "    n += 1\n"
    )], stdout=subprocess.PIPE, text=True, env=python_env())
    assert writer.stdout is not None
    committed = [writer.stdout.readline() for _ in range(50)]
    writer.send_signal(signal.SIGKILL)
    writer.wait(10)

    store = Store(path)
    try:
        assert store.query_one("PRAGMA integrity_check")[0] == "ok"
        keys = {row["key"] for row in store.query("SELECT key FROM meta")}
        assert {f"k{line.strip()}" for line in committed} <= keys
    finally:
        store.close()


def test_a_read_does_not_wait_for_another_threads_open_write_transaction(store_location: Path | str) -> None:
    """The event loop reads while a worker thread commits: readers on their own connection never queue."""
    import threading

    store = Store(store_location)
    inside, release = threading.Event(), threading.Event()

    def writer() -> None:
        with store.transaction() as db:
            db.execute("INSERT INTO meta (key, value) VALUES ('held', 'yes')")
            inside.set()
            release.wait(10)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        assert inside.wait(10)
        result: list = []
        reader = threading.Thread(target=lambda: result.append(store.query_one("SELECT value FROM meta WHERE key = 'held'")))
        reader.start()
        reader.join(2)
        # Answered while the write is still open, and without its uncommitted row.
        assert not reader.is_alive() and result == [None]
    finally:
        release.set()
        thread.join(10)
    assert store.query_one("SELECT value FROM meta WHERE key = 'held'")["value"] == "yes"
    store.close()


def test_write_transactions_of_many_threads_each_commit_exactly_once(store_location: Path | str) -> None:
    import threading

    store = Store(store_location)
    with store.transaction() as db:
        db.execute("INSERT INTO meta (key, value) VALUES ('n', '0')")

    def bump() -> None:
        for _ in range(25):
            with store.transaction() as db:
                value = int(db.query_one("SELECT value FROM meta WHERE key = 'n'")["value"])
                db.execute("UPDATE meta SET value = ? WHERE key = 'n'", (str(value + 1),))

    threads = [threading.Thread(target=bump) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert store.query_one("SELECT value FROM meta WHERE key = 'n'")["value"] == "200"
    store.close()


def test_an_identitys_refusals_past_its_budget_are_counted_into_the_next_row(store_location: Path | str) -> None:
    from controller.audit import IdentityBudgets

    now = [1000.0]
    store = Store(store_location)
    try:
        audit = AuditLog(store, chain_key=TEST_CHAIN_KEY, identity_budgets=IdentityBudgets(per_minute=2, clock=lambda: now[0]))
        recorded = [audit.record("renewal_refused", identity="default/gw", reason="x") for _ in range(5)]
        assert recorded == [True, True, False, False, False]
        # Another identity, and another event of the same identity, have budgets of their own.
        assert audit.record("renewal_refused", identity="default/other", reason="x")
        assert audit.record("tunnel_refused", identity="default/gw", reason="x")
        # Events that are not refusals are never counted away.
        assert all(audit.record("tunnel_connected", identity="default/gw") for _ in range(5))
        now[0] += 30.0  # one refilled
        assert audit.record("renewal_refused", identity="default/gw", reason="x")
        rows = [e["fields"] for e in audit.recent() if e["event"] == "renewal_refused"]
        assert [r.get("suppressed") for r in rows] == [None, None, None, 3]
    finally:
        store.close()


def test_writers_on_separate_connections_never_interleave_a_read_modify_write(store_location: Path | str) -> None:
    """Four views of one store, as four processes hold them: only the store's own lock orders their writers."""
    import threading

    stores = [Store(store_location) for _ in range(4)]
    with stores[0].transaction() as db:
        db.execute("INSERT INTO meta (key, value) VALUES ('n', '0')")
    start = threading.Barrier(8)

    def bump(store: Store) -> None:
        start.wait(10)
        for _ in range(25):
            with store.transaction() as db:
                value = int(db.query_one("SELECT value FROM meta WHERE key = 'n'")["value"])
                db.execute("UPDATE meta SET value = ? WHERE key = 'n'", (str(value + 1),))

    threads = [threading.Thread(target=bump, args=(store,)) for store in stores for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    try:
        assert stores[3].query_one("SELECT value FROM meta WHERE key = 'n'")["value"] == "200"
    finally:
        for store in stores:
            store.close()


def slow_read(rows: int) -> str:
    """A read of ``rows`` rows on SQLite that close() arrives in the middle of, while its rows are fetched."""
    return f"WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < {rows}) SELECT x FROM c"


def close_during_read(rows: int, close_waits: float | None = None) -> str:
    """A script whose thread reads ``rows`` rows while the store closes; prints the count or the read's error."""
    wait = "" if close_waits is None else f"controller.store_sqlite.BUSY_TIMEOUT_SECONDS = {close_waits}"
    return f"""
import sqlite3, sys, threading, time
import controller.store_sqlite
{wait}
from controller.store import Store
store = Store(sys.argv[1])
started = threading.Event()
outcome = []
def read():
    started.set()
    try:
        outcome.append(len(store.query({slow_read(rows)!r})))
    except sqlite3.Error as error:
        outcome.append(type(error).__name__ + ": " + str(error))
reader = threading.Thread(target=read)
reader.start()
started.wait()
time.sleep(0.1)
store.close()
reader.join()
print(outcome[0])
"""


def run_alone(script: str, *args: str, timeout: float = 120) -> str:
    """What ``script`` prints, run in a process of its own: a crash there fails the test, not the test run."""
    result = subprocess.run([sys.executable, "-c", script, *args], env=python_env(), capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip()


def test_closing_the_store_during_another_threads_read_waits_for_it(tmp_path: Path) -> None:
    # Closing a connection another thread reads through crashes the process.
    assert run_alone(close_during_read(2_000_000), str(tmp_path / "store.sqlite3")) == "2000000"


def test_a_read_that_outlasts_the_wait_at_close_is_interrupted_not_closed_under(tmp_path: Path) -> None:
    # close() waits 0.3 s here, not 10: a read of forty million rows outlasts it on any machine. Closing the
    # connection under the read crashes the process or fails the read on a closed database.
    outcome = run_alone(close_during_read(40_000_000, close_waits=0.3), str(tmp_path / "store.sqlite3"))
    assert outcome == "OperationalError: interrupted"


#: Threads opening their first connection while the store closes, 300 times over.
FIRST_USE_DURING_CLOSE = """
import sqlite3, sys, threading
from pathlib import Path
from controller.store import Store
refused = 0
for attempt in range(300):
    store = Store(Path(sys.argv[1]) / f"{attempt}.sqlite3")
    errors = []
    def read():
        try:
            store.query("SELECT 1")
        except sqlite3.ProgrammingError as error:
            errors.append(error)
    readers = [threading.Thread(target=read) for _ in range(4)]
    for reader in readers:
        reader.start()
    store.close()
    for reader in readers:
        reader.join()
    refused += len(errors)
print("done", refused)
"""


def test_a_thread_opening_its_connection_while_the_store_closes_gets_an_error_not_a_crash(tmp_path: Path) -> None:
    assert run_alone(FIRST_USE_DURING_CLOSE, str(tmp_path), timeout=300).startswith("done")
