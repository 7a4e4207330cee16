"""People sign in through a real identity provider: device flow, roles from groups, sessions, logout."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from controller.signin.people import ENDED_SESSION_KEPT, SESSION_PREFIX
from tests.controller.harness import audit_events_added, run, running_controller, store_snapshot
from tests.oidc.harness import IdP
from tests.oidc.signin_harness import call, device_sign_in, signin_settings


def test_a_person_signs_in_with_the_device_flow_and_gets_the_roles_of_their_groups(idp: IdP, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl", signin=signin_settings(idp)) as running:
            answer = await device_sign_in(running, idp, "alice")
            assert answer["session"].startswith(SESSION_PREFIX)
            assert (answer["identity"], answer["grants"]) == ("default/alice", ["admin"])
            assert answer["message"] == "Signed in as default/alice with admin."
            # The session is kept hashed: the bearer is nowhere in the store.
            snapshot = store_snapshot(running.context.settings.store_path)
            assert answer["session"] not in repr(snapshot)
            status, me = await call(running, "GET", "/api/v1/signin/whoami", bearer=answer["session"])
            assert (status, me["identity"], me["kind"]) == (200, "default/alice", "person")
            status, service = await call(running, "POST", "/api/v1/services", {"name": "modbus"},
                                         bearer=answer["session"])
            assert status == 201, service
            status, alice = await call(running, "GET", "/api/v1/identities/alice", bearer=answer["session"])
            assert (status, alice["roles"]) == (200, ["admin"])
            assert (await call(running, "GET", "/api/v1/no-such-thing", bearer=answer["session"]))[0] == 404
            assert (await call(running, "DELETE", "/api/v1/services", bearer=answer["session"]))[0] == 405
            signin = [e for e in running.context.audit.recent() if e["event"] == "signin"]
            assert len(signin) == 1 and signin[0]["fields"]["identity"] == "default/alice"
            assert signin[0]["fields"]["grants"] == ["admin"] and signin[0]["fields"]["provider"] == "test"
            # Signing in again is the same person, not a second identity.
            again = await device_sign_in(running, idp, "alice")
            assert again["identity"] == "default/alice" and again["session"] != answer["session"]

    run(scenario())


def test_an_operator_reads_but_is_told_which_role_a_change_needs(idp: IdP, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl", signin=signin_settings(idp)) as running:
            session = (await device_sign_in(running, idp, "oscar"))["session"]
            status, listed = await call(running, "GET", "/api/v1/identities", bearer=session)
            assert status == 200 and {i["name"] for i in listed["identities"]} >= {"operator", "oscar"}
            assert (await call(running, "GET", "/api/v1/audit", bearer=session))[0] == 200
            before = store_snapshot(running.context.settings.store_path)
            status, refused = await call(running, "POST", "/api/v1/services", {"name": "modbus"}, bearer=session)
            assert (status, refused["error"]) == (403, "role_required")
            assert refused["message"] == "Creating a service needs the admin role; you have operator."
            added = audit_events_added(before, store_snapshot(running.context.settings.store_path))
            assert [e for e, _ in added] == ["management_refused"]
            assert added[0][1]["identity"] == "default/oscar" and added[0][1]["needs"] == "admin"

    run(scenario())


def test_a_person_with_no_mapped_group_is_signed_in_allowed_nothing_and_told_why(idp: IdP, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl", signin=signin_settings(idp)) as running:
            answer = await device_sign_in(running, idp, "nora")
            assert answer["grants"] == []
            assert "none of your groups (marketing) is mapped to a role" in answer["message"]
            before = store_snapshot(running.context.settings.store_path)
            status, refused = await call(running, "GET", "/api/v1/identities", bearer=answer["session"])
            assert status == 403
            assert refused["message"] == ("Listing identities needs the auditor role; you have no role (none of "
                                          "your groups is mapped to one in [signin.roles]).")
            added = audit_events_added(before, store_snapshot(running.context.settings.store_path))
            assert [e for e, _ in added] == ["management_refused"]

    run(scenario())


def test_logout_ends_the_session_on_the_controller(idp: IdP, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl", signin=signin_settings(idp)) as running:
            session = (await device_sign_in(running, idp, "audrey"))["session"]
            status, out = await call(running, "POST", "/api/v1/signin/logout", bearer=session)
            assert (status, out["signed_out"]) == (200, "default/audrey")
            before = store_snapshot(running.context.settings.store_path)
            status, refused = await call(running, "GET", "/api/v1/identities", bearer=session)
            assert (status, refused["error"]) == (401, "session_ended")
            assert refused["message"] == "You signed out of this session; sign in again with outpostctl login."
            added = audit_events_added(before, store_snapshot(running.context.settings.store_path))
            assert [(e, f["reason"]) for e, f in added] == [("signin_refused", "session_ended")]
            assert any(e["event"] == "signout" for e in running.context.audit.recent())

    run(scenario())


def test_an_expired_session_is_refused_with_one_sentence_and_one_audit_row(idp: IdP, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl", signin=signin_settings(idp, session_lifetime=1)) as running:
            session = (await device_sign_in(running, idp, "oscar"))["session"]
            await asyncio.sleep(1.2)
            before = store_snapshot(running.context.settings.store_path)
            status, refused = await call(running, "GET", "/api/v1/identities", bearer=session)
            assert (status, refused["error"]) == (401, "session_expired")
            assert refused["message"] == "Your session has expired; sign in again with outpostctl login."
            added = audit_events_added(before, store_snapshot(running.context.settings.store_path))
            assert [(e, f["reason"]) for e, f in added] == [("signin_refused", "session_expired")]

    run(scenario())


def test_sessions_long_over_are_forgotten_at_a_later_sign_in(idp: IdP, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl", signin=signin_settings(idp)) as running:
            await device_sign_in(running, idp, "oscar")
            store = running.context.store
            with store.transaction() as db:
                db.execute("UPDATE person_sessions SET expires_at = ?", (time.time() - ENDED_SESSION_KEPT - 1,))
            await device_sign_in(running, idp, "oscar")
            assert len(store.query("SELECT 1 FROM person_sessions")) == 1

    run(scenario())
