"""The relay's queued audit rows: written in order, many per transaction, without the caller's scope."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from controller.audit import AuditLog
from controller.audit_chain import rows_of, verify
from controller.blocking import WorkerPool
from controller.correlation import audit_scope
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
