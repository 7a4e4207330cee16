"""Names of identities, services, tenants and roles, and the URIs built from them."""

from __future__ import annotations

import re

from controller.errors import bad_request

#: One DNS label: fits in a SPIFFE path segment, a certificate CN and a shell
#: argument without quoting.
NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
#: Tenant used when a request names none.
DEFAULT_TENANT = "default"
SPIFFE_SCHEME = "spiffe://"


def check_name(value: object, what: str) -> str:
    """Return ``value`` if it is a valid name, else raise a 400 saying the rule."""
    if not isinstance(value, str) or not NAME_PATTERN.fullmatch(value):
        shown = value if isinstance(value, str) and len(value) <= 80 else "this value"
        raise bad_request(
            "invalid_name",
            f"The {what} {shown!r} is not valid; use 1 to 63 lowercase letters, digits or hyphens, "
            "starting with a letter or digit.",
        )
    return value


def check_roles(value: object) -> tuple[str, ...]:
    """A list of role names, deduplicated and sorted so equal sets compare equal."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise bad_request("invalid_roles", "The roles must be a list of names, for example [\"plc\"].")
    return tuple(sorted({check_name(role, "role") for role in value}))


def identity_uri(trust_domain: str, tenant: str, name: str) -> str:
    """``spiffe://<trust-domain>/<tenant>/<name>``: the identity in certificates."""
    return f"{SPIFFE_SCHEME}{trust_domain}/{tenant}/{name}"


def parse_identity_uri(trust_domain: str, uri: str) -> tuple[str, str] | None:
    """(tenant, name) from a URI of this trust domain, or None for anything else."""
    prefix = f"{SPIFFE_SCHEME}{trust_domain}/"
    if not uri.startswith(prefix):
        return None
    parts = uri[len(prefix):].split("/")
    if len(parts) != 2 or not all(NAME_PATTERN.fullmatch(p) for p in parts):
        return None
    return parts[0], parts[1]
