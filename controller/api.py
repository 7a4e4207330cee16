"""HTTP handlers: the gateway endpoints (``/v1/``) and the management API (``/api/v1/``)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from controller.actor import actor_of
from controller.blocking import API_POOL
from controller.context import ControllerContext
from controller.correlation import ENROLLMENT, RENEWAL, audit_scope, new_id
from controller.enrollment import Issued
from controller.errors import BodyRefused, ControllerError, forbidden, unknown_identity
from controller.names import DEFAULT_TENANT, check_name, check_roles
from controller.registry import Identity, refuse_blocked
from controller.relays import relays_for
from controller.signin.api import person_label, require_tenant, signin_of, tenant_scope
from controller.tokens import check_ttl

#: Every request body is JSON of a few KiB at most (a CSR, a policy); 64 KiB
#: bounds what any peer, authenticated or not, can make the controller read.
MAX_REQUEST_BODY = 64 * 1024
PEM_CONTENT_TYPE = "application/x-pem-file"
ENROLL_PATH = "/v1/enroll"
RENEW_PATH = "/v1/renew"
#: The endpoints anyone may POST to, and the audit event each one's refusals are recorded as.
REFUSAL_EVENTS = {ENROLL_PATH: "enrollment_refused", RENEW_PATH: "renewal_refused"}


def too_large() -> BodyRefused:
    return BodyRefused(
        "body_too_large", f"The request body is larger than {MAX_REQUEST_BODY} bytes; send less.", 413
    )


def not_json(message: str) -> BodyRefused:
    return BodyRefused("invalid_json", message, 400)


async def read_json(request: web.Request, *, optional: bool = False) -> dict[str, Any]:
    """The request's JSON object; 413 past MAX_REQUEST_BODY, 400 for anything not an object."""
    if request.content_length is not None and request.content_length > MAX_REQUEST_BODY:
        raise too_large()
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise too_large() from None
    if not body.strip():
        if optional:
            return {}
        raise not_json("The request needs a JSON object body.")
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise not_json("The request body is not valid JSON.") from None
    if not isinstance(value, dict):
        raise not_json("The request body must be a JSON object.")
    return value


def _tenant(value: object) -> str:
    return DEFAULT_TENANT if value is None else check_name(value, "tenant")


def issued_json(context: ControllerContext, issued: Issued) -> dict[str, Any]:
    return {
        "certificate": issued.certificate_pem,
        "ca": context.ca.certificate_pem,
        "identity": issued.identity.uri,
        "name": issued.identity.name,
        "tenant": issued.identity.tenant,
        "relays": relays_for(context, issued.identity.uri),
        "not_after": issued.not_after,
    }


