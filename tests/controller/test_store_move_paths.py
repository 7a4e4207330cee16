"""``store-move`` attacked through its source and its target: a symlinked store, another client on the target.

Real PostgreSQL (tests/controller/postgres_harness.py) and real processes holding the SQLite file.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("psycopg")

import psycopg  # noqa: E402

from controller import store_move  # noqa: E402
from tests.controller.test_store_move import cli, data, tables_in  # noqa: E402, F401


def _hold_open(path: Path) -> subprocess.Popen[str]:
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); c.execute('SELECT 1 FROM meta')"
         ".fetchall(); print('open', flush=True); sys.stdin.read()", str(path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "open"
    return holder


def _release(holder: subprocess.Popen[str]) -> None:
    assert holder.stdin is not None
    holder.stdin.close()
    holder.wait(timeout=10)


def test_a_store_file_that_is_a_symlink_is_still_seen_open(data: Path, tmp_path: Path, postgres_url: str,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """The store moved to another disk and linked back: serve holds the real file (SQLite resolves links)."""
    elsewhere = tmp_path / "disk2"
    elsewhere.mkdir()
    real = elsewhere / "store.sqlite3"
    (data / "store.sqlite3").rename(real)
    (data / "store.sqlite3").symlink_to(real)
    holder = _hold_open(data / "store.sqlite3")
    try:
        code, _, err = cli(capsys, "store-move", "--data", str(data), "--to", postgres_url)
        assert code == 75 and "stop every process on this data directory first" in err, err
        assert tables_in(postgres_url) == []
    finally:
        _release(holder)


def test_a_data_directory_that_is_a_symlink_is_seen_open_and_moves(data: Path, tmp_path: Path, postgres_url: str,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    link = tmp_path / "box-link"
    link.symlink_to(data)
    holder = _hold_open(data / "store.sqlite3")  # serve started on the real path
    try:
        code, _, err = cli(capsys, "store-move", "--data", str(link), "--to", postgres_url)
        assert code == 75, err
    finally:
        _release(holder)
    code, _, err = cli(capsys, "store-move", "--data", str(link), "--to", postgres_url)
    assert code == 0, err
    source = sqlite3.connect(data / "store.sqlite3")
    identities = source.execute("SELECT count(*) FROM identities").fetchone()
    source.close()
    with psycopg.connect(postgres_url) as connection:
        assert connection.execute("SELECT count(*) FROM identities").fetchone() == identities


def test_another_client_writing_the_target_during_the_move_is_found_and_nothing_is_moved(
    data: Path, postgres_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A serve --store started on the target too early created the schema; a client writes a row mid-move."""
    from controller.store import Store

    store = Store(postgres_url)
    store.close()
    with psycopg.connect(postgres_url, autocommit=True) as connection:
        connection.execute("DELETE FROM meta")  # an empty database with the tables (refused otherwise, see above)
    copy_table = store_move._copy_table

    def copy_while_another_writes(source: sqlite3.Connection, db: Any, connection: Any, table: str) -> int:
        copied = copy_table(source, db, connection, table)
        if table == "identities":  # the move's copy still uncommitted; this client does not take the write lock
            with psycopg.connect(postgres_url, autocommit=True) as other:
                other.execute("INSERT INTO services (tenant, name, roles, created_at) "
                              "VALUES ('default', 'intruder', '[]', 0)")
        return copied

    monkeypatch.setattr(store_move, "_copy_table", copy_while_another_writes)
    code, _, err = cli(capsys, "store-move", "--data", str(data), "--to", postgres_url)
    assert code == 65 and "The table services counted" in err and "nothing was written" in err, err
    with psycopg.connect(postgres_url) as connection:
        assert connection.execute("SELECT count(*) FROM identities").fetchone() == (0,)
        assert connection.execute("SELECT name FROM services").fetchall() == [("intruder",)]


def test_a_source_whose_newest_audit_events_were_deleted_is_refused(
    data: Path, postgres_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The chain cannot show its own tail cut off, but SQLite's counter remembers the ids it gave out.
    Moved as it was, the first event written on PostgreSQL would follow the gap, and the chain would
    then read as broken by the move."""
    connection = sqlite3.connect(data / "store.sqlite3")
    connection.execute("DROP TRIGGER audit_no_delete")
    newest = connection.execute("SELECT max(id) FROM audit").fetchone()[0]
    connection.execute("DELETE FROM audit WHERE id >= ?", (newest - 1,))
    connection.commit()
    connection.close()
    code, out, err = cli(capsys, "store-move", "--data", str(data), "--to", postgres_url)
    assert code == 65 and not out and len(err.splitlines()) == 1, err
    assert f"events {newest - 1} to {newest} were deleted" in err and "nothing was written" in err, err
    assert tables_in(postgres_url) == []


def test_a_second_move_into_the_same_database_meanwhile_is_told_so(
    data: Path, postgres_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two operators moving into one database at once: the later waits for the store's write lock, which the
    first holds for the whole copy (36 s for a million rows), and must not be told PostgreSQL went away."""
    from controller.store_postgres import WRITE_LOCK_KEY

    monkeypatch.setattr(store_move, "BUSY_TIMEOUT_SECONDS", 0.5)
    with psycopg.connect(postgres_url) as first:  # a move in progress: its transaction holds the lock
        first.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK_KEY,))
        code, out, err = cli(capsys, "store-move", "--data", str(data), "--to", postgres_url)
        first.rollback()
    assert code == 75 and not out and len(err.splitlines()) == 1, err
    assert "went away" not in err and "another process is writing" in err and "nothing was written" in err, err
    assert tables_in(postgres_url) == []


def test_a_serve_started_on_the_target_during_the_move_waits_and_then_opens_the_moved_store(
    data: Path, postgres_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Started too early, ``serve --store`` opens the schema under the store's write lock, which the move
    holds: it waits for the move's commit and finds the moved store, rather than a second schema."""
    import threading

    from controller.store import Store

    opened: list[object] = []
    opener = threading.Thread(target=lambda: opened.append(_open(Store, postgres_url)))
    copy_table = store_move._copy_table

    def copy_while_serve_starts(source: sqlite3.Connection, db: Any, connection: Any, table: str) -> int:
        copied = copy_table(source, db, connection, table)
        if table == "identities":
            opener.start()
            opener.join(0.5)  # it waits on the lock (it would have finished by now otherwise)
            assert opener.is_alive()
        return copied

    monkeypatch.setattr(store_move, "_copy_table", copy_while_serve_starts)
    code, _, err = cli(capsys, "store-move", "--data", str(data), "--to", postgres_url)
    assert code == 0, err
    opener.join(10)
    [store] = opened
    assert isinstance(store, Store), store
    try:
        row = store.query_one("SELECT count(*) AS n FROM identities")
        assert row is not None and int(row["n"]) > 0
    finally:
        store.close()


def _open(store_class: Any, url: str) -> object:
    try:
        return store_class(url)
    except Exception as error:  # the test reports what a too-early serve would have said
        return error
