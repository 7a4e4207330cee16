"""The management API's door: the admin credential or a person's session, then the role the route needs.

``/api/v1/signin/`` (start a sign-in, finish it) is open to anyone; every
other ``/api/`` route needs a bearer. The admin credential is break-glass:
it may be turned off, and every use of it is audited as such. A person's
session gives the roles their groups map to, each everywhere or in one
tenant, checked against ``roles.ROUTE_ROLES``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from controller.actor import ACTOR_KEY, Actor, actor_of
from controller.blocking import API_POOL
from controller.context import ControllerContext
from controller.correlation import MANAGEMENT, audit_scope, new_id
from controller.errors import ControllerError
from controller.listener import guarded_connection
from controller.names import DEFAULT_TENANT
from controller.request_keys import request_key
from controller.signin.config import Grant
from controller.signin.errors import SigninRefused
from controller.signin.people import SESSION_PREFIX, Person
from controller.signin.roles import ROUTE_ROLES, holds, refusal, tenants_with
from controller.signin.service import SigninService

log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
BEARER = "Bearer "
SIGNIN_PREFIX = "/api/v1/signin/"
#: The sign-in routes open to anyone (the rest of /api/v1/signin/ needs a session).
OPEN_ROUTES = frozenset({"/api/v1/signin/providers", "/api/v1/signin/device", "/api/v1/signin/device/poll",
                         "/api/v1/signin/nonce", "/api/v1/signin/id-token", "/api/v1/signin/authorize",
                         "/api/v1/signin/code"})
#: Routes whose answer spans every tenant: a tenant-scoped role is not enough for them. Relays carry
#: every tenant's tunnels, so adding, listing and retiring them is fleet-wide too.
ALL_TENANT_ROUTES = frozenset({"/api/v1/audit", "/api/v1/audit/verify", "/api/v1/connections", "/api/v1/status",
                               "/api/v1/relays", "/api/v1/relays/{name}/retire", "/api/v1/relays/{name}/revoke"})
#: Where the request leaves the person's grants and the tenants the used role reaches (None: all).
PERSON_KEY: web.RequestKey[Person] = request_key("outpost.person")
SCOPE_KEY: web.RequestKey[set[str] | None] = request_key("outpost.scope")


def signin_of(context: ControllerContext) -> SigninService:
    service = context.signin
    assert isinstance(service, SigninService)
    return service


def _remote(request: web.Request) -> str:
    return request.remote or ""


def bearer_of(request: web.Request) -> str:
    """The token of the request's ``Authorization: Bearer`` header; "" when it carries none (the admin check refuses "")."""
    presented = request.headers.get("Authorization", "")
    return presented[len(BEARER):] if presented.startswith(BEARER) else ""


def _unauthorized(code: str, message: str) -> ControllerError:
    return ControllerError(code, message, 401)


def management_auth(context: ControllerContext) -> Any:
    """The middleware: who is asking, and may they do this route."""

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith("/api/") or request.path in OPEN_ROUTES:
            return await handler(request)
        service = signin_of(context)
        bearer = bearer_of(request)
        if bearer.startswith(SESSION_PREFIX):
            await _person(request, service, bearer)
        else:
            await _admin(request, context, service, bearer)
        connection = guarded_connection(request)
        if connection is not None:
            connection.mark_authenticated()
        if not bearer.startswith(SESSION_PREFIX):
            # Break-glass: the action's own audit row names the actor (controller/actor.py, kind "admin");
            # every use, reads included, is in the log too.
            log.info("admin credential used: %s %s from %s", request.method, request.path, _remote(request))
        # Every event the action causes names who asked, from where, under one correlation id.
        with audit_scope(correlation=new_id(MANAGEMENT), **actor_of(request).audit_fields()):
            return await handler(request)

    return check


