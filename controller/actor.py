"""Who asked for a management action: the person or credential, the role used, the address."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from controller.request_keys import request_key


@dataclass(frozen=True)
class Actor:
    kind: str  # "admin" (the break-glass admin credential) or "person"
    name: str  # "admin" for the admin credential; the person's identity name otherwise
    role: str  # the role the action was allowed by ("admin" for the admin credential)
    remote: str  # the caller's address as the listener saw it

    def audit_fields(self) -> dict[str, str]:
        return {"actor": self.name, "actor_kind": self.kind, "actor_role": self.role, "remote": self.remote}


#: The request key under which the management API's authentication leaves the caller.
ACTOR_KEY: web.RequestKey[Actor] = request_key("actor")


def actor_of(request: web.Request) -> Actor:
    actor = request.get(ACTOR_KEY)
    if not isinstance(actor, Actor):
        raise RuntimeError("the management API's authentication did not run for this request")
    return actor
