"""``/api/v1/fleet``: every identity with its presence and its agent's report, filtered (management API).

Filters come as query parameters; a parameter this endpoint does not know,
or a value it cannot read, is a 400 with a sentence saying what to send
instead, never silently ignored (a typo would otherwise widen the answer).
"""

from __future__ import annotations

import json
import math
import time

from aiohttp import web

from controller.blocking import API_POOL
from controller.context import ControllerContext
from controller.errors import bad_request, not_found
from controller.fleet import PRESENCE_STATES, FleetFilter, fleet, own_view
from controller.names import DEFAULT_TENANT, check_name
from controller.presence import PresenceBook
from controller.signin.api import tenant_scope

FLEET_PARAMETERS = frozenset({"presence", "expiring_within", "tenant", "role"})
#: ``expiring_within`` at most this many seconds (ten years): past it the
#: filter would keep every certificate, and a number that large is a typo.
MAX_EXPIRING_WITHIN = 10 * 365 * 86400


def fleet_filter(query: web.Request) -> FleetFilter:
    """The filter of a request's query; 400 for an unknown parameter or a bad value."""
    params = query.query
    unknown = sorted(set(params) - FLEET_PARAMETERS)
    if unknown:
        raise bad_request("invalid_parameter", f"Unknown query parameter {unknown[0]!r}; the fleet takes "
                          f"{', '.join(sorted(FLEET_PARAMETERS))}.")
    presence = None
    if "presence" in params:
        states = frozenset(s.strip() for s in params["presence"].split(",") if s.strip())
        wrong = sorted(states - set(PRESENCE_STATES))
        if wrong or not states:
            raise bad_request("invalid_presence", f"Unknown presence {(wrong or [''])[0]!r}; use one or more of "
                              f"{', '.join(PRESENCE_STATES)}, separated by commas.")
        presence = states
    expiring = None
    if "expiring_within" in params:
        raw = params["expiring_within"]
        try:
            expiring = float(raw)
        except ValueError:
            expiring = math.nan
        if not (0 <= expiring <= MAX_EXPIRING_WITHIN):
            raise bad_request("invalid_expiring_within", f"expiring_within must be a number of seconds from 0 to "
                              f"{MAX_EXPIRING_WITHIN}, not {raw[:40]!r}.")
    tenant = check_name(params["tenant"], "tenant") if "tenant" in params else None
    role = check_name(params["role"], "role") if "role" in params else None
    return FleetFilter(presence=presence, expiring_within=expiring, tenant=tenant, role=role)


class FleetApi:
    """The fleet view's endpoints; reads only, on the event loop's own store connection."""

    def __init__(self, context: ControllerContext, book: PresenceBook) -> None:
        self.context = context
        self.book = book

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/api/v1/fleet", self.list)
        app.router.add_get("/api/v1/fleet/{name}", self.show)

    async def list(self, request: web.Request) -> web.Response:
        keep = fleet_filter(request)
        scope = tenant_scope(request)  # a tenant-scoped role sees only its tenants
        own = own_view(self.book)  # on the loop; the store reads, the merge and the JSON in a worker thread

        def answer() -> bytes:
            now = time.time()
            identities = [i for i in self.context.registry.list_identities(keep.tenant)
                          if scope is None or i.tenant in scope]
            entries = fleet(self.context.store, identities, own, keep, now)
            return json.dumps({"now": now, "identities": entries}, separators=(",", ":")).encode()

        # A fleet of 10,000 takes a few hundred milliseconds to read and encode: never on the tunnels' loop.
        body = await API_POOL.run(answer)
        return web.Response(body=body, content_type="application/json")

    async def show(self, request: web.Request) -> web.Response:
        unknown = sorted(set(request.query) - {"tenant"})
        if unknown:
            raise bad_request("invalid_parameter", f"Unknown query parameter {unknown[0]!r}; this takes tenant.")
        tenant = check_name(request.query.get("tenant", DEFAULT_TENANT), "tenant")
        name = check_name(request.match_info["name"], "identity name")
        identity = self.context.registry.get_identity(tenant, name)
        if identity is None:
            raise not_found("identity_unknown", f"There is no identity {tenant}/{name}; check the name and tenant.")
        now = time.time()
        [entry] = fleet(self.context.store, [identity], self.book, now=now)
        return web.json_response({"now": now, **entry})
