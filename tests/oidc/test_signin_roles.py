"""Tenant-scoped admins, and the admin credential as break-glass."""

from __future__ import annotations

import dataclasses
import datetime
from pathlib import Path

import pytest
from cryptography import x509

from controller.ca import not_after_of, not_before_of
from tests.controller.harness import audit_events_added, make_csr, make_key, run, running_controller, store_snapshot
from tests.oidc.harness import IdP
from tests.oidc.signin_harness import call, device_sign_in, signin_settings


def test_a_tenant_admin_sees_and_changes_only_their_tenant(idp: IdP, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl", signin=signin_settings(idp)) as running:
            session = (await device_sign_in(running, idp, "tina"))["session"]
            status, made = await call(running, "POST", "/api/v1/identities", {"name": "gw-a1", "tenant": "acme"},
                                      bearer=session)
            assert status == 201, made
            status, listed = await call(running, "GET", "/api/v1/identities", bearer=session)
            assert status == 200 and [i["name"] for i in listed["identities"]] == ["gw-a1"]
            refusals = [
                ("GET", "/api/v1/identities/operator?tenant=default", None,
                 "Reading an identity needs the auditor role in tenant default; you have admin:acme."),
                ("GET", "/api/v1/identities/operator", None,
                 "Reading an identity needs the auditor role in tenant default; you have admin:acme."),
                ("POST", "/api/v1/identities/operator/revoke", None,
                 "Revoking an identity needs the admin role in tenant default; you have admin:acme."),
                ("POST", "/api/v1/identities", {"name": "gw-x"},
                 "Creating an identity needs the admin role in tenant default; you have admin:acme."),
                ("GET", "/api/v1/audit", None, "Reading the audit log needs the auditor role; you have admin:acme."),
            ]
            for method, path, body, sentence in refusals:
                before = store_snapshot(running.context.settings.store_path)
                status, refused = await call(running, method, path, body, bearer=session)
                assert (status, refused["message"]) == (403, sentence), (path, refused)
                added = audit_events_added(before, store_snapshot(running.context.settings.store_path))
                assert [e for e, _ in added] == ["management_refused"], path

    run(scenario())


def test_the_admin_credential_cannot_act_as_a_person(idp: IdP, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl", signin=signin_settings(idp)) as running:
            oscar = (await device_sign_in(running, idp, "oscar"))["session"]
            csr = make_csr(make_key())
            before = store_snapshot(running.context.settings.store_path)
            status, refused = await running.call("POST", "/api/v1/identities/oscar/session", {"csr": csr})
            assert (status, refused["error"]) == (403, "admin_as_person")
            assert store_snapshot(running.context.settings.store_path) == before
            # Nor may one person act as another, or as the shared operator identity.
            for other in ("alice", "operator"):
                status, refused = await call(running, "POST", f"/api/v1/identities/{other}/session", {"csr": csr},
                                             bearer=oscar)
                assert status in (403, 404), refused
            # The person may, as themselves.
            status, issued = await call(running, "POST", "/api/v1/identities/oscar/session", {"csr": csr},
                                        bearer=oscar)
            assert (status, issued["name"]) == (201, "oscar"), issued
            certificate = x509.load_pem_x509_certificate(issued["certificate"].encode())
            assert not_after_of(certificate) - not_before_of(certificate) <= datetime.timedelta(hours=1, minutes=5)
            assert issued["identity"].endswith("/default/oscar")


def test_a_person_cannot_act_as_a_namesake_in_another_tenant(idp: IdP, tmp_path: Path) -> None:
    async def scenario() -> None:
        base = signin_settings(idp)
        acme = dataclasses.replace(base.providers[0], name="acme-idp", tenant="acme")
        settings = dataclasses.replace(base, providers=(base.providers[0], acme))
        async with running_controller(tmp_path / "ctl", signin=settings) as running:
            oscar = (await device_sign_in(running, idp, "oscar"))["session"]
            answer = await device_sign_in(running, idp, "oscar", provider="acme-idp")
            assert answer["identity"] == "acme/oscar"
            before = store_snapshot(running.context.settings.store_path)
            status, refused = await call(running, "POST", "/api/v1/identities/oscar/session?tenant=acme",
                                         {"csr": make_csr(make_key())}, bearer=oscar)
            assert (status, refused["error"]) == (403, "not_yourself"), refused
            assert store_snapshot(running.context.settings.store_path) == before

    run(scenario())


def test_revoking_a_person_ends_their_sessions_at_once(idp: IdP, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl", signin=signin_settings(idp)) as running:
            session = (await device_sign_in(running, idp, "oscar"))["session"]
            status, _ = await running.call("POST", "/api/v1/identities/oscar/revoke")
            assert status == 200
            status, refused = await call(running, "GET", "/api/v1/identities", bearer=session)
            assert (status, refused["error"]) == (401, "session_blocked"), refused
            # Nor can they sign in again while revoked.
            with pytest.raises(AssertionError, match="person_blocked"):
                await device_sign_in(running, idp, "oscar")

    run(scenario())


def test_the_admin_credential_can_be_turned_off(idp: IdP, tmp_path: Path) -> None:
    async def scenario() -> None:
        settings = signin_settings(idp, admin_credential=False)
        async with running_controller(tmp_path / "ctl", signin=settings) as running:
            before = store_snapshot(running.context.settings.store_path)
            status, refused = await running.call("GET", "/api/v1/identities")
            assert (status, refused["error"]) == (401, "admin_credential_off")
            added = audit_events_added(before, store_snapshot(running.context.settings.store_path))
            assert [e for e, _ in added] == ["admin_credential_refused"]
            session = (await device_sign_in(running, idp, "alice"))["session"]
            assert (await call(running, "GET", "/api/v1/identities", bearer=session))[0] == 200

    run(scenario())
