"""The relay's queued audit rows: written in order, many per transaction, without the caller's scope."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from controller.audit import AuditLog
from controller.audit_chain import rows_of, verify
from controller.blocking import WorkerPool
from controller.correlation import audit_scope
from controller.relay.records import BATCH_LINGER, MAX_ROWS_PER_TRANSACTION, QueuedAudit
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


#: Rows queued one at a time, as admissions of a reconnecting fleet queue their ``tunnel_connected``.
TRICKLED_ROWS = 40


def test_rows_trickling_in_fast_share_commits_and_a_lone_row_is_written_at_once(tmp_path: Path) -> None:
    store = Store(tmp_path / "store.sqlite3")
    pool = WorkerPool(2, "test-audit-queue")
    try:
        audit = AuditLog(store)
        queue = QueuedAudit(audit, pool)

        async def scenario() -> tuple[int, int]:
            before = store.commits
            for i in range(TRICKLED_ROWS):
                written = queue.put_and_wait("tunnel_connected", {"correlation": f"t-{i:04x}", "identity": "d/gw"})
                await asyncio.sleep(0.001)
            await asyncio.wrap_future(written)
            await queue.drained()
            trickled = store.commits - before
            await asyncio.sleep(BATCH_LINGER * 3)  # quiet: the next row is nobody's neighbour
            submitted = len(submits)
            lone = queue.put_and_wait("tunnel_connected", {"correlation": "t-lone"})
            lone_submitted_at_once = len(submits) - submitted
            await asyncio.wrap_future(lone)
            return trickled, lone_submitted_at_once

        submits: list[object] = []
        real_submit = pool.submit

        def submit(function, *args, **kwargs):  # type: ignore[no-untyped-def]
            submits.append(function)
            return real_submit(function, *args, **kwargs)

        pool.submit = submit  # type: ignore[method-assign]
        trickled, lone_submitted_at_once = asyncio.run(asyncio.wait_for(scenario(), 60))
        assert trickled <= TRICKLED_ROWS // 4, trickled
        assert lone_submitted_at_once == 1  # written at once: no wait for neighbours that are not coming
        assert store.query_one("SELECT COUNT(*) AS n FROM audit")["n"] == TRICKLED_ROWS + 1
    finally:
        pool.executor().shutdown()
        store.close()
