"""How long verifying the audit hash chain takes, as one JSON line (the goal: 1,000,000 events in under a minute).

The store is filled through the controller's own audit writer (batches of
events in one transaction each, as the relay writes a tunnel's decisions),
so every row is chained exactly as in production; then the chain is verified
as ``outpost-controller audit verify`` does it, from the store and the key.
Run from the repository root:

    .venv/bin/python tests/bench/audit_verify.py [--events 1000000]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from controller.audit import AuditLog  # noqa: E402
from controller.audit_chain import KEY_FILE, rows_of, verify  # noqa: E402
from controller.audit_cli import ReadOnlyStore  # noqa: E402
from controller.store import Store  # noqa: E402
from tests.bench.bench_setup import machine  # noqa: E402

#: Events written per transaction while filling the store: large batches keep the fill quick.
FILL_BATCH = 10_000
#: The issue's goal for verifying a million events.
GOAL_SECONDS_PER_MILLION = 60.0


def fill(audit: AuditLog, events: int) -> None:
    """A dial's story per connection: requested, allowed, served, closed (realistic field sizes)."""
    written = 0
    while written < events:
        batch = []
        for i in range(written, min(events, written + FILL_BATCH)):
            cid = f"c-{i:016x}"
            batch.append(("dial_closed", {"correlation": cid, "identity": f"default/gw-{i % 5000:05d}",
                                          "service": "default/modbus", "bytes_up": i, "bytes_down": 2 * i,
                                          "closed_by": "dialer", "reason": "ended", "duration_s": 1.5}))
        audit.record_groups([batch])
        written += len(batch)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=1_000_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="audit-verify-") as folder:
        data = Path(folder)
        store = Store(data / "store.sqlite3")
        started = time.perf_counter()
        try:
            fill(AuditLog(store), args.events)
        finally:
            store.close()
        fill_seconds = time.perf_counter() - started
        reader = ReadOnlyStore(data / "store.sqlite3")
        try:
            started = time.perf_counter()
            result = verify(rows_of(reader), (data / KEY_FILE).read_bytes())
            seconds = time.perf_counter() - started
        finally:
            reader.close()
        size = (data / "store.sqlite3").stat().st_size
    if not result.ok or result.checked != args.events:
        print(f"verification failed: {result.summary()}", file=sys.stderr)
        return 1
    per_million = seconds * 1_000_000 / max(1, args.events)
    print(json.dumps({
        "benchmark": "audit_verify",
        "events": args.events,
        "verify_seconds": round(seconds, 2),
        "verify_events_per_second": round(args.events / seconds),
        "verify_seconds_per_million": round(per_million, 2),
        "goal_seconds_per_million": GOAL_SECONDS_PER_MILLION,
        "goal_met": per_million < GOAL_SECONDS_PER_MILLION,
        "fill_seconds": round(fill_seconds, 2),
        "store_mib": round(size / 2**20, 1),
        "machine": machine(),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
