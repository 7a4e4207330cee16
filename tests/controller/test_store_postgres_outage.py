"""PostgreSQL going away: mid-transaction, or stopped and started again.

Each time: a clear refusal (``StoreUnavailable``, 503 ``store_unavailable``
over HTTP), nothing half-written, and the same Store object (the same
running controller) works again once the server is back, without a restart.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

psycopg = pytest.importorskip("psycopg", reason="psycopg is not installed (python3-psycopg)")

from controller.audit import AuditLog  # noqa: E402
from controller.registry import Identity, Registry  # noqa: E402
from controller.store import Store, StoreUnavailable  # noqa: E402
from controller.store_postgres import CONNECT_HOLDOFF_SECONDS, CONNECT_TIMEOUT_SECONDS  # noqa: E402
from controller.watcher import StatusWatcher  # noqa: E402
from tests.controller.harness import TEST_CHAIN_KEY, make_key, run, running_controller  # noqa: E402
from tests.controller.postgres_harness import PostgresServer, own_server, postgres, postgres_url  # noqa: E402, F401

#: The promise for revocation, also once the store is back.
REVOCATION_DEADLINE = 2.0


def test_a_backend_killed_mid_transaction_writes_nothing_and_the_next_transaction_reconnects(postgres_url: str) -> None:
    store = Store(postgres_url)
    try:
        with pytest.raises(StoreUnavailable) as refused:
            with store.transaction() as db:
                db.execute("INSERT INTO meta (key, value) VALUES ('half', 'written')")
                pid = db.query_one("SELECT pg_backend_pid() AS pid")["pid"]  # type: ignore[index]
                with psycopg.connect(postgres_url, autocommit=True) as admin:
                    admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
                db.execute("INSERT INTO meta (key, value) VALUES ('second', 'half')")
        assert refused.value.status == 503 and refused.value.code == "store_unavailable"
        assert "nothing was changed" in str(refused.value) and "\n" not in str(refused.value)
        assert store.query("SELECT key FROM meta WHERE key IN ('half', 'second')") == []
        with store.transaction() as db:
            db.execute("INSERT INTO meta (key, value) VALUES ('after', 'yes')")
        assert store.query_one("SELECT value FROM meta WHERE key = 'after'")["value"] == "yes"  # type: ignore[index]
    finally:
        store.close()


def test_a_stopped_server_is_refused_quickly_and_the_same_store_recovers_when_it_returns(own_server: PostgresServer) -> None:
    url = own_server.create_database()
    store = Store(url)
    try:
        own_server.stop()
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            store.query("SELECT 1")
        with pytest.raises(StoreUnavailable), store.transaction() as db:
            db.execute("INSERT INTO meta (key, value) VALUES ('lost', 'yes')")
        assert time.monotonic() - started < 2 * CONNECT_TIMEOUT_SECONDS
        own_server.start()
        time.sleep(CONNECT_HOLDOFF_SECONDS)  # refused at once for a moment after a failed connection
        with store.transaction() as db:
            db.execute("INSERT INTO meta (key, value) VALUES ('back', 'yes')")
        assert [row["key"] for row in store.query("SELECT key FROM meta WHERE key IN ('lost', 'back')")] == ["back"]
    finally:
        store.close()


def test_revocation_reaches_a_watcher_within_two_seconds_after_the_server_came_back(own_server: PostgresServer) -> None:
    url = own_server.create_database()
    store_a, store_b = Store(url), Store(url)
    registry_a = Registry(store_a, AuditLog(store_a, chain_key=TEST_CHAIN_KEY), "outpost.test")
    registry_b = Registry(store_b, AuditLog(store_b, chain_key=TEST_CHAIN_KEY), "outpost.test")
    with store_a.transaction() as db:
        registry_a.create_identity_in(db, "default", "gw", ())
    heard: list[tuple[float, Identity]] = []
    registry_b.on_revoked(lambda identity: heard.append((time.monotonic(), identity)))

    async def scenario() -> float:
        task = asyncio.get_running_loop().create_task(StatusWatcher(store_b, registry_b).run())
        try:
            await asyncio.sleep(0.5)  # listening
            await asyncio.to_thread(own_server.stop)
            await asyncio.sleep(1.5)  # the watcher fails to poll and to listen, and keeps trying
            await asyncio.to_thread(own_server.start)
            await asyncio.sleep(1.5)  # one retry to listen again
            revoked_at = time.monotonic()
            await asyncio.to_thread(registry_a.revoke, "default", "gw")
            while not heard and time.monotonic() - revoked_at < REVOCATION_DEADLINE + 3:
                await asyncio.sleep(0.02)
            return revoked_at
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    try:
        revoked_at = run(scenario())
        assert [identity.status for _, identity in heard] == ["revoked"]
        assert heard[0][0] - revoked_at < REVOCATION_DEADLINE
    finally:
        store_a.close()
        store_b.close()


def test_enrollment_while_the_store_is_down_is_refused_with_503_and_works_once_it_is_back(
    own_server: PostgresServer, tmp_path: Path
) -> None:
    url = own_server.create_database()

    async def scenario() -> None:
        async with running_controller(tmp_path / "controller", store_url=url) as running:
            token = (await running.create_identity("gw"))["token"]
            await asyncio.to_thread(own_server.stop)
            status, body = await running.enroll(token, make_key())
            assert status == 503 and body["error"] == "store_unavailable", body
            assert "Retry in a few seconds" in body["message"]
            await asyncio.to_thread(own_server.start)
            await asyncio.sleep(CONNECT_HOLDOFF_SECONDS)
            status, body = await running.enroll(token, make_key())
            assert status == 200, body
            certificates = running.context.store.query("SELECT count(*) AS n FROM certificates WHERE name = 'gw'")
            assert certificates[0]["n"] == 1

    run(scenario())


def test_after_a_failed_connection_requests_are_refused_at_once_for_a_moment_then_tried_again(
    own_server: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = own_server.create_database()
    store = Store(url)
    attempts: list[float] = []
    real_connect = psycopg.connect

    def counted(*args: object, **kwargs: object) -> object:
        attempts.append(time.monotonic())
        return real_connect(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(psycopg, "connect", counted)
    try:
        own_server.stop()
        for _ in range(50):  # a flood of requests while the server is away: one attempt to connect
            with pytest.raises(StoreUnavailable):
                store.query("SELECT 1")
        assert len(attempts) == 1
        own_server.start()
        time.sleep(CONNECT_HOLDOFF_SECONDS)
        assert store.query_one("SELECT 1 AS one")["one"] == 1  # type: ignore[index]
        assert len(attempts) == 2
    finally:
        store.close()
