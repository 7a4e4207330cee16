"""Relays over HTTP: ``/v1/relays/enroll`` and ``/renew`` for relay processes, ``/api/v1/relays`` for operators."""

from __future__ import annotations

import base64
from typing import Any

from aiohttp import web

from controller.api import read_json
from controller.blocking import API_POOL
from controller.context import ControllerContext
from controller.relays import REVOKED, RelayBook, RelayIssued

RELAY_ENROLL_PATH = "/v1/relays/enroll"
RELAY_RENEW_PATH = "/v1/relays/renew"


def relay_book(context: ControllerContext) -> RelayBook:
    return RelayBook(context.store, context.ca, context.audit, context.settings.relay_cert_lifetime)


class RelaysApi:
    """Relay enrollment and renewal (the token or the relay's key is the proof), and the operators' commands."""

    def __init__(self, context: ControllerContext) -> None:
        self.context = context

    @property
    def book(self) -> RelayBook:
        return relay_book(self.context)

    def add_gateway_routes(self, app: web.Application) -> None:
        app.router.add_post(RELAY_ENROLL_PATH, self.enroll)
        app.router.add_post(RELAY_RENEW_PATH, self.renew)

    def add_management_routes(self, app: web.Application) -> None:
        app.router.add_post("/api/v1/relays", self.add)
        app.router.add_get("/api/v1/relays", self.list_relays)
        app.router.add_post("/api/v1/relays/{name}/retire", self.retire)
        app.router.add_post("/api/v1/relays/{name}/revoke", self.revoke)

    def _answer(self, issued: RelayIssued, *, with_audit_key: bool) -> dict[str, Any]:
        answer: dict[str, Any] = {"relay": issued.name, "address": issued.address,
                                  "certificate": issued.certificate_pem, "ca": self.context.ca.certificate_pem,
                                  "not_after": issued.not_after}
        if with_audit_key:
            # The relay appends its tunnels' events to the one audit chain, so it holds its key (docs/deployment.md).
            answer["audit_key"] = base64.b64encode(self.context.audit.chain_key).decode("ascii")
        return answer

    async def enroll(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        issued = await API_POOL.run(self.book.enroll, body.get("relay"), body.get("secret"), body.get("csr"),
                                    remote=request.remote)
        return web.json_response(self._answer(issued, with_audit_key=True))

    async def renew(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        issued = await API_POOL.run(self.book.renew, body.get("csr"), remote=request.remote)
        return web.json_response(self._answer(issued, with_audit_key=False))

    async def add(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        token = await API_POOL.run(self.book.add, body.get("name"), body.get("address"),
                                   self.context.settings.base_url)
        return web.json_response({"name": body.get("name"), "token": token}, status=201)

    async def list_relays(self, request: web.Request) -> web.Response:
        return web.json_response({"relays": self.book.all_relays()})

    async def retire(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        await API_POOL.run(self.book.retire, name)
        return web.json_response({"name": name, "status": "retired"})

    async def revoke(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        await API_POOL.run(self.book.retire, name, REVOKED)
        return web.json_response({"name": name, "status": REVOKED})
