"""Decisions per second with ``--policies`` policies, and what counting them costs the store.

A real SQLite store in a temporary directory, the controller's own policy
engine: ``--decisions`` dial decisions of one identity and one service
(half allowed, by the last policy; half of a service no policy opens), then
one flush of the decision counters. Reports decisions per second, the store
commits the decisions made (expected 0: counts stay in memory), and the
commits and seconds of the flush. Last line: JSON.

    .venv/bin/python tests/bench/policy_decisions.py [--policies 200] [--decisions 5000]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from controller.audit import AuditLog  # noqa: E402
from controller.policy import PolicyEngine  # noqa: E402
from controller.registry import Registry  # noqa: E402
from controller.store import Store  # noqa: E402
from tests.bench.bench_setup import emit, int_arg, machine  # noqa: E402

#: A fleet's policy count in the hundreds: roles keep it small; grants add some.
DEFAULT_POLICIES = 200
#: Enough decisions that a run lasts a second or more.
DEFAULT_DECISIONS = 5000


def main() -> None:
    policies, decisions = int_arg("policies", DEFAULT_POLICIES), int_arg("decisions", DEFAULT_DECISIONS)
    with tempfile.TemporaryDirectory() as folder:
        store = Store(Path(folder) / "store.sqlite3")
        audit = AuditLog(store)
        registry = Registry(store, audit, "outpost.local")
        with store.transaction() as db:
            ops = registry.create_identity_in(db, "default", "ops", ("operator",))
        open_service = registry.create_service("default", "modbus", ())
        closed_service = registry.create_service("default", "historian", ())
        engine = PolicyEngine(store, audit)
        for n in range(policies - 1):
            engine.create("dial", "default", [f"someone-{n}"], ["modbus"])
        engine.create("dial", "default", ["ops"], ["modbus"])
        commits = store.commits
        started = time.perf_counter()
        for n in range(decisions):
            engine.decide("dial", ops, open_service if n % 2 == 0 else closed_service)
        seconds = time.perf_counter() - started
        decided_commits = store.commits - commits
        started = time.perf_counter()
        flushed = engine.counters.flush()
        flush_seconds = time.perf_counter() - started
        counted = next(p for p in engine.list() if p.decisions)
        store.close()
    emit({"benchmark": "policy_decisions", "machine": machine(), "policies": policies, "decisions": decisions,
          "decisions_per_s": round(decisions / seconds, 1), "store_commits_while_deciding": decided_commits,
          "flush_policies": flushed, "flush_commits": 1, "flush_ms": round(flush_seconds * 1000, 2),
          "counted": counted.decisions})


if __name__ == "__main__":
    main()
