"""``/api/v1/grants``: request (a person), list, approve and deny (an approver, never the requester).

Every refusal (a requester approving their own grant, an expired or
answered one, an unknown id, a bad duration) changes nothing and leaves one
``grant_refused`` row, under the grant's correlation id when it exists.
"""

from __future__ import annotations

from aiohttp import web

from controller.api import read_json
from controller.blocking import API_POOL
from controller.context import ControllerContext
from controller.errors import ControllerError, bad_request
from controller.grants import Grants
from controller.signin.api import PERSON_KEY, require_tenant
from controller.signin.people import Person
from controller.signin.roles import tenants_with

#: A grant id fits a 64-bit sequence; a longer string of digits is a typo, refused before any lookup.
MAX_GRANT_ID_DIGITS = 18


def grants_of(context: ControllerContext) -> Grants:
    return Grants(context.store, context.audit, context.registry, context.policy)


class GrantsApi:
    def __init__(self, context: ControllerContext) -> None:
        self.context = context
        self.grants = grants_of(context)

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/api/v1/grants", self.request)
        app.router.add_get("/api/v1/grants", self.list)
        app.router.add_post("/api/v1/grants/{id}/approve", self.approve)
        app.router.add_post("/api/v1/grants/{id}/deny", self.deny)

    async def _refused(self, error: ControllerError, grant_id: object, action: str) -> ControllerError:
        await API_POOL.run(self.grants.refused, error, grant_id, action)
        return error

    async def request(self, request: web.Request) -> web.Response:
        person = request.get(PERSON_KEY)
        try:
            if not isinstance(person, Person):
                raise bad_request("person_required", "A grant is requested by a person: sign in with outpostctl "
                                  "login (the admin credential needs no grant).")
            body = await read_json(request)
            grant = await API_POOL.run(self.grants.request, person.label, body.get("service"), body.get("for"),
                                       body.get("reason"))
        except ControllerError as error:
            if error.status >= 500:
                raise
            raise await self._refused(error, None, "request") from None
        return web.json_response(grant.to_json(), status=201)

    async def list(self, request: web.Request) -> web.Response:
        person = request.get(PERSON_KEY)
        if not isinstance(person, Person):
            grants = await API_POOL.run(self.grants.list_grants, None)
        else:
            # Approvers see their tenants' grants; everyone sees their own.
            tenants = tenants_with(person.grants, "approver")
            mine = await API_POOL.run(self.grants.list_grants, None, person.label)
            theirs = [] if tenants == set() else await API_POOL.run(self.grants.list_grants, tenants)
            seen = {g.id for g in theirs}
            grants = sorted(theirs + [g for g in mine if g.id not in seen], key=lambda g: g.id)
        return web.json_response({"grants": [g.to_json() for g in grants]})

    async def approve(self, request: web.Request) -> web.Response:
        return await self._decide(request, approve=True)

    async def deny(self, request: web.Request) -> web.Response:
        return await self._decide(request, approve=False)

    async def _decide(self, request: web.Request, *, approve: bool) -> web.Response:
        action = "approve" if approve else "deny"
        text = request.match_info["id"]
        person = request.get(PERSON_KEY)
        try:
            if not text.isdigit() or len(text) > MAX_GRANT_ID_DIGITS:
                raise bad_request("invalid_grant_id", f"{text[:40]!r} is not a grant id; outpostctl grant list "
                                  "shows them.")
            grant_id = int(text)
            if not isinstance(person, Person):
                raise ControllerError("person_required", f"A grant is {action}d by a person, an approver: sign in "
                                      "with outpostctl login (the admin credential cannot answer grants).", 403)
            grant = self.grants.get(grant_id)
            if grant is not None:
                await require_tenant(request, self.context, grant.tenant)
            decided = await API_POOL.run(self.grants.decide, grant_id, person.label, approve)
        except ControllerError as error:
            if error.status >= 500 or error.code == "role_required":
                raise  # the role check audited it already
            raise await self._refused(error, int(text) if text.isdigit() and len(text) <= MAX_GRANT_ID_DIGITS
                                      else text[:40], action) from None
        if decided.policy_id is not None:
            self.context.policy.announce_changed(decided.policy_id)
        return web.json_response(decided.to_json())
