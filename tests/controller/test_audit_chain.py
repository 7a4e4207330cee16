"""The keyed hash chain finds an edited, deleted, inserted or reordered event, as the issue's attacker makes them.

The attacker holds the store and the sqlite3 tool: drop the append-only
triggers, change history, put the triggers back. Verification names the
first bad event; checkpoints catch even a rewrite by someone holding the key.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from controller.audit import AuditLog
from controller.audit_chain import KEY_FILE, compute_mac, log_checkpoint, rows_of, verify, verify_recent
from controller.audit_cli import EXIT_CHAIN_BROKEN
from controller.store import Store
from tests.controller.harness import run, running_controller

ROOT = Path(__file__).resolve().parents[2]
EVENTS = 12
#: One sqlite3 or outpost-controller run: a process start and a small file.
TOOL_TIMEOUT = 60.0
DROP = "DROP TRIGGER audit_no_update; DROP TRIGGER audit_no_delete;"
RESTORE = """
CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
"""


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data directory whose store holds EVENTS chained events (and its key)."""
    data = tmp_path_factory.mktemp("pristine")
    store = Store(data / "store.sqlite3")
    try:
        audit = AuditLog(store)
        for i in range(EVENTS):
            audit.record("identity_created", identity=f"default/gw-{i}", roles=[])
    finally:
        store.close()
    return data