async def _admin(request: web.Request, context: ControllerContext, service: SigninService, bearer: str) -> None:
    valid = bool(bearer) and context.admin is not None and context.admin.check(bearer)
    if valid and not service.settings.admin_credential:
        await API_POOL.run(service.audit.record_anonymous, "admin_credential_refused", method=request.method,
                           path=request.path, remote=_remote(request))
        raise _unauthorized("admin_credential_off", "The admin credential is turned off in this controller's "
                            "configuration (admin_credential = false); sign in with outpostctl login.")
    if not valid:
        hint = "sign in with outpostctl login, or use the admin token (see outpostctl.toml)" \
            if service.settings.providers else "this request needs the admin token (see outpostctl.toml)"
        raise _unauthorized("unauthorized", f"This request carries no valid credential: {hint}.")
    request[ACTOR_KEY] = Actor(kind="admin", name="admin", role="admin", remote=_remote(request))


async def authenticate(request: web.Request, context: ControllerContext, bearer: str) -> Person | None:
    """Who holds ``bearer``: a person (with their grants), or None for the admin credential.

    Refused exactly as the API refuses (and audited the same way); the caller checks the role it needs.
    """
    service = signin_of(context)
    if bearer.startswith(SESSION_PREFIX):
        return await _session_person(service, bearer, _remote(request))
    await _admin(request, context, service, bearer)
    return None


async def _session_person(service: SigninService, bearer: str, remote: str) -> Person:
    person = service.people.session(bearer)
    if person is None:
        state = service.people.session_state(bearer)
        error = SigninRefused(f"session_{state}", {
            "expired": "Your session has expired; sign in again with outpostctl login.",
            "ended": "You signed out of this session; sign in again with outpostctl login.",
            "blocked": "Your identity was revoked or disabled, which ended this session; ask an admin.",
        }.get(state, "This session is not known here; sign in again with outpostctl login."))
        await API_POOL.run(service.refuse, error, None, remote)
        raise error
    return person


async def _person(request: web.Request, service: SigninService, bearer: str) -> None:
    person = await _session_person(service, bearer, _remote(request))
    request[PERSON_KEY] = person
    if request.match_info.http_exception is not None:
        # No such route (404) or method (405): the router says so, as it does to the admin credential.
        request[ACTOR_KEY] = Actor(kind="person", name=person.name, role="", remote=_remote(request))
        return
    route = request.match_info.route.resource
    canonical = route.canonical if route is not None else request.path
    role, what = ROUTE_ROLES.get((request.method, canonical), ("admin", f"{request.method} {canonical}"))
    if not role:
        request[ACTOR_KEY] = Actor(kind="person", name=person.name, role="", remote=_remote(request))
        return
    tenant: str | None = request.query.get("tenant")
    if tenant is None and "{name}" in canonical:
        tenant = DEFAULT_TENANT
    if canonical in ALL_TENANT_ROUTES:
        grant = holds([g for g in person.grants if g.tenant is None], role, None)
    else:
        grant = holds(person.grants, role, tenant) if tenant is not None else _any_tenant(person.grants, role)
    if grant is None:
        await refuse(request, service, person, what, role, tenant if canonical not in ALL_TENANT_ROUTES else None)
    assert grant is not None
    request[SCOPE_KEY] = tenants_with(person.grants, role)
    request[ACTOR_KEY] = Actor(kind="person", name=person.name, role=str(grant), remote=_remote(request))


def _any_tenant(grants: tuple[Grant, ...], role: str) -> Grant | None:
    found = holds(grants, role, None)
    if found is not None:
        return found
    scoped = tenants_with(grants, role)
    return holds(grants, role, sorted(scoped)[0]) if scoped else None


async def refuse(request: web.Request, service: SigninService, person: Person, what: str, role: str,
                 tenant: str | None) -> None:
    error = refusal(what, role, tenant, person.grants)
    await API_POOL.run(service.audit.record, "management_refused", identity=person.label, needs=role,
                       tenant=tenant, method=request.method, path=request.path, remote=_remote(request),
                       grants=[str(g) for g in person.grants])
    raise error


async def require_tenant(request: web.Request, context: ControllerContext, tenant: str) -> None:
    """For routes that name their tenant in the body: the caller's role must reach that tenant."""
    person = request.get(PERSON_KEY)
    scope = request.get(SCOPE_KEY)
    if not isinstance(person, Person) or scope is None or tenant in scope:
        return
    route = request.match_info.route.resource
    canonical = route.canonical if route is not None else request.path
    role, what = ROUTE_ROLES[(request.method, canonical)]
    await refuse(request, signin_of(context), person, what, role, tenant)


