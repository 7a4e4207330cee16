"""The management API: admin credential, identities, services, sessions, revocation, body limits."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from aiohttp import web
from cryptography import x509

from controller.api import MAX_REQUEST_BODY
from controller.ca import not_after_of, not_before_of
from controller.enrollment import is_session_certificate
from controller.registry import Identity
from controller.routes import API_PREFIX
from controller.signin.api import OPEN_ROUTES
from tests.controller.harness import make_csr, make_key, run, running_controller, store_snapshot

#: A path under /api/ that no handler serves: the credential is checked before routing.
UNROUTED_API_PATH = "/api/v1/no-such-thing"
#: The management API as the issue and docs/api.md name it; the router must hold at least these.
DOCUMENTED_API_ROUTES = {
    ("POST", "/api/v1/identities"), ("GET", "/api/v1/identities"), ("GET", "/api/v1/identities/{name}"),
    ("POST", "/api/v1/identities/{name}/token"), ("POST", "/api/v1/identities/{name}/revoke"),
    ("POST", "/api/v1/identities/{name}/session"), ("POST", "/api/v1/services"), ("POST", "/api/v1/policies"),
    ("GET", "/api/v1/audit"), ("GET", "/api/v1/status"),
}


def api_routes(app: web.Application) -> list[tuple[str, str]]:
    """(method, path template) of every route the served application has under /api/."""
    routes = {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.resource is not None and route.resource.canonical.startswith(API_PREFIX)
    }
    return sorted(routes)


def concrete(template: str) -> str:
    """A path for a template: every ``{variable}`` becomes an identity that exists (``operator``)."""
    return re.sub(r"\{[^}]+\}", "operator", template)


@pytest.mark.parametrize("credential", [None, "Bearer wrong", "Basic abc", "Bearer ", "bearer {token}", "{token}"])
def test_every_route_under_api_answers_401_without_the_admin_token(data_dir: Path, credential: str | None) -> None:
    async def scenario() -> None:
        async with running_controller(data_dir) as running:
            routes = api_routes(running.server.app)
            assert DOCUMENTED_API_ROUTES <= set(routes), "the management API is not mounted as documented"
            before = store_snapshot(running.context.settings.store_path)
            headers = {"Authorization": credential.format(token=running.admin_token)} if credential else {}
            for method, template in routes + [("GET", UNROUTED_API_PATH), ("DELETE", "/api/v1/identities")]:
                if template in OPEN_ROUTES:
                    continue  # starting a sign-in needs no credential: it is how a person gets one
                path = concrete(template)
                async with running.session.request(
                    method, running.url + path, json={"name": "x", "csr": "x"}, headers=headers
                ) as response:
                    assert response.status == 401, (method, path)
                    if method != "HEAD":  # a HEAD answer has no body
                        body = await response.json()
                        assert body["error"] == "unauthorized" and "admin token" in body["message"]
            assert store_snapshot(running.context.settings.store_path) == before

    run(scenario())


def test_every_route_under_api_answers_with_the_admin_token(data_dir: Path) -> None:
    """The other half: the routes listed above are live, so their 401s came from the credential check."""

    async def scenario() -> None:
        async with running_controller(data_dir) as running:
            # A relay named as concrete() names things, so /api/v1/relays/{name}/... finds one.
            status, _ = await running.call("POST", "/api/v1/relays", {"name": "operator", "address": "127.0.0.1:9"})
            assert status == 201
            for method, template in api_routes(running.server.app):
                async with running.session.request(
                    method, running.url + concrete(template), json={}, headers=running.admin
                ) as response:
                    assert response.status not in (401, 404, 405), (method, template, response.status)

    run(scenario())


def test_creating_an_identity_returns_it_with_a_token_and_a_duplicate_is_409(data_dir: Path) -> None:
    async def scenario() -> None:
        async with running_controller(data_dir) as running:
            created = await running.create_identity("gw-1", roles=["plc", "plc", "edge"])
            assert created["identity"]["roles"] == ["edge", "plc"]
            assert created["identity"]["status"] == "created"
            assert created["identity"]["uri"] == "spiffe://outpost.local/default/gw-1"
            assert created["token"].count(".") == 2 and created["token_expires"] > 0
            status, body = await running.call("POST", "/api/v1/identities", {"name": "gw-1"})
            assert status == 409 and body["error"] == "identity_exists"
            assert "already exists" in body["message"]
            status, listed = await running.call("GET", "/api/v1/identities")
            assert [i["name"] for i in listed["identities"]] == ["gw-1", "operator"]
            status, one = await running.call("GET", "/api/v1/identities/gw-1")
            assert status == 200 and one["name"] == "gw-1"
            status, missing = await running.call("GET", "/api/v1/identities/nope")
            assert status == 404 and missing["error"] == "identity_unknown"

    run(scenario())


@pytest.mark.parametrize(
    "body",
    [
        {"name": "Upper"},
        {"name": "-lead"},
        {"name": "a" * 64},
        {"name": "ok", "tenant": "bad tenant"},
        {"name": "ok", "roles": ["Role"]},
        {"name": "ok", "roles": "plc"},
        {},
    ],
)
def test_invalid_names_are_refused_with_the_rule_and_create_nothing(data_dir: Path, body: dict) -> None:
    async def scenario() -> None:
        async with running_controller(data_dir) as running:
            before = store_snapshot(running.context.settings.store_path)
            status, answer = await running.call("POST", "/api/v1/identities", body)
            assert status == 400
            assert answer["error"] in ("invalid_name", "invalid_roles")
            assert store_snapshot(running.context.settings.store_path) == before

    run(scenario())


def test_a_body_over_the_limit_is_refused_with_413_before_it_is_read(data_dir: Path) -> None:
    async def scenario() -> None:
        async with running_controller(data_dir) as running:
            # Declare a large body but send only its first bytes: an answer proves it was not read.
            status_line = await running.post_declaring("/v1/enroll", MAX_REQUEST_BODY * 16, b'{"token": "')
            assert status_line.startswith(b"HTTP/1.1 413")

            too_big = {"token": "x" * (MAX_REQUEST_BODY + 1), "csr": ""}
            status, body = await running.call("POST", "/v1/enroll", too_big, admin=False)
            assert (status, body["error"]) == (413, "body_too_large")

    run(scenario())


def test_a_chunked_body_over_the_limit_is_refused_with_413(data_dir: Path) -> None:
    async def scenario() -> None:
        async with running_controller(data_dir) as running:
            async def chunks():  # no Content-Length: only the read limit can stop it
                for _ in range(20):
                    yield b"x" * 8192

            status, body = await running.post_bytes("/v1/enroll", chunks())
            assert (status, body["error"]) == (413, "body_too_large")

    run(scenario())


def test_a_session_certificate_is_short_lived_audited_and_refused_once_revoked(data_dir: Path) -> None:
    async def scenario() -> None:
        async with running_controller(data_dir) as running:
            status, body = await running.call(
                "POST", "/api/v1/identities/operator/session", {"csr": make_csr(make_key(), "operator")}
            )
            assert status == 201, body
            assert body["identity"] == "spiffe://outpost.local/default/operator"
            cert = x509.load_pem_x509_certificate(body["certificate"].encode())
            lifetime = not_after_of(cert) - not_before_of(cert)
            assert lifetime.total_seconds() == pytest.approx(3600 + 300, abs=5)
            assert running.context.audit.recent()[-1]["event"] == "session_issued"

            revoked: list[Identity] = []
            running.context.registry.on_revoked(revoked.append)
            status, body = await running.call("POST", "/api/v1/identities/operator/revoke")
            assert status == 200 and body["status"] == "revoked"
            assert [i.name for i in revoked] == ["operator"]
            assert running.context.audit.recent()[-1]["event"] == "identity_revoked"

            before = store_snapshot(running.context.settings.store_path)
            status, body = await running.call(
                "POST", "/api/v1/identities/operator/session", {"csr": make_csr(make_key(), "operator")}
            )
            assert (status, body["error"]) == (403, "identity_revoked")
            status, body = await running.call("POST", "/api/v1/identities/operator/token")
            assert (status, body["error"]) == (403, "identity_revoked")
            assert store_snapshot(running.context.settings.store_path) == before

    run(scenario())


def test_a_session_certificate_is_recorded_as_one_and_an_enrollment_certificate_is_not(data_dir: Path) -> None:
    async def scenario() -> None:
        async with running_controller(data_dir) as running:
            status, session = await running.call(
                "POST", "/api/v1/identities/operator/session", {"csr": make_csr(make_key(), "operator")}
            )
            assert status == 201, session
            store = running.context.store
            assert is_session_certificate(store, x509.load_pem_x509_certificate(session["certificate"].encode()))
            token = (await running.create_identity("gw"))["token"]
            status, enrolled = await running.enroll(token, make_key())
            assert status == 200, enrolled
            assert not is_session_certificate(store, x509.load_pem_x509_certificate(enrolled["certificate"].encode()))

    run(scenario())


def test_no_session_certificate_for_an_identity_that_enrolled_a_device_key(data_dir: Path) -> None:
    async def scenario() -> None:
        async with running_controller(data_dir) as running:
            token = (await running.create_identity("gw-1", roles=["gateway"]))["token"]
            status, _ = await running.enroll(token, make_key())
            assert status == 200
            before = store_snapshot(running.context.settings.store_path)
            status, body = await running.call(
                "POST", "/api/v1/identities/gw-1/session", {"csr": make_csr(make_key(), "gw-1")}
            )
            assert (status, body["error"]) == (403, "session_for_enrolled_identity")
            assert body["message"] == (
                "The identity default/gw-1 is enrolled with its own device key, so only that key may act as it; "
                "dial as an identity that never enrolled (outpostctl connect --as NAME, default operator)."
            )
            assert store_snapshot(running.context.settings.store_path) == before

    run(scenario())


def test_a_new_token_can_be_issued_for_an_identity_with_a_chosen_ttl(data_dir: Path) -> None:
    async def scenario() -> None:
        async with running_controller(data_dir) as running:
            await running.create_identity("gw")
            status, body = await running.call("POST", "/api/v1/identities/gw/token", {"ttl": 600})
            assert status == 201
            assert 590 <= body["token_expires"] - int(time.time()) <= 600
            status, body = await running.call("POST", "/api/v1/identities/gw/token", {"ttl": 5})
            assert (status, body["error"]) == (400, "invalid_ttl")
            status, body = await running.enroll((await running.call("POST", "/api/v1/identities/gw/token"))[1]["token"], make_key())
            assert status == 200

    run(scenario())


def test_a_token_for_an_identity_that_does_not_exist_is_404_and_creates_nothing(data_dir: Path) -> None:
    async def scenario() -> None:
        async with running_controller(data_dir) as running:
            before = store_snapshot(running.context.settings.store_path)
            status, body = await running.call("POST", "/api/v1/identities/ghost/token")
            assert (status, body["error"]) == (404, "identity_unknown")
            assert body["message"] == "There is no identity default/ghost; check the name and tenant."
            assert store_snapshot(running.context.settings.store_path) == before

    run(scenario())


def test_services_policies_and_audit_round_trip(data_dir: Path) -> None:
    async def scenario() -> None:
        async with running_controller(data_dir) as running:
            status, service = await running.call("POST", "/api/v1/services", {"name": "modbus", "roles": ["plc"]})
            assert status == 201 and service["roles"] == ["plc"]
            status, body = await running.call("POST", "/api/v1/services", {"name": "modbus"})
            assert (status, body["error"]) == (409, "service_exists")
            status, policy = await running.call(
                "POST", "/api/v1/policies", {"kind": "dial", "identities": ["role:operator"], "services": ["modbus"]}
            )
            assert status == 201 and policy["id"] >= 1 and policy["tenant"] == "default"
            status, body = await running.call(
                "POST", "/api/v1/policies", {"kind": "teleport", "identities": ["a"], "services": ["b"]}
            )
            assert (status, body["error"]) == (400, "invalid_policy")
            status, listed = await running.call("GET", "/api/v1/policies")
            assert [p["id"] for p in listed["policies"]] == [policy["id"]]
            status, services = await running.call("GET", "/api/v1/services")
            assert [s["name"] for s in services["services"]] == ["modbus"]
            status, audit = await running.call("GET", "/api/v1/audit?limit=3")
            # The refused policy leaves its one row.
            assert [e["event"] for e in audit["events"]] == ["service_created", "policy_created", "policy_refused"]
            status, body = await running.call("GET", "/api/v1/audit?limit=-1")
            assert (status, body["error"]) == (400, "invalid_limit")
            status, tunnels = await running.call("GET", "/api/v1/status")
            assert status == 200 and tunnels == {"tunnels": []}

    run(scenario())


def test_unknown_paths_and_methods_answer_json_errors(data_dir: Path) -> None:
    async def scenario() -> None:
        async with running_controller(data_dir) as running:
            status, body = await running.call("GET", "/v1/nothing", admin=False)
            assert (status, body["error"]) == (404, "not_found")
            status, body = await running.call("DELETE", "/v1/enroll", admin=False)
            assert (status, body["error"]) == (405, "method_not_allowed")
            async with running.session.post(running.url + "/v1/enroll", data=b"[1, 2") as response:
                assert response.status == 400 and (await response.json())["error"] == "invalid_json"

    run(scenario())


def test_signing_out_with_the_admin_credential_is_refused_and_changes_nothing(data_dir: Path) -> None:
    """Logout reads the bearer the door read: the admin token is no session, so nothing is ended."""

    async def scenario() -> None:
        async with running_controller(data_dir) as running:
            status, body = await running.call("POST", "/api/v1/signin/logout", {})
            assert (status, body["error"]) == (400, "not_a_session") and "admin-token rotate" in body["message"]
            status, _ = await running.call("GET", "/api/v1/identities")
            assert status == 200

    run(scenario())
