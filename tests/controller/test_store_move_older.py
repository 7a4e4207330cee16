"""``store-move`` of a store at an older schema version: a migrated private copy is moved, the store stays as it was.

Real PostgreSQL (tests/controller/postgres_harness.py); the full disk is a real
tmpfs of a few pages, mounted in a user and mount namespace of the test's own.
"""

from __future__ import annotations

import hashlib
import shlex
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("psycopg")

from controller import store as store_module  # noqa: E402
from controller import store_move, store_move_copy  # noqa: E402
from controller.audit_chain import KEY_FILE, rows_of, verify  # noqa: E402
from controller.bootstrap import open_data_dir  # noqa: E402
from controller.settings import Settings  # noqa: E402
from controller.store import Store, Transaction  # noqa: E402
from controller.store_schema import SCHEMA_VERSION  # noqa: E402
from tests.controller.test_store_move import cli, data, tables_in  # noqa: E402, F401
from tests.e2e.harness import python_env  # noqa: E402

#: What the certificate row of the older store is recognised by after the move.
SERIAL = "1f"


def make_older(data: Path, version: int | None) -> None:
    """The box's store as an older controller left it: without the columns that came after ``version``'s
    (the certificates' DER digest came with 7, the tokens' issuer before versions) and that version recorded."""
    connection = sqlite3.connect(data / "store.sqlite3")
    connection.execute("INSERT INTO certificates (serial, tenant, name, purpose, issued_at, not_after, key_sha256) "
                       f"VALUES ('{SERIAL}', 'default', 'gw-1', 'enrollment', 1, 2, 'ab')")
    connection.execute("ALTER TABLE certificates DROP COLUMN der_sha256")
    if version is None:
        connection.execute("ALTER TABLE tokens DROP COLUMN issuer")
        connection.execute("DELETE FROM meta WHERE key = 'schema_version'")
    else:
        connection.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(version),))
    connection.commit()
    connection.close()  # the last connection: its WAL is folded into the file and removed


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def leftovers(data: Path) -> list[str]:
    return sorted(path.name for path in data.iterdir() if path.name.startswith(store_move_copy.WORK_PREFIX))


@pytest.mark.parametrize("version", [SCHEMA_VERSION - 1, None], ids=["previous-version", "before-versions"])
def test_an_older_store_moves_from_a_migrated_copy_and_is_left_byte_for_byte(
    data: Path, postgres_url: str, version: int | None, capsys: pytest.CaptureFixture[str]
) -> None:
    make_older(data, version)
    source = data / "store.sqlite3"
    before = digest(source)
    reader = sqlite3.connect(source)
    expected = {table: reader.execute(f"SELECT count(*) FROM {table}").fetchone()[0] for table in store_move.TABLES}
    reader.close()
    assert expected["audit"] > 0 and expected["certificates"] == 1
    expected["meta"] += version is None  # the migration records the version the store had no row for

    code, out, err = cli(capsys, "store-move", "--data", str(data), "--to", postgres_url)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[:len(store_move.TABLES)] == [f"{table}: {expected[table]} rows" for table in store_move.TABLES]
    assert f"a copy of it was migrated to {SCHEMA_VERSION}" in lines[-2] and "serve --data" in lines[-1]

    assert digest(source) == before
    assert leftovers(data) == []
    reader = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
    try:  # what an older controller finds on its way back: its own schema, its version
        assert "der_sha256" not in {row[1] for row in reader.execute("PRAGMA table_info(certificates)")}
        row = reader.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        assert (None if row is None else int(row[0])) == version
    finally:
        reader.close()

    store = Store(postgres_url)
    try:
        assert store.query_one("SELECT value FROM meta WHERE key = 'schema_version'")["value"] == str(SCHEMA_VERSION)
        for table, rows in expected.items():
            assert store.query_one(f"SELECT count(*) AS n FROM {table}")["n"] == rows, table
        row = store.query_one("SELECT serial, der_sha256 FROM certificates")
        assert row is not None and (row["serial"], row["der_sha256"]) == (SERIAL, None)
        chain = verify(rows_of(store), (data / KEY_FILE).read_bytes())
        assert chain.ok and chain.checked == expected["audit"], chain
    finally:
        store.close()


