"""A relay stop's audit rows: one transaction of ``tunnel_closed`` rows, alone and beside a busy thread.

A relay stopping under N tunnels queues N ``tunnel_closed`` rows (each with
its tunnel's correlation id) and writes them in one transaction in a worker
thread (controller/relay/records.py, ``QueuedAudit.held``) while the event
loop goes on closing tunnels; the stop waits for that write before the
process ends. Here the same ``AuditLog.record_many`` writes ``--rows`` such
rows into a fresh SQLite store (``synchronous=FULL``, as the controller runs
it), once with nothing else running in the process and once beside a thread
that runs Python without pause, as the stopping event loop does. Every time
the writer lets go of the interpreter lock (a system call), it waits for the
busy thread to hand it back, so what the write does per row shows far more
beside the busy thread than alone. Rounds alternate; medians are reported.
Last line: JSON.

    .venv/bin/python tests/bench/audit_write.py [--rows 10000] [--rounds 5]
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from controller.audit import AuditLog  # noqa: E402
from controller.correlation import TUNNEL, new_id  # noqa: E402
from controller.store import Store  # noqa: E402
from tests.bench.bench_setup import emit, int_arg, machine  # noqa: E402

#: A stop of fleet_scale's default fleet.
DEFAULT_ROWS = 10000
#: Five rounds: a median one descheduled round does not move, in well under a minute.
DEFAULT_ROUNDS = 5
#: The busy thread gives up after this long whatever happens, so a failed round cannot leave it spinning.
BUSY_LIMIT = 120.0


def rows(count: int) -> list[tuple[str, dict[str, object]]]:
    """What a stop queues: one ``tunnel_closed`` per tunnel, as RelaySession.on_closed records it."""
    return [("tunnel_closed", {"identity": f"default/gw-{n}", "reason": "relay shutting down",
                               "correlation": new_id(TUNNEL), "closed_by": "relay", "relay": "relay-a",
                               "bytes_in": 4096, "bytes_out": 2048, "duration_s": 600.0})
            for n in range(count)]


def spin(stop: threading.Event) -> None:
    """Pure Python until told to stop: an event loop closing tunnels never waits."""
    deadline = time.monotonic() + BUSY_LIMIT
    total = 0
    while not stop.is_set() and time.monotonic() < deadline:
        for n in range(1000):
            total += n


def write_once(directory: Path, count: int, busy: bool) -> float:
    store = Store(directory / "store.sqlite3")
    try:
        audit = AuditLog(store)
        batch = rows(count)
        stop = threading.Event()
        spinner = threading.Thread(target=spin, args=(stop,), daemon=True) if busy else None
        if spinner is not None:
            spinner.start()
        try:
            started = time.perf_counter()
            written = audit.record_many(batch)
            took = time.perf_counter() - started
        finally:
            stop.set()
            if spinner is not None:
                spinner.join(BUSY_LIMIT)
        if written != count:
            raise SystemExit(f"wrote {written} of {count} rows")
        return took
    finally:
        store.close()


def main() -> None:
    count = int_arg("rows", DEFAULT_ROWS)
    rounds = int_arg("rounds", DEFAULT_ROUNDS)
    alone: list[float] = []
    beside: list[float] = []
    with tempfile.TemporaryDirectory(prefix="outpost-audit-write-") as temp:
        for n in range(rounds):
            for busy, results in ((False, alone), (True, beside)):
                directory = Path(temp) / f"{n}-{busy}"
                directory.mkdir()
                results.append(write_once(directory, count, busy))
    emit({
        "benchmark": "audit_write",
        "machine": machine(),
        "rows": count,
        "rounds": rounds,
        "alone_s": round(statistics.median(alone), 3),
        "beside_busy_thread_s": round(statistics.median(beside), 3),
        "alone_us_per_row": round(statistics.median(alone) / count * 1e6, 1),
        "beside_busy_thread_us_per_row": round(statistics.median(beside) / count * 1e6, 1),
        "alone_all_s": [round(t, 3) for t in alone],
        "beside_busy_thread_all_s": [round(t, 3) for t in beside],
    })


if __name__ == "__main__":
    main()
