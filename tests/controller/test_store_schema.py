"""The store's schema on both engines: versions, migrations, and a newer store refused untouched."""

from __future__ import annotations

import hashlib
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from controller import store_schema
from controller.store import MIGRATIONS, Store, StoreTooNew
from controller.store_schema import SCHEMA_VERSION
from shared.errors import EXIT_DATAERR
from tests.e2e.harness import python_env

#: The digest of SCHEMA, ADDED_COLUMNS, APPEND_ONLY_TABLES and MIGRATIONS at each SCHEMA_VERSION.
SCHEMA_DIGESTS = {
    1: "4f4e2b010f4fb442f79846bc6f7b2622142c75acaee6a592281461f50c5f9272",
    # Presence (controller/presence.py) and people's sign-in (controller/signin/).
    2: "fdfec4f98a5c10ba106f1f434f8273b6f6898e2f0ce998fe7951071da6b27838",
    # The audit's correlation, identity, service and chain columns, and their indexes (ADDED_INDEXES
    # joined the digest here).
    3: "cf5c74bc8579171011ef42adfb1a6edd98754bd370db975a182e6c6d112513c1",
    # Relays as their own processes (controller/relays.py).
    4: "41602f29252c2157ded34aeadc0faccf91fc8a80529ccf4b4433e31a2a2f09b0",
    # Policies' versions, expiries and decision counters (controller/policy.py, controller/policy_counters.py),
    # how a service bound by several gateways chooses and which ports it declares (controller/relay/aiming.py),
    # and grants (controller/grants.py).
    5: "a1ae3de3ccee4a6bc2caea972bfcbb283ee80e24e394929a8082f047849b9993",
    # Which relay hosts which service, for dials across relays (controller/relay/directory.py).
    6: "8a779fbffd9b5d8a9a66e085024e8a6e1a401d3b2701ed6881760d0ef4611e6e",
    # Each issued certificate's DER digest, by which a relay recognises it (controller/relay/admit_cache.py).
    7: "90798f76e78eccaa69191d3041aa292373e1d42dc5614bfc0252d6be7c16f1a5",
}
#: The schema every store created before versions were checked holds (version 1, SQLite).
TODAYS_SCHEMA = Path(__file__).with_name("store_schema_v1.sql")


def schema_digest() -> str:
    parts = (store_schema.SCHEMA, store_schema.ADDED_COLUMNS, store_schema.ADDED_INDEXES, store_schema.APPEND_ONLY_TABLES,
             sorted(MIGRATIONS))
    return hashlib.sha256(repr(parts).encode()).hexdigest()


def test_every_change_of_the_schema_raises_its_version() -> None:
    digest = schema_digest()
    assert SCHEMA_DIGESTS.get(SCHEMA_VERSION) == digest, (
        "controller/store_schema.py's schema changed: raise SCHEMA_VERSION by one and add "
        f"{SCHEMA_VERSION + 1}: {digest!r} to SCHEMA_DIGESTS here (an older controller then refuses the new store)"
    )
    assert digest not in [d for version, d in SCHEMA_DIGESTS.items() if version != SCHEMA_VERSION]


def todays_store(path: Path) -> None:
    """A store as the controller before this module's versions wrote it, with a row in every table."""
    connection = sqlite3.connect(str(path))
    connection.executescript(TODAYS_SCHEMA.read_text())
    connection.executescript(
        "CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit "
        "BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;"
        "INSERT INTO meta VALUES ('schema_version', '1');"
        "INSERT INTO identities VALUES ('default', 'gw', '[]', 'enrolled', 1.5, 2.5, 3.5, 'ab');"
        "INSERT INTO tokens (jti, tenant, name, created_at, expires_at) VALUES ('j', 'default', 'gw', 1, 2e9);"
        "INSERT INTO policies (kind, tenant, identities, services, created_at) VALUES ('dial', 'default', '[]', '[]', 1);"
        "INSERT INTO audit (time, event, fields) VALUES (1, 'identity_created', '{}');"
        "INSERT INTO status_changes (tenant, name, status, time) VALUES ('default', 'gw', 'disabled', 1);"
    )
    connection.commit()
    connection.close()