def test_a_box_from_before_the_audit_chain_moves_without_a_key_and_serve_starts_the_chain(
    data: Path, postgres_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    make_older(data, None)
    connection = sqlite3.connect(data / "store.sqlite3")
    connection.execute("ALTER TABLE audit DROP COLUMN mac")  # the events of a controller before the chain
    connection.commit()
    events = connection.execute("SELECT count(*) FROM audit").fetchone()[0]
    connection.close()
    (data / KEY_FILE).unlink()
    code, _, err = cli(capsys, "store-move", "--data", str(data), "--to", postgres_url)
    assert code == 0, err
    assert not (data / KEY_FILE).exists()  # made by serve, which owns it, not by the move
    context = open_data_dir(Settings(data_dir=data, listen_port=8443, store_url=postgres_url))
    try:
        context.registry.revoke("default", "gw-3")
        chain = verify(rows_of(context.store), (data / KEY_FILE).read_bytes())
    finally:
        context.close()
    assert chain.ok and chain.unchained == events and chain.chain_start == events + 1, chain


def test_a_newer_store_is_still_refused_with_nothing_created(
    data: Path, postgres_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    connection = sqlite3.connect(data / "store.sqlite3")
    connection.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    connection.commit()
    connection.close()
    before = digest(data / "store.sqlite3")
    code, out, err = cli(capsys, "store-move", "--data", str(data), "--to", postgres_url)
    assert code == 65 and not out and "upgrade outpost-controller" in err and len(err.splitlines()) == 1, err
    assert tables_in(postgres_url) == [] and leftovers(data) == [] and digest(data / "store.sqlite3") == before


@pytest.mark.parametrize("failure", [KeyboardInterrupt, sqlite3.OperationalError], ids=["ctrl-c", "failure"])
def test_ctrl_c_or_a_failure_while_the_copy_migrates_leaves_no_copy_and_no_table(
    data: Path, postgres_url: str, failure: type[BaseException], capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch
) -> None:
    make_older(data, SCHEMA_VERSION - 1)
    before = digest(data / "store.sqlite3")
    reached = []

    def interrupted(db: Transaction) -> None:  # the copy is written, its columns added, its transaction open
        reached.append(sorted(path.name for path in next(iter(data.glob(f"{store_move_copy.WORK_PREFIX}*"))).iterdir()))
        raise failure("interrupted while migrating")

    # The migration step of the current version, run by the code serve runs, is where it stops.
    monkeypatch.setitem(store_module.MIGRATIONS, SCHEMA_VERSION, interrupted)
    code, out, err = cli(capsys, "store-move", "--data", str(data), "--to", postgres_url)
    assert reached and "store.sqlite3" in reached[0]
    if failure is KeyboardInterrupt:
        assert code == 130 and "nothing was written" in out
    else:
        assert code == 65 and "failed (interrupted while migrating)" in err and len(err.splitlines()) == 1, err
    assert leftovers(data) == [] and tables_in(postgres_url) == [] and digest(data / "store.sqlite3") == before


@pytest.mark.parametrize(("room", "words"), [
    ("to read", "the file system holding it is full (disk I/O error"),
    ("to read, not to copy", "Cannot write the migrated copy"),
    ("to copy, not to migrate", "Cannot write the migrated copy"),
])
def test_a_full_disk_is_told_in_one_sentence_what_to_free(
    data: Path, tmp_path: Path, postgres_url: str, room: str, words: str
) -> None:
    """The box's data directory on a real file system with room for the store and a few pages more: none
    for the -shm file a reader of the store makes, room for that but not for the copy (found before
    copying), or room for the copy but not for migrating it (found by SQLite while it writes)."""
    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "-Urm", "true"], capture_output=True, timeout=30).returncode != 0:
        pytest.skip("unprivileged user and mount namespaces are not available here for a small tmpfs")
    make_older(data, SCHEMA_VERSION - 1)
    store_size = (data / "store.sqlite3").stat().st_size
    size = store_size + (data / KEY_FILE).stat().st_size + {
        "to read": 4096,
        "to read, not to copy": store_move.SHM_FILE_BYTES + 3 * 4096,
        "to copy, not to migrate": store_move.SHM_FILE_BYTES + store_size + 2 * 4096,
    }[room]
    mount = tmp_path / "small-fs"
    mount.mkdir()
    box = mount / "box"
    script = f"""
        set -e
        mount -t tmpfs -o size={size},mode=0700 tmpfs {mount}
        mkdir -m 0700 {box}
        cp {data / 'store.sqlite3'} {data / KEY_FILE} {box}/
        set +e
        {shlex.quote(sys.executable)} -m controller.cli store-move --data {box} --to {shlex.quote(postgres_url)}
        echo "exit $?"
        ls -A {box}
    """
    result = subprocess.run(["unshare", "-Urm", "sh", "-c", script], capture_output=True, text=True, timeout=60,
                            env=python_env())
    lines = result.stdout.splitlines()
    assert "exit 65" in lines, result
    assert not [name for name in lines if name.startswith(store_move_copy.WORK_PREFIX)], result
    error = result.stderr.strip()
    assert len(error.splitlines()) == 1 and words in error and "free space" in error, result
    assert "run store-move again" in error and "Nothing was written" in error
    reason = error.split(" (", 1)[1].split(")", 1)[0]  # the space measured before copying, or SQLite's words
    assert reason.endswith("KiB free") if room == "to read, not to copy" else reason.startswith("disk I/O error"), error
    assert tables_in(postgres_url) == []


