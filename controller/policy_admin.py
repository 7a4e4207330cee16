"""``PATCH`` and ``DELETE /api/v1/policies/{id}``: a policy's new version, or its end.

A refusal (an unknown id, a duration that does not parse, a time in the
past, an update that lost a race) changes nothing and leaves one
``policy_refused`` row naming the caller's sentence; a tenant admin naming
another tenant's policy is refused by the role check, which audits it.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from controller.api import read_json
from controller.blocking import API_POOL
from controller.context import ControllerContext
from controller.errors import ControllerError, bad_request, not_found
from controller.signin.api import require_tenant

#: A policy id fits a 64-bit sequence; a longer string of digits is a typo, refused before any lookup.
MAX_POLICY_ID_DIGITS = 18


def policy_id_of(request: web.Request) -> int:
    text = request.match_info["id"]
    if not text.isdigit() or len(text) > MAX_POLICY_ID_DIGITS:
        raise bad_request("invalid_policy_id", f"{text[:40]!r} is not a policy id; outpostctl policy list shows them.")
    return int(text)


class PolicyAdminApi:
    def __init__(self, context: ControllerContext) -> None:
        self.context = context

    def add_routes(self, app: web.Application) -> None:
        app.router.add_patch("/api/v1/policies/{id}", self.update)
        app.router.add_delete("/api/v1/policies/{id}", self.delete)

    async def _refused(self, error: ControllerError, action: str, policy_id: object) -> ControllerError:
        await API_POOL.run(self.context.audit.record, "policy_refused", action=action, id=policy_id,
                           code=error.code, reason=error.message)
        return error

    async def _policy_tenant(self, request: web.Request, policy_id: int, action: str) -> None:
        policy = self.context.policy.get(policy_id)
        if policy is None:
            raise await self._refused(not_found(
                "policy_unknown", f"There is no policy {policy_id}; outpostctl policy list shows them."),
                action, policy_id)
        await require_tenant(request, self.context, policy.tenant)

    async def update(self, request: web.Request) -> web.Response:
        try:
            policy_id = policy_id_of(request)
            body = await read_json(request)
        except ControllerError as error:
            raise await self._refused(error, "update", request.match_info["id"][:40]) from None
        await self._policy_tenant(request, policy_id, "update")
        try:
            old, new = await API_POOL.run(self.context.policy.update, policy_id, body)
        except ControllerError as error:
            if error.status >= 500:
                raise
            raise await self._refused(error, "update", policy_id) from None
        answer: dict[str, Any] = new.to_json()
        answer["previous_version"] = old.version
        return web.json_response(answer)

    async def delete(self, request: web.Request) -> web.Response:
        try:
            policy_id = policy_id_of(request)
        except ControllerError as error:
            raise await self._refused(error, "delete", request.match_info["id"][:40]) from None
        await self._policy_tenant(request, policy_id, "delete")
        try:
            policy = await API_POOL.run(self.context.policy.delete, policy_id)
        except ControllerError as error:
            if error.status >= 500:
                raise
            raise await self._refused(error, "delete", policy_id) from None
        return web.json_response(policy.to_json())