@pytest.fixture
def data(pristine: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "data"
    shutil.copytree(pristine, copy)
    return copy


def attack(data: Path, sql: str) -> None:
    """What the attacker does with the sqlite3 tool: triggers off, ``sql``, triggers back on."""
    subprocess.run(["sqlite3", str(data / "store.sqlite3")], input=f"{DROP}\n{sql}\n{RESTORE}", text=True,
                   check=True, timeout=TOOL_TIMEOUT, capture_output=True)


def check(data: Path, *checkpoints: str) -> tuple[int, str]:
    """``outpost-controller audit verify`` offline: (exit code, its one line)."""
    args = [sys.executable, "-m", "controller.cli", "audit", "verify", "--data", str(data)]
    for checkpoint in checkpoints:
        args += ["--checkpoint", checkpoint]
    done = subprocess.run(args, capture_output=True, text=True, timeout=TOOL_TIMEOUT, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    return done.returncode, (done.stdout + done.stderr).strip()


def head(data: Path) -> str:
    connection = sqlite3.connect(data / "store.sqlite3")
    try:
        row_id, mac = connection.execute("SELECT id, mac FROM audit ORDER BY id DESC LIMIT 1").fetchone()
    finally:
        connection.close()
    return f"{row_id}:{mac}"


def test_the_untouched_chain_verifies_and_its_key_is_private(data: Path) -> None:
    assert stat.S_IMODE((data / KEY_FILE).stat().st_mode) == 0o600
    code, line = check(data, head(data))
    assert code == 0, line
    assert line == f"the chain is whole: {EVENTS} events from event 1 to {EVENTS}, 1 checkpoint(s) match"


@pytest.mark.parametrize(("sql", "first_bad", "words"), [
    pytest.param("UPDATE audit SET fields = replace(fields, 'gw-5', 'gw-x'), identity = 'default/gw-x' WHERE id = 6;",
                 6, "MAC does not match", id="edited"),
    pytest.param("DELETE FROM audit WHERE id = 6;", 7, "event(s) 6 to 6 are missing", id="deleted"),
    pytest.param("DELETE FROM audit WHERE id = 6; UPDATE audit SET id = id - 1 WHERE id > 6;", 6,
                 "MAC does not match", id="deleted_and_renumbered"),
    pytest.param("UPDATE audit SET id = id + 100 WHERE id >= 6; UPDATE audit SET id = id - 99 WHERE id >= 106;"
                 "INSERT INTO audit (id, time, event, fields, correlation, mac) SELECT 6, time, 'identity_revoked',"
                 " fields, correlation, mac FROM audit WHERE id = 5;", 6, "MAC does not match", id="inserted"),
    pytest.param("UPDATE audit SET id = -4 WHERE id = 4; UPDATE audit SET id = 4 WHERE id = 5;"
                 "UPDATE audit SET id = 5 WHERE id = -4;", 4, "MAC does not match", id="reordered"),
    pytest.param("INSERT INTO audit (time, event, fields) VALUES (1.0, 'identity_revoked', '{}');", EVENTS + 1,
                 "carries no MAC inside the chain", id="appended_without_mac"),
    pytest.param("UPDATE audit SET identity = 'default/gw-9' WHERE id = 3;", 3, "identity column does not match",
                 id="indexed_column_edited"),
])
def test_a_tampered_store_is_found_and_the_first_bad_event_named(data: Path, sql: str, first_bad: int,
                                                                  words: str) -> None:
    attack(data, sql)
    code, line = check(data)
    assert code == EXIT_CHAIN_BROKEN, line
    assert line.startswith(f"event {first_bad}: ") and words in line, line


def test_deleting_the_newest_events_is_caught_by_a_checkpoint(data: Path) -> None:
    checkpoint = head(data)
    attack(data, f"DELETE FROM audit WHERE id > {EVENTS - 3};")
    assert check(data)[0] == 0  # a shorter chain is whole in itself
    code, line = check(data, checkpoint)
    assert code == EXIT_CHAIN_BROKEN and line.startswith(f"event {EVENTS}: the checkpoint names event"), line


def test_a_rewrite_by_someone_holding_the_key_is_caught_by_a_shipped_checkpoint(data: Path) -> None:
    shipped = head(data)
    key = (data / KEY_FILE).read_bytes()
    connection = sqlite3.connect(data / "store.sqlite3")
    connection.executescript(DROP)
    connection.execute("UPDATE audit SET fields = replace(fields, 'gw-2', 'gw-z'), identity = 'default/gw-z' "
                       "WHERE id = 3")
    previous = ""
    for row_id, when, event, fields in list(connection.execute("SELECT id, time, event, fields FROM audit ORDER BY id")):
        previous = compute_mac(key, previous, row_id, when, event, fields)
        connection.execute("UPDATE audit SET mac = ? WHERE id = ?", (previous, row_id))
    connection.executescript(RESTORE)
    connection.commit()
    connection.close()
    assert check(data)[0] == 0  # the forger's chain is whole
    code, line = check(data, shipped)
    assert code == EXIT_CHAIN_BROKEN and line.startswith(f"event {EVENTS}: it does not match the checkpoint"), line


def test_a_store_from_before_the_chain_starts_it_at_the_first_new_event_and_says_so(tmp_path: Path) -> None:
    data = tmp_path / "old"
    data.mkdir()
    old = sqlite3.connect(data / "store.sqlite3")  # the audit table as stores had it before the chain
    old.executescript("CREATE TABLE audit (id INTEGER PRIMARY KEY AUTOINCREMENT, time REAL NOT NULL, "
                      "event TEXT NOT NULL, fields TEXT NOT NULL);"
                      "INSERT INTO audit (time, event, fields) VALUES (1.0, 'identity_created', '{}');"
                      "INSERT INTO audit (time, event, fields) VALUES (2.0, 'identity_revoked', '{}');")
    old.commit()
    old.close()
    store = Store(data / "store.sqlite3")
    try:
        AuditLog(store).record("identity_created", identity="default/gw-new")
        result = verify(rows_of(store), (data / KEY_FILE).read_bytes())
    finally:
        store.close()
    assert (result.ok, result.chain_start, result.unchained) == (True, 3, 2)
    code, line = check(data)
    assert code == 0 and line == ("the chain is whole: 1 events from event 3 to 3; the 2 events before it predate "
                                  "the chain and are not covered"), line
    attack(data, "UPDATE audit SET event = 'token_created' WHERE id = 3;")
    assert check(data)[0] == EXIT_CHAIN_BROKEN


WRITER = """
import sys
from controller.audit import AuditLog
from controller.store import Store
from tests.controller.harness import run, running_controller
store = Store(sys.argv[1])
audit = AuditLog(store)
for i in range(int(sys.argv[3])):
    audit.record("service_created", service=f"default/{sys.argv[2]}-{i}", roles=[])
store.close()
"""


def test_several_processes_on_one_store_make_one_chain(data: Path) -> None:
    writes = 150
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(data / "store.sqlite3"), name, str(writes)],
                                cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}) for name in ("a", "b", "c")]
    for writer in writers:
        assert writer.wait(TOOL_TIMEOUT) == 0
    code, line = check(data)
    assert code == 0 and f"{EVENTS + 3 * writes} events" in line, line


