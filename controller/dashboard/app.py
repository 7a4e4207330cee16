"""``/ui/``: the dashboard's routes, its login and logout, and the door every page goes through.

The door is the management API's (controller/signin/api.py ``authenticate``):
the admin credential, or a person's ``outpostctl login`` session holding the
auditor role, the role the API's read routes need (controller/signin/roles.py).
Pages only read; login and logout change state and carry a CSRF token.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

from controller.audit_api import CONNECTION_PARAMETERS
from controller.audit_chain import Verification, verify_recent
from controller.audit_query import AuditFilter, parse_filter
from controller.blocking import API_POOL
from controller.context import ControllerContext
from controller.dashboard import pages
from controller.dashboard.render import esc, login_page, page, refusal_page
from controller.dashboard.sessions import (
    COOKIE,
    LOGIN_COOKIE,
    LOGIN_FORM_SECONDS,
    SESSION_SECONDS,
    Session,
    SessionBook,
    csrf_matches,
)
from controller.errors import ControllerError, bad_request, not_found
from controller.fleet import own_view
from controller.listener import guarded_connection
from controller.names import check_name
from controller.relay.relay import Relay
from controller.signin.api import authenticate
from controller.signin.people import Person
from controller.signin.roles import holds, refusal, tenants_with

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
STATIC_FILES = {"dashboard.css": "text/css", "dashboard.js": "text/javascript"}
#: The role a person needs to see the dashboard: the one the API's read routes need.
ROLE = "auditor"
#: The audit page's verification of the newest events (a tenth of a second of a worker for 10,000) is
#: reused for this long: open tabs refreshing every 30 s cost one walk, not one each; a tamper
#: shows within these seconds.
VERIFY_REUSE_SECONDS = 10.0
#: The longest token the login form takes: an admin credential or a session bearer is far shorter.
MAX_TOKEN_CHARS = 4096
#: The dashboard's pages load only its own files; no frame may hold it (clickjacking), no form leaves it.
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self'; "
                               "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    # same-origin, not no-referrer: under no-referrer a browser sends its forms with "Origin: null",
    # and the login's same-origin check needs the real one.
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
}
REFUSALS = {
    "missing": "You are not logged in to the dashboard; log in with the admin credential or your outpostctl "
               "login session.",
    "unknown": "This dashboard session is not known to this controller (it restarted, or the cookie is from "
               "another controller); log in again.",
    "expired": f"Your dashboard session ended {SESSION_SECONDS // 60} minutes after you logged in; log in again.",
}
Page = Callable[[web.Request, Person | None], Awaitable[str]]


def html_response(body: str, status: int = 200) -> web.Response:
    return web.Response(text=body, status=status, content_type="text/html", charset="utf-8", headers=HEADERS)


def redirect(location: str) -> web.Response:
    return web.Response(status=303, headers={**HEADERS, "Location": location})


def _cookie(response: web.StreamResponse, name: str, value: str, max_age: int) -> None:
    # Secure: the management listener is TLS only. Path /ui: the API never sees the cookie.
    response.set_cookie(name, value, path="/ui", secure=True, httponly=True, samesite="Strict", max_age=max_age)


class Dashboard:
    def __init__(self, context: ControllerContext, relay: Relay) -> None:
        self.context = context
        self.relay = relay
        self.sessions = SessionBook()
        self._verifying = asyncio.Lock()
        self._verified: tuple[float, Verification] | None = None

    def add_routes(self, app: web.Application) -> None:
        r = app.router
        r.add_get("/ui", self.root)
        r.add_get("/ui/", self.root)
        r.add_get("/ui/login", self.login_form)
        r.add_post("/ui/login", self.login)
        r.add_post("/ui/logout", self.logout)
        r.add_get("/ui/static/{file}", self.static)
        for path, handler, current in (("/ui/fleet", self.fleet, "/ui/fleet"),
                                       ("/ui/gateway/{tenant}/{name}", self.gateway, ""),
                                       ("/ui/connections", self.connections, "/ui/connections"),
                                       ("/ui/audit", self.audit, "/ui/audit"),
                                       ("/ui/policies", self.policies, "/ui/policies")):
            r.add_get(path, self._page(handler, current))

    # The door.

    async def _session(self, request: web.Request) -> tuple[Session, Person | None]:
        """The request's session (and its person, checked again now), or a refusal in one sentence."""
        session, why = self.sessions.find(request.cookies.get(COOKIE, ""))
        if session is None:
            raise ControllerError(f"session_{why}", REFUSALS[why], 401)
        person = None
        if session.kind == "person":
            person = await authenticate(request, self.context, session.bearer)
            self._require_role(person)
        connection = guarded_connection(request)
        if connection is not None:
            connection.mark_authenticated()
        return session, person

    @staticmethod
    def _require_role(person: Person | None) -> None:
        if person is not None and tenants_with(person.grants, ROLE) == set():
            raise refusal("Using the dashboard", ROLE, None, person.grants)

    @staticmethod
    def _same_origin(request: web.Request) -> None:
        origin = request.headers.get("Origin")
        if origin is not None and origin != f"https://{request.host}":
            raise ControllerError("cross_origin", f"This form was sent from {origin[:80]!r}, not from the "
                                  "dashboard's own pages; open the dashboard and use its form.", 403)

    def _page(self, handler: Page, current: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def serve(request: web.Request) -> web.StreamResponse:
            session: Session | None = None
            try:
                session, person = await self._session(request)
                body = await handler(request, person)
            except ControllerError as error:
                if error.status in (401, 403) or session is None:
                    return html_response(refusal_page(error.message), error.status)
                body = f'<p class="error" id="error">{esc(error.message)}</p>'
                return html_response(page("Refused", body, who=session.name, csrf=session.csrf,
                                          refresh=False, current=current), error.status)
            title = {"/ui/fleet": "Fleet", "/ui/connections": "Connections", "/ui/audit": "Audit trail",
                     "/ui/policies": "Policies"}.get(current) or request.match_info.get("name", "")
            return html_response(page(title, body, who=session.name, csrf=session.csrf, current=current))

        return serve

    @staticmethod
    def _scope(person: Person | None) -> set[str] | None:
        return tenants_with(person.grants, ROLE) if person is not None else None

    @staticmethod
    def _everywhere(person: Person | None, what: str) -> None:
        """Pages across tenants (the audit trail, connections, policies) need the role in every tenant."""
        if person is not None and holds(person.grants, ROLE, None) is None:
            raise refusal(f"{what} (across every tenant)", ROLE, None, person.grants)

    # Login and logout.

    async def root(self, request: web.Request) -> web.StreamResponse:
        session, _ = self.sessions.find(request.cookies.get(COOKIE, ""))
        return redirect("/ui/fleet" if session is not None else "/ui/login")

    async def login_form(self, request: web.Request, error: str = "", status: int = 200) -> web.StreamResponse:
        nonce, token = self.sessions.login_form()
        response = html_response(login_page(token, error), status)
        _cookie(response, LOGIN_COOKIE, nonce, LOGIN_FORM_SECONDS)
        return response

    async def login(self, request: web.Request) -> web.StreamResponse:
        try:
            self._same_origin(request)
            form = await request.post()
            csrf, token = form.get("csrf"), form.get("token")
            if not isinstance(csrf, str) or not self.sessions.login_form_valid(request.cookies.get(LOGIN_COOKIE, ""),
                                                                                 csrf):
                raise ControllerError("csrf_refused", "This login form's CSRF token is missing, forged or older than "
                                      f"{LOGIN_FORM_SECONDS // 60} minutes; reload the login page and try again.", 403)
            if not isinstance(token, str) or not token.strip() or len(token) > MAX_TOKEN_CHARS:
                raise ControllerError("unauthorized", "Paste the admin credential or the session token of "
                                      "outpostctl login into the field.", 401)
            person = await authenticate(request, self.context, token.strip())
            self._require_role(person)
        except ControllerError as error:
            return await self.login_form(request, error.message, error.status)
        kind, name = ("person", person.label) if person is not None else ("admin", "admin")
        cookie, _ = self.sessions.create(kind, name, token.strip() if person is not None else "")
        await API_POOL.run(self.context.audit.record, "dashboard_login", actor=name, actor_kind=kind,
                           remote=request.remote or "")
        response = redirect("/ui/fleet")
        _cookie(response, COOKIE, cookie, SESSION_SECONDS)
        response.del_cookie(LOGIN_COOKIE, path="/ui")
        return response

    async def logout(self, request: web.Request) -> web.StreamResponse:
        try:
            self._same_origin(request)
            session, _ = await self._session(request)
            form = await request.post()
            csrf = form.get("csrf")
            if not isinstance(csrf, str) or not csrf_matches(session, csrf):
                raise ControllerError("csrf_refused", "This form's CSRF token is missing or forged; reload the "
                                      "page and use its Log out button.", 403)
        except ControllerError as error:
            return html_response(refusal_page(error.message), error.status)
        self.sessions.end(request.cookies.get(COOKIE, ""))
        await API_POOL.run(self.context.audit.record, "dashboard_logout", actor=session.name,
                           actor_kind=session.kind, remote=request.remote or "")
        response = redirect("/ui/login")
        response.del_cookie(COOKIE, path="/ui")
        return response

    async def static(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["file"]
        if name not in STATIC_FILES:
            raise not_found("not_found", "There is no such file in the dashboard.")
        # Read once per request (a few KB); never a path built from the request.
        return web.Response(body=(STATIC / name).read_bytes(), content_type=STATIC_FILES[name],
                            headers={**HEADERS, "Cache-Control": "private, max-age=3600"})

    # The pages.

    async def fleet(self, request: web.Request, person: Person | None) -> str:
        view = pages.fleet_view(request.query)
        scope = self._scope(person)
        own = own_view(self.relay.presence)  # on the loop; the rest in a worker thread

        def build() -> str:
            identities = [i for i in self.context.registry.list_identities(view.tenant or None)
                          if scope is None or i.tenant in scope]
            return pages.fleet_page(self.context.store, identities, own, view)

        return await API_POOL.run(build)

    async def gateway(self, request: web.Request, person: Person | None) -> str:
        if request.query:
            raise bad_request("invalid_parameter", "A gateway's page takes no parameters.")
        tenant = check_name(request.match_info["tenant"], "tenant")
        name = check_name(request.match_info["name"], "identity name")
        scope = self._scope(person)
        identity = self.context.registry.get_identity(tenant, name)
        if identity is None or (scope is not None and tenant not in scope):
            raise not_found("identity_unknown", f"There is no identity {tenant}/{name} you may see; check the name "
                            "and tenant.")
        own = own_view(self.relay.presence)
        tunnels = [t for t in self.relay.status() if t["tenant"] == tenant and t["name"] == name]
        return await API_POOL.run(pages.gateway_body, self.context.store, identity, own, tunnels)

    async def connections(self, request: web.Request, person: Person | None) -> str:
        self._everywhere(person, "Reading connections")
        where = self._filter(request, CONNECTION_PARAMETERS)
        return await API_POOL.run(pages.connections_body, self.context.store, where)

    async def audit(self, request: web.Request, person: Person | None) -> str:
        self._everywhere(person, "Reading the audit log")
        where = self._filter(request, CONNECTION_PARAMETERS)

        verification = await self._verification()
        return await API_POOL.run(pages.audit_body, self.context.store, where, verification)

    async def _verification(self) -> Verification:
        """The newest events' verification, shared by every page asking within ``VERIFY_REUSE_SECONDS``."""
        async with self._verifying:  # one walk at a time; who waited gets its answer
            loop = asyncio.get_running_loop()
            if self._verified is None or loop.time() - self._verified[0] > VERIFY_REUSE_SECONDS:
                result = await API_POOL.run(verify_recent, self.context.store, self.context.audit.chain_key)
                self._verified = (loop.time(), result)
            return self._verified[1]

    async def policies(self, request: web.Request, person: Person | None) -> str:
        self._everywhere(person, "Listing policies")
        if request.query:
            raise bad_request("invalid_parameter", "The policies page takes no parameters.")
        return await API_POOL.run(lambda: pages.policies_body(self.context.policy.list_with_counts()))

    @staticmethod
    def _filter(request: web.Request, allowed: frozenset[str]) -> AuditFilter:
        where = parse_filter(pages.given(request.query), allowed)
        return dataclasses.replace(where, limit=min(where.limit, pages.EVENTS_PAGE_ROWS))
