"""The store: append-only audit log, shared by several connections."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from controller.audit import AuditLog
from controller.store import Store


def test_the_audit_log_cannot_be_rewritten_or_deleted(tmp_path: Path) -> None:
    store = Store(tmp_path / "store.sqlite3")
    try:
        AuditLog(store).record("identity_created", identity="default/gw")
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            with store.transaction() as db:
                db.execute("UPDATE audit SET event = 'nothing'")
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            with store.transaction() as db:
                db.execute("DELETE FROM audit")
        events = AuditLog(store).recent()
        assert [(e["event"], e["fields"]) for e in events] == [("identity_created", {"identity": "default/gw"})]
    finally:
        store.close()


def test_an_unknown_audit_event_is_a_programming_error(tmp_path: Path) -> None:
    store = Store(tmp_path / "store.sqlite3")
    try:
        with pytest.raises(ValueError):
            AuditLog(store).record("something_else")
        assert AuditLog(store).recent() == []
    finally:
        store.close()


def test_the_store_is_wal_owner_only_and_rolls_back_a_failed_transaction(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite3"
    store = Store(path)
    try:
        assert store.query_one("PRAGMA journal_mode")[0] == "wal"
        assert path.stat().st_mode & 0o777 == 0o600
        with pytest.raises(RuntimeError):
            with store.transaction() as db:
                db.execute("INSERT INTO meta (key, value) VALUES ('x', 'y')")
                raise RuntimeError("abandon")
        assert store.query_one("SELECT * FROM meta WHERE key = 'x'") is None
    finally:
        store.close()