def test_a_store_of_todays_schema_opens_keeps_every_row_and_records_the_current_version(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite3"
    todays_store(path)
    store = Store(path)
    try:
        assert store.query_one("SELECT value FROM meta WHERE key = 'schema_version'")["value"] == str(SCHEMA_VERSION)
        assert store.query_one("SELECT key_sha256 FROM identities")["key_sha256"] == "ab"
        assert [row["seq"] for row in store.query("SELECT seq FROM status_changes")] == [1]
        with store.transaction() as db:  # ids go on from where they were
            row = db.query_one("INSERT INTO policies (kind, tenant, identities, services, created_at) "
                               "VALUES ('bind', 'default', '[]', '[]', 2) RETURNING id")
        assert row is not None and row["id"] == 2
        with pytest.raises(sqlite3.IntegrityError, match="append-only"), store.transaction() as db:
            db.execute("DELETE FROM audit")
    finally:
        store.close()


def snapshot(location: Path | str) -> object:
    """Everything a refused open could have written: the SQLite file's bytes, or PostgreSQL's catalogue and meta."""
    if isinstance(location, Path):
        return location.read_bytes(), sorted(p.name for p in location.parent.iterdir())
    import psycopg

    with psycopg.connect(location) as connection:
        return (
            connection.execute("SELECT table_name, column_name FROM information_schema.columns "
                               "WHERE table_schema = 'public' ORDER BY 1, 2").fetchall(),
            connection.execute("SELECT tgname FROM pg_trigger WHERE NOT tgisinternal ORDER BY 1").fetchall(),
            connection.execute("SELECT key, value FROM meta ORDER BY key").fetchall(),
        )


def newer_store(location: Path | str) -> None:
    store = Store(location)
    with store.transaction() as db:
        db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    store.close()
    if isinstance(location, Path):
        connection = sqlite3.connect(str(location))
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        connection.close()


def test_a_store_of_a_newer_schema_is_refused_in_one_sentence_with_nothing_written(store_location: Path | str) -> None:
    newer_store(store_location)
    before = snapshot(store_location)
    with pytest.raises(StoreTooNew) as refused:
        Store(store_location)
    message = str(refused.value)
    assert f"schema version {SCHEMA_VERSION + 1}" in message and "upgrade outpost-controller" in message
    assert "\n" not in message and refused.value.exit_code == EXIT_DATAERR
    if isinstance(store_location, Path):
        for side in ("-wal", "-shm"):
            Path(f"{store_location}{side}").unlink(missing_ok=True)
    assert snapshot(store_location) == before


def test_the_controller_refuses_a_newer_postgresql_store_with_exit_code_65_and_creates_nothing(
    postgres_url: str, tmp_path: Path
) -> None:
    newer_store(postgres_url)
    data = tmp_path / "controller"
    result = subprocess.run(
        [sys.executable, "-m", "controller.cli", "serve", "--data", str(data), "--listen", "127.0.0.1:0",
         "--store", postgres_url],
        env=python_env(), capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == EXIT_DATAERR, result.stderr
    assert "newer than this outpost-controller knows" in result.stderr
    assert not data.exists() and list(tmp_path.iterdir()) == []


def test_unix_times_keep_their_microseconds_and_ids_count_up_on_postgresql(postgres_url: str) -> None:
    store = Store(postgres_url)
    try:
        with store.transaction() as db:
            first = db.query_one("INSERT INTO audit (time, event, fields) VALUES (?, 'x', '{}') RETURNING id",
                                 (1796555753.006379,))
            second = db.query_one("INSERT INTO audit (time, event, fields) VALUES (?, 'y', ?) RETURNING id",
                                  (2, "100% done?"))
        assert first is not None and second is not None and second["id"] == first["id"] + 1
        rows = store.query("SELECT time, fields FROM audit WHERE fields LIKE '%done?' OR time > ? ORDER BY id",
                           (1796555753.0,))
        assert [(row["time"], row[1]) for row in rows] == [(1796555753.006379, "{}"), (2.0, "100% done?")]
    finally:
        store.close()


def test_an_up_to_date_postgresql_store_opens_for_a_user_who_may_not_change_its_schema(postgres_url: str) -> None:
    import psycopg

    Store(postgres_url).close()
    writer = "w_" + postgres_url.split("/")[3].split("?")[0]  # roles are the cluster's: one per database
    with psycopg.connect(postgres_url, autocommit=True) as connection:
        connection.execute(f"CREATE ROLE {writer} LOGIN")
        connection.execute(f"GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA public TO {writer}")
        connection.execute(f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {writer}")
    try:
        as_writer = postgres_url.replace("postgresql://outpost@", f"postgresql://{writer}@")
        store = Store(as_writer)
        try:
            with store.transaction() as db:
                db.execute("INSERT INTO audit (time, event, fields) VALUES (1, 'x', '{}')")
            with pytest.raises(Exception, match="must be owner|permission denied"), store.transaction() as db:
                db.execute("ALTER TABLE audit DISABLE TRIGGER audit_append_only")
        finally:
            store.close()
    finally:
        with psycopg.connect(postgres_url, autocommit=True) as connection:
            connection.execute(f"DROP OWNED BY {writer}")
            connection.execute(f"DROP ROLE {writer}")


def test_a_store_missing_a_later_column_gets_it_on_either_engine(store_location: Path | str) -> None:
    """An older store of either engine: the column ADDED_COLUMNS lists is added and the version recorded."""
    store = Store(store_location)
    with store.transaction() as db:
        db.execute("INSERT INTO tokens (jti, tenant, name, created_at, expires_at) VALUES ('j', 'default', 'gw', 1, 2)")
        db.execute("ALTER TABLE tokens DROP COLUMN issuer")
        db.execute("UPDATE meta SET value = '0' WHERE key = 'schema_version'")
    store.close()
    store = Store(store_location)
    try:
        row = store.query_one("SELECT jti, issuer FROM tokens")
        assert row is not None and (row["jti"], row["issuer"]) == ("j", None)
        assert store.query_one("SELECT value FROM meta WHERE key = 'schema_version'")["value"] == str(SCHEMA_VERSION)
    finally:
        store.close()


def test_an_older_stores_certificates_get_their_der_digest_column_empty_on_either_engine(
        store_location: Path | str) -> None:
    """Rows issued before the column have no digest: a relay verifies those certificates as before."""
    store = Store(store_location)
    with store.transaction() as db:
        db.execute("ALTER TABLE certificates DROP COLUMN der_sha256")
        db.execute("INSERT INTO certificates (serial, tenant, name, purpose, issued_at, not_after, key_sha256) "
                   "VALUES ('1f', 'default', 'gw', 'enrollment', 1, 2, 'ab')")
        db.execute("UPDATE meta SET value = '6' WHERE key = 'schema_version'")
    store.close()
    store = Store(store_location)
    try:
        row = store.query_one("SELECT serial, der_sha256 FROM certificates")
        assert row is not None and (row["serial"], row["der_sha256"]) == ("1f", None)
        assert store.query_one("SELECT value FROM meta WHERE key = 'schema_version'")["value"] == str(SCHEMA_VERSION)
    finally:
        store.close()