def test_the_head_is_logged_as_a_checkpoint_verify_takes(data: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = Store(data / "store.sqlite3")
    try:
        with caplog.at_level(logging.INFO, logger="controller.audit_chain"):
            logged = log_checkpoint(store)
            assert log_checkpoint(store, logged) == logged  # unchanged: not logged again
    finally:
        store.close()
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("audit checkpoint ")]
    assert check(data, line.removeprefix("audit checkpoint "))[0] == 0


def test_bad_checkpoints_and_a_missing_key_are_one_sentence_each(data: Path) -> None:
    code, line = check(data, "12:beef")
    assert code != 0 and "is not ID:MAC" in line and line.count("\n") == 0, line
    (data / KEY_FILE).unlink()
    code, line = check(data)
    assert code != 0 and "Cannot read the audit chain key" in line and line.count("\n") == 0, line


def test_the_json_report_names_the_first_bad_event(data: Path) -> None:
    attack(data, "DELETE FROM audit WHERE id = 2;")
    done = subprocess.run([sys.executable, "-m", "controller.cli", "audit", "verify", "--data", str(data), "--json"],
                          capture_output=True, text=True, timeout=TOOL_TIMEOUT, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    report = json.loads(done.stdout)
    assert (done.returncode, report["ok"], report["first_bad"]) == (EXIT_CHAIN_BROKEN, False, 3)


def test_the_management_endpoint_verifies_the_running_controllers_store(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl") as ctl:
            await ctl.create_identity("gw-v")
            status, report = await ctl.call("GET", "/api/v1/audit/verify")
            assert (status, report["ok"], report["first_bad"]) == (200, True, None), report
            checkpoint = f"{report['head']['id']}:{report['head']['mac']}"
            status, report = await ctl.call("GET", f"/api/v1/audit/verify?checkpoint={checkpoint}")
            assert report["checkpoints"] == [checkpoint]
            for path, code in [("/api/v1/audit/verify?checkpoint=7", "invalid_checkpoint"),
                               ("/api/v1/audit/verify?since=1h", "unknown_parameter")]:
                status, body = await ctl.call("GET", path)
                assert (status, body["error"]) == (400, code), body
            attack(ctl.context.settings.data_dir, "UPDATE audit SET event = 'identity_revoked' WHERE id = 2;")
            status, report = await ctl.call("GET", "/api/v1/audit/verify")
            assert (status, report["ok"], report["first_bad"]) == (200, False, 2), report
            assert report["summary"].startswith("event 2: its MAC does not match")

    run(asyncio.wait_for(scenario(), 60))


def test_a_replaced_key_fails_at_the_chains_first_event_and_says_the_key_may_be_wrong(data: Path) -> None:
    (data / KEY_FILE).write_bytes(os.urandom(32))
    code, line = check(data)
    assert code == EXIT_CHAIN_BROKEN and line.startswith("event 1: ") and "audit.key is not the key" in line, line


def test_writers_on_several_connections_make_one_chain_on_either_engine(store_location: str | Path) -> None:
    """Several processes share a store: each writer holds the store's write lock, so no two read the same head."""
    key = os.urandom(32)
    stores = [Store(store_location) for _ in range(3)]
    try:
        logs = [AuditLog(store, chain_key=key) for store in stores]

        def write(log: AuditLog, n: int) -> None:
            for i in range(20):
                log.record("identity_created", identity=f"default/gw-{n}-{i}")

        threads = [threading.Thread(target=write, args=(log, n)) for n, log in enumerate(logs)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        rows = list(rows_of(stores[0]))
        assert len(rows) == 60
        report = verify(rows, key)
        assert report.ok, report
    finally:
        for store in stores:
            store.close()


def test_batches_and_single_events_interleaved_make_one_chain_on_either_engine(store_location: str | Path) -> None:
    """A batch (a stop's closed tunnels) reads the head once and chains its rows in order, between other writers."""
    key = os.urandom(32)
    stores = [Store(store_location) for _ in range(2)]
    try:
        batcher, single = (AuditLog(store, chain_key=key) for store in stores)

        def batches() -> None:
            for b in range(5):
                batcher.record_many([("tunnel_closed", {"identity": f"default/gw-{b}-{i}", "reason": "relay shutting down"})
                                     for i in range(40)])

        def singles() -> None:
            for i in range(30):
                single.record("identity_created", identity=f"default/one-{i}")

        threads = [threading.Thread(target=batches), threading.Thread(target=singles)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        rows = list(rows_of(stores[0]))
        assert [row[0] for row in rows] == list(range(1, 231))
        closed = [json.loads(row[3])["identity"] for row in rows if row[2] == "tunnel_closed"]
        assert closed == [f"default/gw-{b}-{i}" for b in range(5) for i in range(40)]
        report = verify(rows, key)
        assert report.ok, report
    finally:
        for store in stores:
            store.close()


def test_an_old_store_never_opened_by_a_chaining_controller_is_told_so_in_one_sentence(tmp_path: Path) -> None:
    data = tmp_path / "old"
    data.mkdir()
    old = sqlite3.connect(data / "store.sqlite3")
    old.executescript("CREATE TABLE audit (id INTEGER PRIMARY KEY, time REAL, event TEXT, fields TEXT);")
    old.close()
    (data / KEY_FILE).write_bytes(os.urandom(32))
    code, line = check(data)
    assert code != 0 and line == "This store has no audit chain yet; start the controller on it once.", line


def test_a_key_left_readable_by_others_is_made_owner_only_at_start(data: Path, caplog: pytest.LogCaptureFixture) -> None:
    (data / KEY_FILE).chmod(0o644)
    store = Store(data / "store.sqlite3")
    try:
        with caplog.at_level(logging.WARNING, logger="controller.audit_chain"):
            AuditLog(store).record("identity_created", identity="default/gw-late")
    finally:
        store.close()
    assert stat.S_IMODE((data / KEY_FILE).stat().st_mode) == 0o600
    assert any("made it 0600" in r.getMessage() for r in caplog.records)
    assert check(data)[0] == 0


def test_the_newest_events_are_checked_anchored_on_the_one_before_them(data: Path) -> None:
    store = Store(data / "store.sqlite3")
    try:
        key = (data / KEY_FILE).read_bytes()
        assert verify_recent(store, key, count=4).ok
        attack(data, f"UPDATE audit SET event = 'identity_revoked' WHERE id = {EVENTS - 1};")
        result = verify_recent(store, key, count=4)
        assert (result.ok, result.first_bad) == (False, EVENTS - 1)
        assert verify_recent(store, key, count=1).ok  # the edit lies before the newest event's anchor
    finally:
        store.close()


def test_a_controller_started_on_an_edited_store_says_so_in_its_log(tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    async def first() -> None:
        async with running_controller(tmp_path / "ctl") as ctl:
            await ctl.create_identity("gw-history")

    async def again() -> None:
        async with running_controller(tmp_path / "ctl"):
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            while loop.time() < deadline and not any("fails verification" in r.getMessage() for r in caplog.records):
                await asyncio.sleep(0.05)

    run(asyncio.wait_for(first(), 60))
    attack(tmp_path / "ctl", "UPDATE audit SET fields = replace(fields, 'gw-history', 'gw-other') WHERE id = 2;")
    with caplog.at_level(logging.INFO, logger="controller.audit_chain"):
        run(asyncio.wait_for(again(), 60))
    [line] = [r.getMessage() for r in caplog.records if "fails verification" in r.getMessage()]
    assert line.startswith("audit: the trail fails verification at event 2: its MAC does not match"), line