class GatewayApi:
    """Endpoints a gateway reaches without a credential: the token or its key is the proof."""

    def __init__(self, context: ControllerContext) -> None:
        self.context = context

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/v1/ca", self.ca)
        app.router.add_get("/v1/time", self.time)
        app.router.add_post(ENROLL_PATH, self.enroll)
        app.router.add_post(RENEW_PATH, self.renew)

    async def ca(self, request: web.Request) -> web.Response:
        return web.Response(text=self.context.ca.certificate_pem, content_type=PEM_CONTENT_TYPE)

    async def time(self, request: web.Request) -> web.Response:
        return web.json_response({"time": time.time()})

    async def enroll(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        # The token's transaction fsyncs and the CA signs: off the loop that carries tunnels.
        with audit_scope(correlation=new_id(ENROLLMENT)):
            issued = await API_POOL.run(self.context.enrollment.enroll, body.get("token"), body.get("csr"),
                                        remote=request.remote)
        return web.json_response(issued_json(self.context, issued))

    async def renew(self, request: web.Request) -> web.Response:
        """Renewal or recovery: the CSR's key must be an identity's enrolled key (controller/renewal.py)."""
        body = await read_json(request)
        with audit_scope(correlation=new_id(RENEWAL)):
            issued = await API_POOL.run(self.context.renewal.renew, body.get("csr"), remote=request.remote)
        return web.json_response(issued_json(self.context, issued))


class ManagementApi:
    """``/api/v1/``: what operators (outpostctl) do, behind the admin credential.

    Every handler that writes (a commit, a token's signature) runs it in the
    API worker pool; reads stay on the event loop, on its own connection.
    """

    def __init__(self, context: ControllerContext, tunnel_status: Callable[[], list[dict[str, Any]]]) -> None:
        self.context = context
        self._tunnel_status = tunnel_status

    def add_routes(self, app: web.Application) -> None:
        r = app.router
        r.add_post("/api/v1/identities", self.create_identity)
        r.add_get("/api/v1/identities", self.list_identities)
        r.add_get("/api/v1/identities/{name}", self.get_identity)
        r.add_post("/api/v1/identities/{name}/token", self.create_token)
        r.add_post("/api/v1/identities/{name}/revoke", self.revoke)
        r.add_post("/api/v1/identities/{name}/disable", self.disable)
        r.add_post("/api/v1/identities/{name}/enable", self.enable)
        r.add_post("/api/v1/identities/{name}/session", self.session)
        r.add_post("/api/v1/services", self.create_service)
        r.add_get("/api/v1/services", self.list_services)
        r.add_post("/api/v1/policies", self.create_policy)
        r.add_get("/api/v1/policies", self.list_policies)
        r.add_get("/api/v1/status", self.status)

    @staticmethod
    def _key_from_path(request: web.Request) -> tuple[str, str]:
        """(tenant, name) of the identity the path names, checked but not looked up."""
        return _tenant(request.query.get("tenant")), check_name(request.match_info["name"], "identity name")

    def _identity_from_path(self, request: web.Request) -> Identity:
        return self.context.registry.require_identity(*self._key_from_path(request))

    async def create_identity(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        tenant = _tenant(body.get("tenant"))
        await require_tenant(request, self.context, tenant)
        name = check_name(body.get("name"), "identity name")
        roles = check_roles(body.get("roles"))
        ttl = check_ttl(body.get("ttl"), self.context.settings.token_ttl)
        ctx = self.context

        def create() -> tuple[Identity, str, int]:
            with ctx.store.transaction() as db:
                identity = ctx.registry.create_identity_in(db, tenant, name, roles)
                return (identity, *ctx.tokens.create_in(db, identity, ttl))

        identity, token, expires = await API_POOL.run(create)
        return web.json_response(
            {"identity": identity.to_json(), "token": token, "token_expires": expires}, status=201
        )

    async def list_identities(self, request: web.Request) -> web.Response:
        tenant = request.query.get("tenant")
        identities = self.context.registry.list_identities(None if tenant is None else _tenant(tenant))
        scope = tenant_scope(request)
        identities = [i for i in identities if scope is None or i.tenant in scope]
        return web.json_response({"identities": [i.to_json() for i in identities]})

    async def get_identity(self, request: web.Request) -> web.Response:
        return web.json_response(self._identity_from_path(request).to_json())

    async def create_token(self, request: web.Request) -> web.Response:
        body = await read_json(request, optional=True)
        ttl = check_ttl(body.get("ttl"), self.context.settings.token_ttl)
        tenant, name = self._key_from_path(request)
        ctx = self.context

        def create() -> tuple[Identity, str, int]:
            # Looked up in the transaction that creates the token: a revocation cannot slip in between.
            with ctx.store.transaction() as db:
                current = ctx.registry.get_identity_in(db, tenant, name)
                if current is None:
                    raise unknown_identity(tenant, name)
                refuse_blocked(current)
                return (current, *ctx.tokens.create_in(db, current, ttl))

        current, token, expires = await API_POOL.run(create)
        return web.json_response({"identity": current.to_json(), "token": token, "token_expires": expires}, status=201)

    async def revoke(self, request: web.Request) -> web.Response:
        identity = self._identity_from_path(request)
        revoked = await API_POOL.run(self.context.registry.revoke, identity.tenant, identity.name)
        return web.json_response(revoked.to_json())

    async def disable(self, request: web.Request) -> web.Response:
        identity = self._identity_from_path(request)
        disabled = await API_POOL.run(self.context.registry.disable, identity.tenant, identity.name)
        return web.json_response(disabled.to_json())

    async def enable(self, request: web.Request) -> web.Response:
        identity = self._identity_from_path(request)
        enabled = await API_POOL.run(self.context.registry.enable, identity.tenant, identity.name)
        return web.json_response(enabled.to_json())

    async def session(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        identity = self._identity_from_path(request)
        await self._may_act_as(request, identity)
        issued = await API_POOL.run(self.context.enrollment.issue_session, identity.tenant, identity.name,
                                    body.get("csr"))
        return web.json_response(issued_json(self.context, issued), status=201)

    async def _may_act_as(self, request: web.Request, identity: Identity) -> None:
        """A person gets a session certificate only as themselves; the admin credential never as a person."""
        actor = actor_of(request)
        is_person = await API_POOL.run(signin_of(self.context).people.is_person, identity.tenant, identity.name)
        if actor.kind == "person" and (identity.label != person_label(request) or not is_person):
            raise forbidden("not_yourself", f"A person connects only as themselves, not as {identity.label}; "
                            "leave out --as.")
        if actor.kind != "person" and is_person:
            raise forbidden("admin_as_person", f"{identity.label} is a person: only they can act as themselves, "
                            "by signing in (outpostctl login); the admin credential cannot.")

    async def create_service(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        tenant = _tenant(body.get("tenant"))
        await require_tenant(request, self.context, tenant)
        service = await API_POOL.run(
            self.context.registry.create_service,
            tenant, check_name(body.get("name"), "service name"), check_roles(body.get("roles")),
            body.get("choose", "one"), body.get("ports", []),
        )
        return web.json_response(service.to_json(), status=201)

    async def list_services(self, request: web.Request) -> web.Response:
        tenant = request.query.get("tenant")
        services = self.context.registry.list_services(None if tenant is None else _tenant(tenant))
        scope = tenant_scope(request)
        services = [s for s in services if scope is None or s.tenant in scope]
        return web.json_response({"services": [s.to_json() for s in services]})

    async def create_policy(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        tenant = _tenant(body.get("tenant"))
        await require_tenant(request, self.context, tenant)
        try:
            policy = await API_POOL.run(
                self.context.policy.create, body.get("kind"), tenant, body.get("identities"), body.get("services"),
                until=body.get("until"), lifetime=body.get("for"),
            )
        except ControllerError as error:
            if error.status >= 500:
                raise
            # Nothing was written; the refusal is the one row.
            await API_POOL.run(self.context.audit.record, "policy_refused", action="create", tenant=tenant,
                               code=error.code, reason=error.message)
            raise
        return web.json_response(policy.to_json(), status=201)

    async def list_policies(self, request: web.Request) -> web.Response:
        scope = tenant_scope(request)
        policies = [p for p in self.context.policy.list_with_counts() if scope is None or p.tenant in scope]
        return web.json_response({"policies": [p.to_json() for p in policies]})

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response({"tunnels": self._tunnel_status()})
