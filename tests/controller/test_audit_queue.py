"""The relay's queued audit rows: written in order, many per transaction, without the caller's scope."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from controller.audit import AuditLog
from controller.audit_chain import rows_of, verify
from controller.blocking import WorkerPool
from controller.correlation import audit_scope
from controller.relay import records
from controller.relay.records import MAX_ROWS_PER_TRANSACTION, QueuedAudit
from controller.store import Store

ROWS = 1_200


def test_queued_rows_keep_their_order_share_commits_and_carry_no_callers_scope(tmp_path: Path) -> None:
    store = Store(tmp_path / "store.sqlite3")
    pool = WorkerPool(2, "test-audit-queue")
    try:
        audit = AuditLog(store)
        queue = QueuedAudit(audit, pool)

        async def scenario() -> None:
            with audit_scope(actor="admin", remote="192.0.2.7"):
                for i in range(ROWS):
                    queue.put("dial_closed", {"correlation": f"c-{i:04x}", "identity": "default/gw", "bytes_up": i})
            await queue.drained()

        commits = store.commits
        asyncio.run(asyncio.wait_for(scenario(), 60))
        written = [json.loads(row["fields"]) for row in store.query("SELECT fields FROM audit ORDER BY id")]
        assert [f["bytes_up"] for f in written] == list(range(ROWS))
        assert not any("actor" in f or "remote" in f for f in written)
        # At least ROWS / MAX_ROWS_PER_TRANSACTION commits, far fewer than one a row.
        assert ROWS // MAX_ROWS_PER_TRANSACTION <= store.commits - commits < ROWS // 10
        assert verify(rows_of(store), audit.chain_key).ok
    finally:
        pool.executor().shutdown()
        store.close()


#: A linger long enough that a loaded machine cannot stretch a loop turn past it: the test is about
#: which rows share a commit, not about how fast one is written.
TEST_LINGER = 1.0


def test_rows_arriving_just_after_a_commit_share_the_next_one_and_a_lone_row_is_written_at_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(records, "BATCH_LINGER", TEST_LINGER)
    store = Store(tmp_path / "store.sqlite3")
    pool = WorkerPool(2, "test-audit-queue")
    try:
        audit = AuditLog(store)
        queue = QueuedAudit(audit, pool)
        submits: list[object] = []
        real_submit = pool.submit

        def submit(function, *args, **kwargs):  # type: ignore[no-untyped-def]
            submits.append(function)
            return real_submit(function, *args, **kwargs)

        pool.submit = submit  # type: ignore[method-assign]

        async def scenario() -> None:
            # Nothing written for longer than the linger: the first row goes to a worker at once.
            first = queue.put_and_wait("tunnel_connected", {"correlation": "t-first"})
            assert len(submits) == 1
            await asyncio.wrap_future(first)
            await queue.drained()
            # Just after that commit, as admissions of a reconnecting fleet arrive: the next row waits for
            # neighbours, and the rows queued meanwhile share one commit.
            commits = store.commits
            trickled = [queue.put_and_wait("tunnel_connected", {"correlation": "t-0000"})]
            assert len(submits) == 1  # not at once: lingering
            for i in range(1, 10):
                await asyncio.sleep(0)
                trickled.append(queue.put_and_wait("tunnel_connected", {"correlation": f"t-{i:04x}"}))
            await asyncio.gather(*(asyncio.wrap_future(w) for w in trickled))
            assert len(submits) == 2
            assert store.commits - commits == 1
            # Quiet for longer than the linger: a lone row is written at once again.
            await queue.drained()
            await asyncio.sleep(TEST_LINGER * 1.5)
            lone = queue.put_and_wait("tunnel_connected", {"correlation": "t-lone"})
            assert len(submits) == 3
            await asyncio.wrap_future(lone)

        asyncio.run(asyncio.wait_for(scenario(), 60))
        assert store.query_one("SELECT COUNT(*) AS n FROM audit")["n"] == 12
    finally:
        pool.executor().shutdown()
        store.close()


def test_rows_queued_while_held_wait_for_its_end_and_are_then_written_in_order_in_one_commit(tmp_path: Path) -> None:
    """A stop holds the queue while it closes every tunnel: no worker writes beside the event loop
    meanwhile, and the rows of all its tunnels then share one commit (one fsync, not one per 500)."""
    store = Store(tmp_path / "store.sqlite3")
    pool = WorkerPool(2, "test-audit-queue")
    try:
        audit = AuditLog(store)
        queue = QueuedAudit(audit, pool)
        count = "SELECT COUNT(*) AS n FROM audit"

        async def scenario() -> int:
            # A drain under way when the hold begins takes no further batch.
            for i in range(ROWS):
                queue.put("tunnel_closed", {"correlation": f"t-{i:04x}", "identity": "default/gw", "bytes_in": i})
            with queue.held():
                await asyncio.sleep(0.5)  # time for a worker that ignored the hold to write everything
                written_during = store.query_one(count)["n"]
                for i in range(ROWS, 2 * ROWS):
                    queue.put("tunnel_closed", {"correlation": f"t-{i:04x}", "identity": "default/gw", "bytes_in": i})
                await asyncio.sleep(0.5)
                assert store.query_one(count)["n"] == written_during
                commits = store.commits
            assert written_during <= MAX_ROWS_PER_TRANSACTION  # at most the batch that had begun
            await queue.drained()
            return store.commits - commits

        assert asyncio.run(asyncio.wait_for(scenario(), 60)) == 1
        written = [json.loads(row["fields"]) for row in store.query("SELECT fields FROM audit ORDER BY id")]
        assert [f["bytes_in"] for f in written] == list(range(2 * ROWS))
        assert verify(rows_of(store), audit.chain_key).ok
    finally:
        pool.executor().shutdown()
        store.close()
