"""``GET /api/v1/policies/explain``: would a dial or bind be allowed, and which policies decide it.

The answer comes from ``PolicyEngine.explain``, the very function the
relay's decisions call, after the same service lookup the relay does (a name
without a tenant means the identity's tenant): the explanation and the
decision cannot disagree.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from controller.context import ControllerContext
from controller.errors import bad_request, not_found
from controller.names import DEFAULT_TENANT, check_name
from controller.policy import KINDS
from controller.relay.aiming import split_aim
from controller.signin.api import require_tenant

EXPLAIN_PARAMETERS = frozenset({"identity", "service", "kind", "session"})


def _split(text: str, default_tenant: str, what: str) -> tuple[str, str]:
    tenant, _, name = text.rpartition("/")
    return (check_name(tenant, "tenant") if tenant else default_tenant), check_name(name, what)


class PolicyExplainApi:
    def __init__(self, context: ControllerContext) -> None:
        self.context = context

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/api/v1/policies/explain", self.explain)

    async def explain(self, request: web.Request) -> web.Response:
        query = request.query
        unknown = sorted(set(query) - EXPLAIN_PARAMETERS)
        if unknown:
            raise bad_request("invalid_parameter", f"Unknown query parameter {unknown[0]!r}; this takes "
                              f"{', '.join(sorted(EXPLAIN_PARAMETERS))}.")
        if "identity" not in query or "service" not in query:
            raise bad_request("invalid_parameter", "Name the identity and the service: "
                              "?identity=[TENANT/]NAME&service=[TENANT/]NAME.")
        kinds = KINDS if "kind" not in query else (query["kind"],)
        if kinds[0] not in KINDS:
            raise bad_request("invalid_kind", f"The kind must be dial or bind, not {query['kind'][:40]!r}.")
        session = query.get("session", "false")
        if session not in ("true", "false"):
            raise bad_request("invalid_parameter", "session must be true or false.")
        tenant, name = _split(query["identity"], DEFAULT_TENANT, "identity name")
        await require_tenant(request, self.context, tenant)
        registry = self.context.registry
        identity = registry.get_identity(tenant, name)
        if identity is None:
            raise not_found("identity_unknown", f"There is no identity {tenant}/{name}; check the name and tenant.")
        (service_tenant, service_name), gateway_name, port = split_aim(query["service"], identity.tenant)
        check_name(service_tenant, "tenant")
        check_name(service_name, "service name")
        service = registry.get_service(service_tenant, service_name)
        gateway = None
        if gateway_name is not None:
            gateway = registry.get_identity(service_tenant, check_name(gateway_name, "gateway name"))
            if gateway is None:
                raise not_found("identity_unknown", f"There is no gateway {service_tenant}/{gateway_name}; check "
                                "the name after @.")
        answer: dict[str, Any] = {"identity": identity.label, "service": f"{service_tenant}/{service_name}",
                                  "decisions": {}}
        policies = {p.id: p.to_json() for p in self.context.policy.list()}
        for kind in kinds:
            if service is None:
                # What the relay answers a dial or bind of a name no controller holds.
                answer["decisions"][kind] = {"allowed": False, "reason": f"no service named {service_tenant}/"
                                             f"{service_name}", "policy": None, "allowing": [], "foreign": [],
                                             "blocked": None}
                continue
            explanation = self.context.policy.explain(kind, identity, service, gateway=gateway, port=port,
                                                      session_certificate=session == "true")
            answer["decisions"][kind] = explanation.to_json()
        used = {pid for d in answer["decisions"].values() for pid in d["allowing"] + d["foreign"]}
        answer["policies"] = [policies[pid] for pid in sorted(used) if pid in policies]
        return web.json_response(answer)
