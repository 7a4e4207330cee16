"""One identity, one key: re-enrollment retires the old token and key; a new token retires older ones.

What a replaced or stolen device still holds (its token, its key) must not
take the identity back, and every refusal changes nothing but one audit row.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import jwt
import pytest

from controller.bootstrap import open_data_dir
from controller.ca import public_key_sha256
from controller.errors import ControllerError
from controller.settings import Settings
from tests.controller.harness import (
    Running,
    audit_events_added,
    make_csr,
    make_key,
    run,
    running_controller,
    store_snapshot,
    token_parts,
)


def refusal(code: str, identity: str | None = "default/gw") -> tuple[str, dict]:
    fields = {"reason": code, "remote": "127.0.0.1"}
    if identity is not None:
        fields["identity"] = identity
    return ("enrollment_refused", fields)


async def new_token(running: Running, name: str = "gw") -> str:
    status, body = await running.call("POST", f"/api/v1/identities/{name}/token", {})
    assert status == 201, body
    return body["token"]


def current_key(running: Running, name: str = "gw") -> str | None:
    return running.context.registry.get_identity("default", name).key_sha256


def sha(key: Any) -> str:
    return public_key_sha256(key.public_key())


def snapshot(running: Running) -> dict:
    return store_snapshot(running.context.settings.store_path)


def test_the_old_token_replayed_with_the_old_key_after_re_enrollment_is_refused_and_changes_nothing(
    data_dir: Path,
) -> None:
    async def scenario() -> None:
        async with running_controller(data_dir) as running:
            old_token = (await running.create_identity("gw"))["token"]
            old_key, new_key = make_key(), make_key()
            assert (await running.enroll(old_token, old_key))[0] == 200
            assert (await running.enroll(await new_token(running), new_key))[0] == 200
            assert current_key(running) == sha(new_key)

            before = snapshot(running)
            status, body = await running.enroll(old_token, old_key)
            assert (status, body["error"]) == (409, "token_used"), body
            assert "enrolled again with a newer token" in body["message"]
            assert audit_events_added(before, snapshot(running)) == [refusal("token_used")]
            assert current_key(running) == sha(new_key)
            # The new device is not locked out: its key still renews.
            status, body = await running.call("POST", "/v1/renew", {"csr": make_csr(new_key)}, admin=False)
            assert status == 200, body

    run(scenario())


def test_a_new_token_invalidates_every_older_unredeemed_token_of_the_identity(data_dir: Path) -> None:
    async def scenario() -> None:
        async with running_controller(data_dir) as running:
            first = (await running.create_identity("gw"))["token"]
            second = await new_token(running)
            third = await new_token(running)
            created = [e["fields"] for e in running.context.audit.recent() if e["event"] == "token_created"]
            assert [fields["superseded"] for fields in created] == [0, 1, 1]
            for stale in (first, second):
                before = snapshot(running)
                status, body = await running.enroll(stale, make_key())
                assert (status, body["error"]) == (403, "token_superseded"), body
                assert "a newer token was issued for this identity; use that one" in body["message"]
                assert audit_events_added(before, snapshot(running)) == [refusal("token_superseded")]
            assert running.context.registry.get_identity("default", "gw").status == "created"
            key = make_key()
            assert (await running.enroll(third, key))[0] == 200
            assert current_key(running) == sha(key)

    run(scenario())


def test_a_retry_of_a_redeemed_token_is_refused_once_a_later_token_was_redeemed_even_with_the_same_key(
    data_dir: Path,
) -> None:
    async def scenario() -> None:
        async with running_controller(data_dir) as running:
            first = (await running.create_identity("gw"))["token"]
            key = make_key()
            assert (await running.enroll(first, key))[0] == 200
            assert (await running.enroll(first, key))[0] == 200  # the crash retry: still allowed
            second = await new_token(running)
            assert (await running.enroll(first, key))[0] == 200  # a token only issued is not yet a re-enrollment
            assert (await running.enroll(second, key))[0] == 200
            before = snapshot(running)
            status, body = await running.enroll(first, key)
            assert (status, body["error"]) == (409, "token_used"), body
            assert audit_events_added(before, snapshot(running)) == [refusal("token_used")]
            assert (await running.enroll(second, key))[0] == 200  # the newest token's own retry still works

    run(scenario())


def test_a_token_naming_another_controller_as_issuer_is_refused(data_dir: Path) -> None:
    async def scenario() -> None:
        async with running_controller(data_dir) as running:
            token = (await running.create_identity("gw"))["token"]
            _, claims, _ = token_parts(token)
            ca = running.context.ca
            forged = jwt.encode({**claims, "iss": "https://elsewhere.example:8443"}, ca.private_key,
                                algorithm="ES256", headers={"kid": ca.fingerprint})
            before = snapshot(running)
            status, body = await running.enroll(forged, make_key())
            assert (status, body["error"]) == (403, "token_issuer"), body
            assert "https://elsewhere.example:8443" in body["message"] and running.url in body["message"]
            assert audit_events_added(before, snapshot(running)) == [refusal("token_issuer")]
            assert (await running.enroll(token, make_key()))[0] == 200

    run(scenario())


def test_a_token_the_store_says_expired_is_refused_whatever_its_exp_claims(data_dir: Path) -> None:
    async def scenario() -> None:
        async with running_controller(data_dir) as running:
            token = (await running.create_identity("gw"))["token"]
            jti = token_parts(token)[1]["jti"]
            with running.context.store.transaction() as db:
                db.execute("UPDATE tokens SET expires_at = ? WHERE jti = ?", (time.time() - 3600, jti))
            before = snapshot(running)
            status, body = await running.enroll(token, make_key())
            assert (status, body["error"]) == (403, "token_expired"), body
            assert audit_events_added(before, snapshot(running)) == [refusal("token_expired")]

    run(scenario())


def test_the_old_token_replayed_while_the_new_one_is_redeemed_never_takes_the_identity_back(data_dir: Path) -> None:
    async def scenario() -> None:
        async with running_controller(data_dir) as running:
            old_token = (await running.create_identity("gw"))["token"]
            old_key = make_key()
            assert (await running.enroll(old_token, old_key))[0] == 200
            new_key = make_key()
            token = await new_token(running)
            replays = [running.enroll(old_token, old_key) for _ in range(10)]
            results = await asyncio.gather(running.enroll(token, new_key), *replays)
            assert results[0][0] == 200, results[0]
            # A replay served before the new redemption committed re-certified the then current key;
            # every one after it is refused. Either way the new key holds the identity at the end.
            assert {status for status, _ in results[1:]} <= {200, 409}
            assert current_key(running) == sha(new_key)
            assert (await running.enroll(old_token, old_key))[0] == 409
            status, body = await running.call("POST", "/v1/renew", {"csr": make_csr(old_key)}, admin=False)
            assert (status, body["error"]) == (403, "renewal_unknown_key")

    run(scenario())


def test_two_tokens_raced_then_redeemed_at_once_let_exactly_the_newest_enroll(data_dir: Path) -> None:
    async def scenario() -> None:
        async with running_controller(data_dir) as running:
            await running.create_identity("gw")
            tokens = await asyncio.gather(*(new_token(running) for _ in range(4)))
            keys = [make_key() for _ in tokens]
            results = await asyncio.gather(*(running.enroll(t, k) for t, k in zip(tokens, keys, strict=True)))
            codes = sorted("enrolled" if status == 200 else body["error"] for status, body in results)
            assert codes == ["enrolled"] + ["token_superseded"] * 3, results
            winner = next(k for (status, _), k in zip(results, keys, strict=True) if status == 200)
            assert current_key(running) == sha(winner)
            # Exactly one token of the identity is left that enrolls anything.
            live = running.context.store.query(
                "SELECT jti FROM tokens WHERE name = 'gw' AND superseded_at IS NULL")
            assert len(live) == 1

    run(scenario())


def test_new_tokens_and_redemptions_from_separate_processes_leave_one_key(data_dir: Path) -> None:
    # Separate connections to one store file, as several controller processes share it.
    settings = Settings(data_dir=data_dir, listen_port=8443)
    first = open_data_dir(settings)
    with first.store.transaction() as db:
        identity = first.registry.create_identity_in(db, "default", "gw", ())
        old_token, _ = first.tokens.create_in(db, identity, 3600)
    old_csr = make_csr(make_key())
    first.enrollment.enroll(old_token, old_csr)
    contexts = [first] + [open_data_dir(settings) for _ in range(5)]
    barrier = threading.Barrier(len(contexts))
    outcomes: list[str] = []
    lock = threading.Lock()

    def act(index: int, context: Any) -> None:
        barrier.wait(timeout=10)
        try:
            if index % 2:
                context.enrollment.enroll(old_token, old_csr)  # the old device replays
                outcome = "replayed"
            else:
                with context.store.transaction() as db:
                    current = context.registry.get_identity_in(db, "default", "gw")
                    token, _ = context.tokens.create_in(db, current, 3600)
                context.enrollment.enroll(token, make_csr(make_key()))
                outcome = "enrolled"
        except ControllerError as error:
            outcome = error.code
        with lock:
            outcomes.append(outcome)

    threads = [threading.Thread(target=act, args=(i, c)) for i, c in enumerate(contexts)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    try:
        assert len(outcomes) == len(contexts)
        assert set(outcomes) <= {"replayed", "enrolled", "token_used", "token_superseded"}, outcomes
        assert outcomes.count("enrolled") >= 1, outcomes
        with pytest.raises(ControllerError) as refused:
            first.enrollment.enroll(old_token, old_csr)
        assert refused.value.code == "token_used"
        identity_now = first.registry.get_identity("default", "gw")
        last = first.store.query_one(
            "SELECT used_key_sha256 FROM tokens WHERE name = 'gw' AND used_at IS NOT NULL ORDER BY used_at DESC LIMIT 1")
        assert identity_now.key_sha256 == last["used_key_sha256"]
        assert len(first.store.query(
            "SELECT jti FROM tokens WHERE name = 'gw' AND superseded_at IS NULL")) == 1
    finally:
        for context in contexts:
            context.close()


def test_a_token_minted_before_the_controllers_url_changed_still_enrolls(data_dir: Path) -> None:
    # Its record names the URL it was minted under; another process on the store, or a new port, is the same controller.
    async def scenario() -> None:
        async with running_controller(data_dir) as running:
            token = (await running.create_identity("gw"))["token"]
            running.context.tokens.issuer_url = "https://controller.example:443"
            assert (await running.enroll(token, make_key()))[0] == 200
            new = await new_token(running)
            assert token_parts(new)[1]["iss"] == "https://controller.example:443"
            assert (await running.enroll(new, make_key()))[0] == 200

    run(scenario())


def test_the_identity_shows_its_one_current_key(data_dir: Path) -> None:
    async def scenario() -> None:
        async with running_controller(data_dir) as running:
            token = (await running.create_identity("gw"))["token"]
            assert (await running.call("GET", "/api/v1/identities/gw"))[1]["key_sha256"] is None
            key = make_key()
            assert (await running.enroll(token, key))[0] == 200
            assert (await running.call("GET", "/api/v1/identities/gw"))[1]["key_sha256"] == sha(key)
            new_key = make_key()
            assert (await running.enroll(await new_token(running), new_key))[0] == 200
            assert (await running.call("GET", "/api/v1/identities/gw"))[1]["key_sha256"] == sha(new_key)
            enrollments = [e["fields"] for e in running.context.audit.recent() if e["event"] == "enrollment"]
            assert "previous_key_sha256" not in enrollments[0]
            assert enrollments[1]["previous_key_sha256"] == sha(key)

    run(scenario())


#: The tokens table as stores created before tokens could be superseded hold it.
OLD_TOKENS_TABLE = """CREATE TABLE tokens (
    jti TEXT PRIMARY KEY, tenant TEXT NOT NULL, name TEXT NOT NULL, created_at REAL NOT NULL,
    expires_at REAL NOT NULL, used_at REAL, used_key_sha256 TEXT)"""


def test_a_store_from_before_supersession_retires_its_older_unused_tokens_once(tmp_path: Path) -> None:
    import sqlite3

    from controller.store import Store

    path = tmp_path / "store.sqlite3"
    connection = sqlite3.connect(str(path))
    connection.execute(OLD_TOKENS_TABLE)
    rows = [("t1", "gw", None), ("t2", "gw", None), ("t3", "gw", None), ("u1", "other", 5.0), ("u2", "other", None),
            ("v1", "third", 5.0)]
    for jti, name, used in rows:
        connection.execute("INSERT INTO tokens (jti, tenant, name, created_at, expires_at, used_at) "
                           "VALUES (?, 'default', ?, 1, 2e9, ?)", (jti, name, used))
    connection.commit()
    connection.close()
    store = Store(path)
    try:
        state = {row["jti"]: row["superseded_by"] for row in store.query("SELECT jti, superseded_by FROM tokens")}
        # The newest token of each identity still works; an older unused one names the newest; a used one stays.
        assert state == {"t1": "t3", "t2": "t3", "t3": None, "u1": None, "u2": None, "v1": None}
    finally:
        store.close()
    reopened = Store(path)  # the columns exist now: nothing runs again
    try:
        assert reopened.query_one("SELECT superseded_by FROM tokens WHERE jti = 't3'")["superseded_by"] is None
    finally:
        reopened.close()


def test_superseding_and_the_former_holder_lookup_are_indexed(tmp_path: Path) -> None:
    # Both run inside enrollment and renewal transactions, the latter for anyone who sends a CSR.
    from controller.store import Store

    store = Store(tmp_path / "store.sqlite3")
    try:
        plans = {
            "supersede": ("UPDATE tokens SET superseded_at = 1 WHERE tenant = ? AND name = ? AND jti != ? "
                          "AND superseded_at IS NULL", ("default", "gw", "x")),
            "former holder": ("SELECT tenant, name FROM certificates WHERE key_sha256 = ? AND purpose != 'session' "
                              "ORDER BY issued_at DESC LIMIT 1", ("ab",)),
        }
        for what, (sql, parameters) in plans.items():
            detail = " ".join(row["detail"] for row in store.query("EXPLAIN QUERY PLAN " + sql, parameters))
            assert "USING INDEX" in detail, (what, detail)
    finally:
        store.close()
