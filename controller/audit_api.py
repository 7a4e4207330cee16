"""``/api/v1/audit`` (filters, paging, follow), ``/api/v1/connections`` and ``/api/v1/audit/verify``."""

from __future__ import annotations

import asyncio

from aiohttp import web

from controller.audit_chain import parse_checkpoint, rows_of, verify
from controller.audit_query import AuditFilter, any_after, audit_page, parse_filter
from controller.blocking import API_POOL
from controller.connections import connections_page
from controller.context import ControllerContext
from controller.errors import ControllerError, bad_request, conflict

#: The longest a follow request waits for a new event before answering empty:
#: below the idle timeouts of proxies and of outpostctl's own request timeout.
MAX_FOLLOW_WAIT_SECONDS = 30
#: How often a waiting follow request looks for new events: one indexed
#: read, so at most 60 cheap reads per request, and a SIEM sees an
#: event within half a second.
FOLLOW_POLL_SECONDS = 0.5

#: Follow requests one process holds at once: a few SIEM shippers and
#: operators' terminals; each polls the store, so a runaway script opening
#: more is told to slow down instead of multiplying the polling.
MAX_FOLLOWERS = 16

_FILTERS = frozenset({"identity", "service", "since", "denied", "limit", "before"})
AUDIT_PARAMETERS = _FILTERS | {"correlation", "after", "wait"}
CONNECTION_PARAMETERS = _FILTERS


class AuditApi:
    def __init__(self, context: ControllerContext) -> None:
        self.context = context
        # A verification reads the whole trail: one at a time per process, so the API's workers stay free.
        self._verifying = asyncio.Lock()
        self._followers = 0

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/api/v1/audit", self.audit)
        app.router.add_get("/api/v1/connections", self.connections)
        app.router.add_get("/api/v1/audit/verify", self.verify)

    async def audit(self, request: web.Request) -> web.Response:
        where = parse_filter(request.query, AUDIT_PARAMETERS)
        wait = request.query.get("wait")
        if wait is not None:
            if where.after is None:
                raise bad_request("wait_without_after", "wait follows the events after a cursor; give after=ID too.")
            if not wait.isdigit() or int(wait) > MAX_FOLLOW_WAIT_SECONDS:
                raise bad_request("invalid_wait", f"wait must be a whole number of seconds up to "
                                  f"{MAX_FOLLOW_WAIT_SECONDS}.")
            if self._followers >= MAX_FOLLOWERS:
                raise ControllerError("too_many_followers", f"{MAX_FOLLOWERS} requests already follow the audit "
                                      "trail; stop one or follow less often.", 429)
            self._followers += 1
            try:
                await self._wait_for_events(where, int(wait))
            finally:
                self._followers -= 1
        page = await API_POOL.run(audit_page, self.context.store, where)
        return web.json_response(page)

    async def _wait_for_events(self, where: AuditFilter, wait: int) -> None:
        """Until an event the filters match is recorded after the cursor, or ``wait`` seconds passed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while not any_after(self.context.store, where) and loop.time() < deadline:
            await asyncio.sleep(min(FOLLOW_POLL_SECONDS, max(0.0, deadline - loop.time())))

    async def connections(self, request: web.Request) -> web.Response:
        where = parse_filter(request.query, CONNECTION_PARAMETERS)
        page = await API_POOL.run(connections_page, self.context.store, where)
        return web.json_response(page)

    async def verify(self, request: web.Request) -> web.Response:
        """Walk the hash chain (and the checkpoints given); ``ok`` false names the first bad event."""
        unknown = sorted(set(request.query) - {"checkpoint"})
        if unknown:
            raise bad_request("unknown_parameter", f"Unknown query parameter {unknown[0][:40]!r}; this endpoint "
                              "takes checkpoint (ID:MAC, repeatable).")
        checkpoints = [parse_checkpoint(text) for text in request.query.getall("checkpoint", [])]
        if self._verifying.locked():
            raise conflict("verify_running", "A verification of the audit trail is already running; wait for it.")
        async with self._verifying:
            result = await API_POOL.run(verify, rows_of(self.context.store), self.context.audit.chain_key,
                                        checkpoints)
        return web.json_response(result.to_json())
