"""``outpost-controller store-move``: a box's SQLite store into an empty PostgreSQL database, all or nothing.

A real PostgreSQL (tests/controller/postgres_harness.py); each bad input is one
sentence with its exit code and a target left without a single table.
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
from controller.audit_chain import KEY_FILE, rows_of, verify  # noqa: E402
from controller.bootstrap import open_data_dir  # noqa: E402
from controller.cli import main  # noqa: E402
from controller.settings import Settings  # noqa: E402
from controller.store import Store  # noqa: E402
from controller.store_schema import SCHEMA_VERSION  # noqa: E402
from tests.controller.postgres_harness import PostgresServer  # noqa: E402


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out.strip(), captured.err.strip()


def tables_in(url: str) -> list[str]:
    with psycopg.connect(url) as connection:
        rows = connection.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'").fetchall()
    return sorted(row[0] for row in rows)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """A stopped box with gateways, a service, policies (one deleted), a revocation and their audit rows."""
    data = tmp_path / "box"
    context = open_data_dir(Settings(data_dir=data, listen_port=8443))
    with context.store.transaction() as db:
        for name in ("gw-1", "gw-2", "gw-3"):
            context.registry.create_identity_in(db, "default", name, ("gateway",))
    context.registry.create_service("default", "modbus", ("plc",))
    context.policy.create("bind", "default", ["role:gateway"], ["modbus"])
    dropped = context.policy.create("dial", "default", ["role:operator"], ["modbus"])
    context.policy.delete(dropped.id)
    context.registry.revoke("default", "gw-2")
    context.close()
    return data


def test_a_box_store_moves_whole_and_counters_continue_past_every_id_it_gave_out(
    data: Path, postgres_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    source = sqlite3.connect(data / "store.sqlite3")
    expected = {table: source.execute(f"SELECT count(*) FROM {table}").fetchone()[0] for table in store_move.TABLES}
    highest_policy = source.execute("SELECT seq FROM sqlite_sequence WHERE name = 'policies'").fetchone()[0]
    identities = source.execute("SELECT tenant, name, roles, status, key_sha256 FROM identities ORDER BY name").fetchall()
    source.close()
    assert expected["audit"] > 0 and expected["status_changes"] >= 1 and expected["policies"] == 1

    code, out, err = cli(capsys, "store-move", "--data", str(data), "--to", postgres_url)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[:-1] == [f"{table}: {expected[table]} rows" for table in store_move.TABLES]
    assert f"serve --data {data} --store postgresql://" in lines[-1]

    store = Store(postgres_url)  # what serve --store opens: the schema is current, nothing to migrate
    try:
        assert [tuple(row) for row in store.query(
            "SELECT tenant, name, roles, status, key_sha256 FROM identities ORDER BY name")] == identities
        assert store.query_one("SELECT status FROM identities WHERE name = 'gw-2'")["status"] == "revoked"
        assert store.query_one("SELECT value FROM meta WHERE key = 'schema_version'")["value"] == str(SCHEMA_VERSION)
        key = (data / KEY_FILE).read_bytes()
        before = verify(rows_of(store), key)
        assert before.ok and before.checked == expected["audit"], before
        context = open_data_dir(Settings(data_dir=data, listen_port=8443, store_url=postgres_url))
        try:
            # The deleted policy's id is not given out again; the next audit row extends the chain.
            policy = context.policy.create("dial", "default", ["role:operator"], ["modbus"])
            assert policy.id == highest_policy + 1
            context.registry.revoke("default", "gw-3")
            seqs = [row["seq"] for row in context.store.query("SELECT seq FROM status_changes ORDER BY seq")]
            assert len(set(seqs)) == len(seqs) == expected["status_changes"] + 1
        finally:
            context.close()
        after = verify(rows_of(store), key)
        assert after.ok and after.checked > before.checked and after.chain_start == before.chain_start, after
    finally:
        store.close()
    # The operator's offline check reads the chain where it now is, across the moved rows and the new ones.
    code, out, err = cli(capsys, "audit", "verify", "--data", str(data), "--store", postgres_url)
    assert code == 0 and out.startswith("the chain is whole") and f"to {after.head[0] if after.head else 0}" in out, err
    with psycopg.connect(postgres_url, autocommit=True) as connection:  # as the owner: past the append-only trigger
        connection.execute("ALTER TABLE audit DISABLE TRIGGER audit_append_only")
        connection.execute("UPDATE audit SET event = 'edited' WHERE id = (SELECT min(id) FROM audit)")
    code, out, _ = cli(capsys, "audit", "verify", "--data", str(data), "--store", postgres_url)
    assert code == 65 and "its MAC does not match" in out
    code, _, err = cli(capsys, "audit", "verify", "--data", str(data), "--store", str(data / "store.sqlite3"))
    assert code == 64 and "is not a postgresql:// URL" in err
    # The target now holds a store: a second move is refused, the source is untouched.
    code, _, err = cli(capsys, "store-move", "--data", str(data), "--to", postgres_url)
    assert code == store_move.EXIT_TARGET_NOT_EMPTY and "already holds an Outpost store" in err


def test_a_target_that_is_not_empty_is_refused(
    data: Path, postgres_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with psycopg.connect(postgres_url, autocommit=True) as connection:
        connection.execute("CREATE TABLE identities (tenant TEXT, name TEXT)")
        connection.execute("INSERT INTO identities VALUES ('default', 'someone')")
    code, out, err = cli(capsys, "store-move", "--data", str(data), "--to", postgres_url)
    assert code == 73 and not out and len(err.splitlines()) == 1
    assert "table identities has rows" in err and "Nothing was written" in err
    assert tables_in(postgres_url) == ["identities"]


def test_a_target_with_only_a_schema_version_is_refused(
    data: Path, postgres_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    Store(postgres_url).close()  # a serve --store started once: the schema and its version row, no fleet
    code, _, err = cli(capsys, "store-move", "--data", str(data), "--to", postgres_url)
    assert code == 73 and "table meta has rows" in err


@pytest.mark.parametrize(("to", "code", "words"), [
    ("postgresql://outpost@localhost/outpost?nosuchoption=1", 64, "is not a PostgreSQL URL libpq can read"),
    ("mysql://db.example/outpost", 64, "--to mysql://... is not a PostgreSQL URL"),
    ("/var/lib/outpost/store.sqlite3", 64, "is not a PostgreSQL URL"),
    ("postgresql://outpost:secret@/outpost?host=/nonexistent-socket-dir", 69, "Cannot reach"),
])
def test_a_to_that_does_not_parse_or_answer_is_refused(
    data: Path, to: str, code: int, words: str, capsys: pytest.CaptureFixture[str]
) -> None:
    got, out, err = cli(capsys, "store-move", "--data", str(data), "--to", to)
    assert (got, out) == (code, "") and words in err and len(err.splitlines()) == 1, err
    assert "secret" not in err


def test_sources_that_cannot_be_moved_are_refused_with_nothing_written(
    data: Path, tmp_path: Path, postgres_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    def refused(directory: Path) -> tuple[int, str]:
        code, out, err = cli(capsys, "store-move", "--data", str(directory), "--to", postgres_url)
        assert not out and len(err.splitlines()) == 1, err
        assert tables_in(postgres_url) == []
        return code, err

    assert refused(tmp_path / "nowhere")[0] == 64
    empty = tmp_path / "empty"
    empty.mkdir()
    assert refused(empty) == (64, f"{empty} is not a controller data directory (no store.sqlite3); check --data.")
    on_postgres = tmp_path / "on-postgres"
    (on_postgres / "ca").mkdir(parents=True)
    (on_postgres / "ca" / "ca.pem").write_text("-")
    code, err = refused(on_postgres)
    assert code == 64 and "PostgreSQL already" in err

    store = data / "store.sqlite3"
    original = store.read_bytes()
    connection = sqlite3.connect(store)
    connection.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    connection.commit()
    code, err = refused(data)
    assert code == 65 and "upgrade outpost-controller" in err
    connection.execute("CREATE TABLE someone_elses (x INTEGER)")
    connection.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))
    connection.commit()
    code, err = refused(data)
    assert code == 65 and "'someone_elses'" in err
    connection.close()

    store.write_bytes(b"not a database at all" * 100)
    code, err = refused(data)
    assert code == 65 and "is not a readable SQLite store" in err
    foreign = sqlite3.connect(store.with_name("foreign.sqlite3"))
    foreign.execute("CREATE TABLE notes (x TEXT)")
    foreign.commit()
    foreign.close()
    store.write_bytes(store.with_name("foreign.sqlite3").read_bytes())
    code, err = refused(data)
    assert code == 65 and "is not an Outpost store" in err
    store.write_bytes(original)


def test_a_store_a_process_holds_open_is_refused(
    data: Path, postgres_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); c.execute('SELECT 1 FROM meta')"
         ".fetchall(); print('open', flush=True); sys.stdin.read()", str(data / "store.sqlite3")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "open"
        code, _, err = cli(capsys, "store-move", "--data", str(data), "--to", postgres_url)
        assert code == 75 and "stop every process on this data directory first" in err
        assert tables_in(postgres_url) == []
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=10)
    code, _, err = cli(capsys, "store-move", "--data", str(data), "--to", postgres_url)
    assert code == 0, err


def test_postgresql_gone_in_the_middle_of_the_copy_leaves_the_target_empty(
    data: Path, postgres: PostgresServer, postgres_url: str, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch
) -> None:
    copy_table = store_move._copy_table
    database = postgres_url.split("/")[3].split("?")[0]

    def copy_then_cut(source: sqlite3.Connection, db: Any, connection: Any, table: str) -> int:
        copied = copy_table(source, db, connection, table)
        if table == "identities":  # rows and the schema written, the transaction still open
            with psycopg.connect(postgres.url(), autocommit=True) as admin:
                admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s "
                              "AND pid <> pg_backend_pid()", (database,))
        return copied

    monkeypatch.setattr(store_move, "_copy_table", copy_then_cut)
    code, out, err = cli(capsys, "store-move", "--data", str(data), "--to", postgres_url)
    assert code == 69 and not out and "nothing was written" in err and len(err.splitlines()) == 1, err
    assert tables_in(postgres_url) == []
    monkeypatch.undo()
    code, _, err = cli(capsys, "store-move", "--data", str(data), "--to", postgres_url)
    assert code == 0, err


def test_ctrl_c_in_the_middle_of_the_copy_leaves_the_target_empty(
    data: Path, postgres_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    copy_table = store_move._copy_table

    def copy_then_interrupt(source: sqlite3.Connection, db: Any, connection: Any, table: str) -> int:
        copied = copy_table(source, db, connection, table)
        if table == "audit":
            raise KeyboardInterrupt
        return copied

    monkeypatch.setattr(store_move, "_copy_table", copy_then_interrupt)
    code, out, _ = cli(capsys, "store-move", "--data", str(data), "--to", postgres_url)
    assert code == 130 and "nothing was written" in out
    assert tables_in(postgres_url) == []


def test_a_row_postgresql_refuses_rolls_the_whole_move_back(
    data: Path, postgres_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    connection = sqlite3.connect(data / "store.sqlite3")
    # SQLite keeps any value in any column; PostgreSQL's BIGINT does not take this one.
    connection.execute("INSERT INTO relays (name, address, status, created_at, tunnels) "
                       "VALUES ('eu-1', 'eu-1.example:443', 'active', 0, 'many')")
    connection.commit()
    connection.close()
    code, _, err = cli(capsys, "store-move", "--data", str(data), "--to", postgres_url)
    assert code == 65 and "PostgreSQL refused a row of relays" in err and len(err.splitlines()) == 1, err
    assert tables_in(postgres_url) == []


def test_an_audit_chain_that_does_not_verify_on_the_copy_is_not_committed(
    data: Path, postgres_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    connection = sqlite3.connect(data / "store.sqlite3")
    connection.execute("DROP TRIGGER audit_no_update")
    connection.execute("UPDATE audit SET event = 'edited' WHERE id = (SELECT max(id) FROM audit)")
    connection.commit()
    connection.close()
    code, _, err = cli(capsys, "store-move", "--data", str(data), "--to", postgres_url)
    assert code == 65 and "The audit chain does not verify on the copy" in err, err
    assert tables_in(postgres_url) == []


def test_a_user_who_may_not_create_the_schema_is_told_so_and_nothing_is_written(
    data: Path, postgres: PostgresServer, postgres_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with psycopg.connect(postgres.url(), autocommit=True) as admin:
        admin.execute("DROP ROLE IF EXISTS mover")
        admin.execute("CREATE ROLE mover LOGIN")  # PostgreSQL 15: no CREATE in a database's public schema it does not own
    try:
        url = postgres_url.replace("postgresql://outpost@", "postgresql://mover@")
        code, _, err = cli(capsys, "store-move", "--data", str(data), "--to", url)
        assert code == 65 and "PostgreSQL refused the schema" in err and "owns the database" in err, err
        assert tables_in(postgres_url) == []
    finally:
        with psycopg.connect(postgres.url(), autocommit=True) as admin:
            admin.execute("DROP ROLE mover")


def test_a_replaced_audit_key_is_found_before_anything_commits(
    data: Path, postgres_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    key = data / KEY_FILE
    key.write_bytes(bytes(len(key.read_bytes())))  # a key of the right size, not the one the chain was written with
    code, _, err = cli(capsys, "store-move", "--data", str(data), "--to", postgres_url)
    assert code == 65 and "audit.key is not the key the chain was written with" in err, err
    assert tables_in(postgres_url) == []
