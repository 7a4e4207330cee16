"""Many rows in one insert or delete: what a stop's audit and presence writes go through, on both engines.

A worker writes a stop's 10,000 audit and presence rows beside the busy event
loop. SQLite sends them as one statement, since sqlite3 lets go of the
interpreter lock at every step of a statement and a worker waits for it back
each time (tests/bench/audit_write.py measures what that costs).
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest

from controller.presence import PRESENCE_COLUMNS
from controller.store import Store

CONFLICT = "ON CONFLICT (tenant, name, relay) DO UPDATE SET online = excluded.online, last_seen = excluded.last_seen"


def presence_row(n: int, online: int = 1) -> tuple[object, ...]:
    # Text that quotes, escapes and leaves ASCII; floats that need every digit; ints; None.
    return ("default", f"gw-{n}-'\"\\-ü", "relay-a", online, 1_765_000_000.123456 + n / 3, 1_765_000_100 + n / 7,
            "203.0.113.9", 540, None, None, math.pi * n)


def presence_rows(store: Store) -> list[tuple[object, ...]]:
    columns = ", ".join(PRESENCE_COLUMNS)
    return [tuple(row) for row in store.query(f"SELECT {columns} FROM presence ORDER BY updated_at")]


def test_inserted_rows_read_back_exactly_as_given(store: Store) -> None:
    rows = [presence_row(n) for n in range(300)]
    with store.transaction() as db:
        db.insert_rows("presence", PRESENCE_COLUMNS, rows)
    assert presence_rows(store) == rows


def test_rows_that_conflict_update_the_rows_already_there(store: Store) -> None:
    with store.transaction() as db:
        db.insert_rows("presence", PRESENCE_COLUMNS, [presence_row(n) for n in range(10)], CONFLICT)
    again = [presence_row(n, online=0) for n in range(5, 15)]
    with store.transaction() as db:
        db.insert_rows("presence", PRESENCE_COLUMNS, again, CONFLICT)
    found = presence_rows(store)
    assert len(found) == 15
    assert [row[3] for row in found] == [1] * 5 + [0] * 10


def test_no_rows_is_no_statement(store: Store) -> None:
    with store.transaction() as db:
        db.insert_rows("presence", PRESENCE_COLUMNS, [])
    assert presence_rows(store) == []


def test_a_value_json_cannot_carry_fails_the_transaction_and_writes_nothing(tmp_path: Path) -> None:
    store = Store(tmp_path / "store.sqlite3")
    try:
        bad = presence_row(1)[:4] + (math.nan,) + presence_row(1)[5:]
        with pytest.raises(ValueError):
            with store.transaction() as db:
                db.insert_rows("presence", PRESENCE_COLUMNS, [presence_row(0)])
                db.insert_rows("presence", PRESENCE_COLUMNS, [bad])
        assert presence_rows(store) == []
    finally:
        store.close()


def test_sqlite_inserts_a_thousand_rows_in_one_statement(tmp_path: Path) -> None:
    store = Store(tmp_path / "store.sqlite3")
    try:
        traced: list[str] = []
        with store.transaction() as db:
            connection = db._connection  # type: ignore[attr-defined]
            connection.set_trace_callback(traced.append)
            try:
                db.insert_rows("presence", PRESENCE_COLUMNS, [presence_row(n) for n in range(1000)])
            finally:
                connection.set_trace_callback(None)
        assert len(presence_rows(store)) == 1000
        assert len([sql for sql in traced if sql.lstrip().upper().startswith("INSERT")]) == 1
    finally:
        store.close()


def test_sqlite_floats_arrive_to_the_last_bit(tmp_path: Path) -> None:
    # An audit row's time is in its MAC as Python wrote it: a time read back one bit off would
    # break the chain. The values go through JSON text, so every float must parse back exactly.
    draw = random.Random(14)
    values = [1_765_000_000 + draw.random() * 1e7 for _ in range(10_000)]
    values += [draw.random() * 10.0 ** draw.randint(-300, 300) for _ in range(10_000)]
    store = Store(tmp_path / "store.sqlite3")
    try:
        rows = [("default", f"gw-{n}", "relay-a", 1, value, value, None, None, None, None, float(n))
                for n, value in enumerate(values)]
        with store.transaction() as db:
            db.insert_rows("presence", PRESENCE_COLUMNS, rows)
        found = [row[0] for row in store.query("SELECT last_seen FROM presence ORDER BY updated_at")]
        assert found == values
    finally:
        store.close()


OLDER_OFFLINE = "tenant = ? AND name = ? AND relay <> ? AND online = 0 AND last_seen <= ?"


def test_deleted_rows_are_exactly_those_each_row_of_values_names(store: Store) -> None:
    # Rows of gw-0..gw-5 on relay-a (gw-4 online) and on relay-b, last seen at 1_765_000_100 + n / 7.
    with store.transaction() as db:
        for relay in ("relay-a", "relay-b"):
            db.insert_rows("presence", PRESENCE_COLUMNS,
                           [presence_row(n, online=int(n == 4))[:2] + (relay,) + presence_row(n, online=int(n == 4))[3:]
                            for n in range(6)])
    names = {n: presence_row(n)[1] for n in range(6)}
    seen = {n: presence_row(n)[5] for n in range(6)}
    deletions = [
        ("default", names[0], "relay-b", seen[0]),  # relay-a's gw-0: offline, seen exactly then
        ("default", names[1], "relay-b", seen[1] - 1.0),  # relay-a's gw-1 was seen later: kept
        ("default", names[2], "relay-a", seen[2] + 1.0),  # relay-b's gw-2
        ("default", names[4], "relay-b", seen[4] + 1.0),  # relay-a's gw-4 is online: kept
        ("other", names[5], "relay-b", seen[5] + 1.0),  # another tenant's: nothing
    ]
    with store.transaction() as db:
        db.delete_rows("presence", OLDER_OFFLINE, deletions)
    left = {(row["name"], row["relay"]) for row in store.query("SELECT name, relay FROM presence")}
    gone = {(names[0], "relay-a"), (names[2], "relay-b")}
    assert left == {(names[n], relay) for n in range(6) for relay in ("relay-a", "relay-b")} - gone


def test_no_rows_to_delete_is_no_statement(store: Store) -> None:
    with store.transaction() as db:
        db.insert_rows("presence", PRESENCE_COLUMNS, [presence_row(0, online=0)])
        db.delete_rows("presence", OLDER_OFFLINE, [])
    assert len(presence_rows(store)) == 1


def test_sqlite_deletes_a_thousand_rows_in_one_statement(tmp_path: Path) -> None:
    store = Store(tmp_path / "store.sqlite3")
    try:
        rows = [presence_row(n, online=0) for n in range(1500)]
        with store.transaction() as db:
            db.insert_rows("presence", PRESENCE_COLUMNS, rows)
        traced: list[str] = []
        with store.transaction() as db:
            connection = db._connection  # type: ignore[attr-defined]
            connection.set_trace_callback(traced.append)
            try:
                db.delete_rows("presence", OLDER_OFFLINE,
                               [(row[0], row[1], "relay-b", row[5]) for row in rows[:1000]])
            finally:
                connection.set_trace_callback(None)
        assert presence_rows(store) == rows[1000:]
        assert len([sql for sql in traced if sql.lstrip().upper().startswith("DELETE")]) == 1
    finally:
        store.close()
