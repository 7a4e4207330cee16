"""The role table: every management route has its role, and docs/people.md shows the table as it is."""

from __future__ import annotations

import re
from pathlib import Path

from aiohttp import web

from controller.api import ManagementApi
from controller.audit_api import AuditApi
from controller.fleet_api import FleetApi
from controller.grants_api import GrantsApi
from controller.policy_admin import PolicyAdminApi
from controller.policy_api import PolicyExplainApi
from controller.relays_api import RelaysApi
from controller.signin.api import OPEN_ROUTES, SigninApi
from controller.signin.config import Grant
from controller.signin.roles import ROUTE_ROLES, holds, tenants_with

DOC = Path(__file__).resolve().parents[2] / "docs" / "people.md"


def test_every_management_route_has_a_role_and_the_doc_lists_each() -> None:
    app = web.Application()
    ManagementApi(None, lambda: []).add_routes(app)  # type: ignore[arg-type]
    SigninApi(None).add_routes(app)  # type: ignore[arg-type]
    # Every API the server mounts (controller/routes.py build_app): none may add a route without a role.
    FleetApi(None, None).add_routes(app)  # type: ignore[arg-type]
    PolicyExplainApi(None).add_routes(app)  # type: ignore[arg-type]
    PolicyAdminApi(None).add_routes(app)  # type: ignore[arg-type]
    AuditApi(None).add_routes(app)  # type: ignore[arg-type]
    GrantsApi.add_routes(GrantsApi.__new__(GrantsApi), app)
    RelaysApi(None).add_management_routes(app)  # type: ignore[arg-type]
    routes = {(r.method, r.resource.canonical) for r in app.router.routes()
              if r.resource is not None and r.method != "HEAD" and r.resource.canonical not in OPEN_ROUTES}
    assert routes == set(ROUTE_ROLES)
    rows = set(re.findall(r"^\| `(\w+) (/api/\S+)` \| (.+?) \| (.+?) \|$", DOC.read_text(), re.MULTILINE))
    expected = {(m, p, what, role or "any signed-in person") for (m, p), (role, what) in ROUTE_ROLES.items()}
    assert rows == expected


def test_a_tenant_scoped_grant_holds_in_its_tenant_only() -> None:
    grants = (Grant("admin", "acme"), Grant("auditor"))
    assert holds(grants, "admin", "acme") == Grant("admin", "acme")
    assert holds(grants, "admin", "default") is None
    assert holds(grants, "auditor", "default") == Grant("auditor")
    # The narrowest grant that suffices is the one named as used.
    assert holds(grants, "auditor", "acme") == Grant("admin", "acme")
    assert tenants_with(grants, "admin") == {"acme"} and tenants_with(grants, "auditor") is None