def person_label(request: web.Request) -> str | None:
    """``tenant/name`` of the person making the request, None for the admin credential."""
    person = request.get(PERSON_KEY)
    return person.label if isinstance(person, Person) else None


def tenant_scope(request: web.Request) -> set[str] | None:
    """The tenants a list may show this caller: None for all."""
    scope = request.get(SCOPE_KEY)
    return scope if isinstance(scope, set) else None


class SigninApi:
    def __init__(self, context: ControllerContext) -> None:
        self.context = context

    def add_routes(self, app: web.Application) -> None:
        r = app.router
        r.add_get("/api/v1/signin/providers", self.providers)
        r.add_post("/api/v1/signin/device", self.device)
        r.add_post("/api/v1/signin/device/poll", self.poll)
        r.add_post("/api/v1/signin/nonce", self.nonce)
        r.add_post("/api/v1/signin/id-token", self.id_token)
        r.add_post("/api/v1/signin/authorize", self.authorize)
        r.add_post("/api/v1/signin/code", self.code)
        r.add_get("/api/v1/signin/whoami", self.whoami)
        r.add_post("/api/v1/signin/logout", self.logout)

    @property
    def service(self) -> SigninService:
        return signin_of(self.context)

    async def providers(self, request: web.Request) -> web.Response:
        s = self.service.settings
        return web.json_response({"providers": [{"name": p.name, "issuer": p.issuer, "client_id": p.client_id}
                                                for p in s.providers],
                                  "session_lifetime": s.session_lifetime})

    async def device(self, request: web.Request) -> web.Response:
        from controller.api import read_json

        body = await read_json(request, optional=True)
        return web.json_response(await API_POOL.run(self.service.start_device, body.get("provider"),
                                                    _remote(request)))

    async def poll(self, request: web.Request) -> web.Response:
        from controller.api import read_json

        body = await read_json(request)
        signed = await API_POOL.run(self.service.poll_device, body.get("provider"), body.get("device_code"),
                                    _remote(request))
        return web.json_response(signed.to_json(), status=201)

    async def nonce(self, request: web.Request) -> web.Response:
        return web.json_response(await API_POOL.run(self.service.new_nonce))

    async def id_token(self, request: web.Request) -> web.Response:
        from controller.api import read_json

        body = await read_json(request)
        signed = await API_POOL.run(self.service.sign_in_with_id_token, body.get("provider"), body.get("id_token"),
                                    body.get("nonce"), _remote(request))
        return web.json_response(signed.to_json(), status=201)

    async def authorize(self, request: web.Request) -> web.Response:
        from controller.api import read_json

        body = await read_json(request)
        return web.json_response(await API_POOL.run(self.service.authorize, body.get("provider"),
                                                    body.get("redirect_uri"), body.get("code_challenge"),
                                                    body.get("state")))

    async def code(self, request: web.Request) -> web.Response:
        from controller.api import read_json

        body = await read_json(request)
        signed = await API_POOL.run(self.service.redeem_code, body.get("provider"), body.get("code"),
                                    body.get("code_verifier"), body.get("redirect_uri"), body.get("nonce"),
                                    _remote(request))
        return web.json_response(signed.to_json(), status=201)

    async def whoami(self, request: web.Request) -> web.Response:
        person = request.get(PERSON_KEY)
        if not isinstance(person, Person):
            return web.json_response({"kind": "admin", "identity": None, "grants": ["admin"]})
        return web.json_response({"kind": "person", "identity": person.label, "name": person.name,
                                  "tenant": person.tenant, "grants": [str(g) for g in person.grants],
                                  "expires_at": person.session_expires_at})

    async def logout(self, request: web.Request) -> web.Response:
        bearer = bearer_of(request)
        person = await API_POOL.run(self.service.people.end, bearer, _remote(request))
        if person is None:
            raise ControllerError("not_a_session", "Only a person's session can be signed out; "
                                  "the admin credential is rotated instead (outpost-controller admin-token rotate).", 400)
        return web.json_response({"signed_out": person.label})
