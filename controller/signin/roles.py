"""Which role each management route needs, and whether a caller's grants give it in a tenant.

The table is the whole policy of the management API: a route missing from
it is refused to every person (the admin credential passes everything), so
a new route is closed until it is given a role here.
"""

from __future__ import annotations

from collections.abc import Iterable

from controller.errors import ControllerError
from controller.signin.config import Grant

#: Who holds each role a route can need: admin does everything; operators and
#: auditors read the fleet and the audit; operators also connect (a session
#: certificate as themselves); approvers approve grants.
HOLDERS: dict[str, frozenset[str]] = {
    "admin": frozenset({"admin"}),
    "auditor": frozenset({"admin", "auditor", "operator"}),
    "operator": frozenset({"admin", "operator"}),
    "approver": frozenset({"admin", "approver"}),
}

#: (method, route) -> (the role it needs, what it does, as the refusal names it).
ROUTE_ROLES: dict[tuple[str, str], tuple[str, str]] = {
    ("POST", "/api/v1/identities"): ("admin", "Creating an identity"),
    ("GET", "/api/v1/identities"): ("auditor", "Listing identities"),
    ("GET", "/api/v1/identities/{name}"): ("auditor", "Reading an identity"),
    ("POST", "/api/v1/identities/{name}/token"): ("admin", "Creating an enrollment token"),
    ("POST", "/api/v1/identities/{name}/revoke"): ("admin", "Revoking an identity"),
    ("POST", "/api/v1/identities/{name}/disable"): ("admin", "Disabling an identity"),
    ("POST", "/api/v1/identities/{name}/enable"): ("admin", "Enabling an identity"),
    ("POST", "/api/v1/identities/{name}/session"): ("operator", "Getting a session certificate"),
    ("POST", "/api/v1/services"): ("admin", "Creating a service"),
    ("GET", "/api/v1/services"): ("auditor", "Listing services"),
    ("POST", "/api/v1/policies"): ("admin", "Creating a policy"),
    ("GET", "/api/v1/policies"): ("auditor", "Listing policies"),
    ("PATCH", "/api/v1/policies/{id}"): ("admin", "Updating a policy"),
    ("DELETE", "/api/v1/policies/{id}"): ("admin", "Deleting a policy"),
    ("GET", "/api/v1/audit"): ("auditor", "Reading the audit log"),
    ("GET", "/api/v1/status"): ("auditor", "Reading the tunnel status"),
    ("GET", "/api/v1/audit/verify"): ("auditor", "Verifying the audit chain"),
    ("GET", "/api/v1/connections"): ("auditor", "Reading connection records"),
    ("GET", "/api/v1/fleet"): ("auditor", "Listing the fleet"),
    ("POST", "/api/v1/relays"): ("admin", "Adding a relay"),
    ("GET", "/api/v1/relays"): ("auditor", "Listing relays"),
    ("POST", "/api/v1/relays/{name}/retire"): ("admin", "Retiring a relay"),
    ("POST", "/api/v1/relays/{name}/revoke"): ("admin", "Revoking a relay"),
    ("GET", "/api/v1/fleet/{name}"): ("auditor", "Reading a gateway's presence"),
    ("GET", "/api/v1/policies/explain"): ("auditor", "Explaining a policy decision"),
    ("POST", "/api/v1/grants"): ("operator", "Requesting a grant"),
    ("GET", "/api/v1/grants"): ("", "Listing grants"),
    ("POST", "/api/v1/grants/{id}/approve"): ("approver", "Approving a grant"),
    ("POST", "/api/v1/grants/{id}/deny"): ("approver", "Denying a grant"),
    ("GET", "/api/v1/signin/whoami"): ("", "Asking who you are"),
    ("POST", "/api/v1/signin/logout"): ("", "Signing out"),
}


def holds(grants: Iterable[Grant], role: str, tenant: str | None) -> Grant | None:
    """The grant that gives ``role`` in ``tenant`` (None: in every tenant), or None."""
    holders = HOLDERS[role]
    usable = [g for g in grants if g.role in holders and (g.tenant is None or g.tenant == tenant)]
    # The narrowest grant is the one named in the audit: the least privilege actually used.
    usable.sort(key=lambda g: (g.tenant is None, g.role != role))
    return usable[0] if usable else None


def tenants_with(grants: Iterable[Grant], role: str) -> set[str] | None:
    """The tenants where ``grants`` give ``role``: None for every tenant."""
    holders = HOLDERS[role]
    tenants: set[str] = set()
    for grant in grants:
        if grant.role in holders:
            if grant.tenant is None:
                return None
            tenants.add(grant.tenant)
    return tenants


def refusal(what: str, role: str, tenant: str | None, grants: tuple[Grant, ...]) -> ControllerError:
    where = f" in tenant {tenant}" if tenant is not None else ""
    have = ", ".join(str(g) for g in grants) or "no role (none of your groups is mapped to one in [signin.roles])"
    return ControllerError("role_required", f"{what} needs the {role} role{where}; you have {have}.", 403)
