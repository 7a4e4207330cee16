"""How long ``outpost-controller store-move`` takes for a box with a long audit trail, as one JSON line.

A box's data directory on SQLite gets ``--identities`` gateways and
``--events`` audit events, written by the controller's own registry and
audit writer (so the chain is real); then its store is moved into an empty
database of PostgreSQL 15, started here as tests/controller/postgres_harness.py
starts it (unix socket), timed from the command's start to its commit,
which includes the copy's checks (row counts, the whole audit chain verified
on the target). Then the same store, made one schema version older (the
certificates' DER digest column dropped, the version set back), is moved
again into a second database: a migrated copy is moved, so the difference
is what the copy and its migration cost (``older_move_seconds``, and its
ratio to ``move_seconds`` of the same run). Run from the repository root:

    .venv/bin/python tests/bench/store_move.py [--events 200000] [--identities 2000]
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from controller.bootstrap import open_data_dir  # noqa: E402
from controller.settings import Settings  # noqa: E402
from controller.store_move import move  # noqa: E402
from controller.store_schema import SCHEMA_VERSION  # noqa: E402
from tests.bench.audit_verify import fill  # noqa: E402
from tests.bench.bench_setup import emit, machine  # noqa: E402
from tests.controller.postgres_harness import PostgresServer, missing_reason, postgres_server  # noqa: E402

#: A box a year old: a fleet's enrollments, renewals and dials leave a few hundred thousand events.
DEFAULT_EVENTS = 200_000
#: Identities created in one transaction each batch: the fill is set-up, not measured.
IDENTITY_BATCH = 500


def fill_box(data: Path, identities: int, events: int) -> None:
    context = open_data_dir(Settings(data_dir=data, listen_port=8443))
    try:
        for start in range(0, identities, IDENTITY_BATCH):
            with context.store.transaction() as db:
                for i in range(start, min(identities, start + IDENTITY_BATCH)):
                    context.registry.create_identity_in(db, "default", f"gw-{i:05d}", ("gateway",))
        fill(context.audit, events)
    finally:
        context.close()


def make_older(store: Path) -> None:
    """The store as the controller of the previous schema version left it."""
    connection = sqlite3.connect(store)
    connection.execute("ALTER TABLE certificates DROP COLUMN der_sha256")
    connection.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION - 1),))
    connection.commit()
    connection.close()


def timed_moves(data: Path, server: PostgresServer, runs: int) -> list[float]:
    """Seconds of ``runs`` moves of ``data``'s store, each into a new empty database (dropped afterwards)."""
    times = []
    for _ in range(runs):
        url = server.create_database()
        started = time.perf_counter()
        move(data, url)
        times.append(time.perf_counter() - started)
        server.drop_database(url)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=DEFAULT_EVENTS)
    parser.add_argument("--identities", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=1, help="moves of each store; the median is reported")
    args = parser.parse_args()
    reason = missing_reason()
    if reason is not None:
        print(f"store-move is not measured: {reason}", file=sys.stderr)
        emit({"benchmark": "store_move", "skipped": reason, "machine": machine()})
        return 0
    with tempfile.TemporaryDirectory(prefix="store-move-") as folder, postgres_server() as server:
        data = Path(folder) / "box"
        started = time.perf_counter()
        fill_box(data, args.identities, args.events)
        fill_seconds = time.perf_counter() - started
        size = (data / "store.sqlite3").stat().st_size
        url = server.create_database()
        started = time.perf_counter()
        moved = move(data, url)
        first = time.perf_counter() - started
        server.drop_database(url)
        seconds = statistics.median([first, *timed_moves(data, server, args.runs - 1)])
        make_older(data / "store.sqlite3")
        older_seconds = statistics.median(timed_moves(data, server, args.runs))
    rows = sum(entry.rows for entry in moved)
    audit_rows = next(entry.rows for entry in moved if entry.table == "audit")
    emit({
        "benchmark": "store_move",
        "audit_rows": audit_rows,
        "rows": rows,
        "sqlite_mib": round(size / 2**20, 1),
        "move_seconds": round(seconds, 2),
        "rows_per_second": round(rows / seconds),
        "older_move_seconds": round(older_seconds, 2),
        "older_to_current_ratio": round(older_seconds / seconds, 2),
        "runs": args.runs,
        "fill_seconds": round(fill_seconds, 2),
        "machine": machine(),
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