#: A store-move's copy step in a process of its own, which either dies there by SIGKILL (``kill``) or holds
#: its copy until its standard input closes (``hold``).
COPY_AND = """
import os, signal, sys
from pathlib import Path
from controller.store_move import snapshot
from controller.store_move_copy import migrated_copy
data = Path(sys.argv[1])
with snapshot(data / "store.sqlite3") as source, migrated_copy(source, data / "store.sqlite3", data):
    print("copied", flush=True)
    if sys.argv[2] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    sys.stdin.readline()
"""


def copy_and(data: Path, then: str) -> subprocess.Popen[str]:
    process = subprocess.Popen([sys.executable, "-c", COPY_AND, str(data), then], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True, env=python_env())
    assert process.stdout is not None and process.stdout.readline() == "copied\n"
    return process


def test_the_copy_a_killed_move_left_is_removed_by_the_next_move(
    data: Path, postgres_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    make_older(data, SCHEMA_VERSION - 1)
    killed = copy_and(data, "kill")
    assert killed.wait(timeout=30) == -9
    left = leftovers(data)
    assert len(left) == 1 and (data / left[0] / "store.sqlite3").is_file()
    code, out, err = cli(capsys, "store-move", "--data", str(data), "--to", postgres_url)
    assert code == 0, err
    assert out.splitlines()[0] == f"removed {data / left[0]}: the copy of a store-move that was killed before it ended"
    assert leftovers(data) == []


def test_a_copy_in_use_is_kept_while_a_killed_one_beside_it_goes(data: Path) -> None:
    make_older(data, SCHEMA_VERSION - 1)
    assert copy_and(data, "kill").wait(timeout=30) == -9
    abandoned = leftovers(data)
    holder = copy_and(data, "hold")
    try:
        held = sorted(set(leftovers(data)) - set(abandoned))
        assert len(held) == 1
        assert store_move_copy.discard_abandoned_copies(data) == abandoned
        assert leftovers(data) == held and (data / held[0] / "store.sqlite3").is_file()
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        assert holder.wait(timeout=30) == 0
    assert leftovers(data) == []


def test_a_link_or_a_file_named_like_a_copy_is_left_alone_and_what_a_link_points_at_is_untouched(
        tmp_path: Path) -> None:
    """Whoever can write the data directory could plant a link there; following it would delete elsewhere."""
    data_dir, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    data_dir.mkdir()
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("not the move's")
    link = data_dir / f"{store_move_copy.WORK_PREFIX}link"
    link.symlink_to(elsewhere, target_is_directory=True)
    plain = data_dir / f"{store_move_copy.WORK_PREFIX}file"
    plain.write_text("a file by that name")
    abandoned = data_dir / f"{store_move_copy.WORK_PREFIX}abandoned"
    abandoned.mkdir()
    (abandoned / "store.sqlite3").write_bytes(b"copy")

    assert store_move_copy.discard_abandoned_copies(data_dir) == [abandoned.name]
    assert link.is_symlink() and (elsewhere / "keep.txt").read_text() == "not the move's"
    assert plain.read_text() == "a file by that name"
    assert not abandoned.exists()
