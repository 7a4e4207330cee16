"""Policy selectors: ``NAME`` or ``role:ROLE``, optionally ``TENANT/``, and on the service side ``@GATEWAY``.

``modbus@gw-0042`` opens the ``modbus`` of gateway ``gw-0042`` only, and
``modbus@role:edge`` that of every gateway holding role ``edge``; a plain
``modbus`` opens it on whichever gateway serves it. The gateway part is a
name or a role of the policy's tenant unless it names one (``@acme/gw``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from controller.errors import bad_request
from controller.names import check_name
from controller.registry import Identity, Service

ROLE_PREFIX = "role:"
GATEWAY_MARK = "@"
#: ``SERVICE:PORT``: a selector or a dial naming one of the service's declared ports.
WITH_PORT = re.compile(r"^(.+):(\d{1,5})$")


@dataclass(frozen=True)
class Selector:
    """One parsed selector: a name or a role, in a tenant."""

    tenant: str
    value: str
    is_role: bool
    #: On a service selector: the gateway (a name or a role) whose service it opens; None for any.
    gateway: Selector | None = None
    #: On a service selector: the one declared port it opens; None for every port (and a dial naming none).
    port: int | None = None

    def matches(self, tenant: str, name: str, roles: tuple[str, ...]) -> bool:
        if tenant != self.tenant:
            return False
        return self.value in roles if self.is_role else self.value == name

    def matches_service(self, service: Service, gateway: Identity | None, port: int | None = None) -> bool:
        """The service matches, and so do the gateway and the port when the selector names them."""
        if not self.matches(service.tenant, service.name, service.roles):
            return False
        if self.port is not None and port != self.port:
            return False
        return self.gateway is None or (gateway is not None and
                                        self.gateway.matches(gateway.tenant, gateway.name, gateway.roles))

    def text(self, policy_tenant: str) -> str:
        """The selector as written, with the tenant prefix only where it differs."""
        body = self.value if self.tenant == policy_tenant else f"{self.tenant}/{self.value}"
        written = ROLE_PREFIX + body if self.is_role else body
        if self.port is not None:
            written = f"{written}:{self.port}"
        return written if self.gateway is None else f"{written}{GATEWAY_MARK}{self.gateway.text(policy_tenant)}"


def split_aimed(text: str) -> tuple[str, int | None, str | None]:
    """(service, port or None, gateway or None) of ``SERVICE[:PORT][@GATEWAY]``, none of the parts checked.

    One reading for a policy's service selectors and a dial's aim (controller/relay/aiming.py).
    """
    service, mark, gateway = text.partition(GATEWAY_MARK)
    ported = WITH_PORT.match(service)
    port = None
    if ported is not None:
        service, port = ported.group(1), int(ported.group(2))
    return service, port, (gateway if mark else None)


def parse_selector(text: object, policy_tenant: str, *, aimed: bool = False) -> Selector:
    """Parse one selector; 400 ``invalid_selector`` with the rule when it is malformed.

    ``aimed``: a service selector, which may name a gateway after ``@``.
    """
    if not isinstance(text, str):
        raise bad_request("invalid_selector", "Each selector must be a string such as \"ops\" or \"role:plc\".")
    if GATEWAY_MARK in text and not aimed:
        raise bad_request("invalid_selector", f"The selector {text[:80]!r} names a gateway; only a service "
                          "selector may (SERVICE@GATEWAY).")
    if aimed:
        service, port, gateway = split_aimed(text)
        if gateway is not None and GATEWAY_MARK in gateway:
            raise bad_request("invalid_selector", f"The selector {text[:80]!r} names more than one gateway; write "
                              "SERVICE@GATEWAY or SERVICE@role:ROLE.")
        if port is not None and not 1 <= port <= 65535:
            raise bad_request("invalid_selector", f"The selector {text.partition(GATEWAY_MARK)[0][:80]!r} names "
                              f"port {port}; a port is 1-65535.")
        selector = parse_selector(service, policy_tenant)
        return replace(selector, port=port, gateway=None if gateway is None else parse_selector(gateway, policy_tenant))
    is_role = text.startswith(ROLE_PREFIX)
    body = text[len(ROLE_PREFIX):] if is_role else text
    tenant, _, value = body.rpartition("/")
    if "/" in tenant:
        raise bad_request(
            "invalid_selector", f"The selector {text!r} is not valid; write NAME, TENANT/NAME, role:ROLE or role:TENANT/ROLE."
        )
    tenant = check_name(tenant, "tenant") if tenant else policy_tenant
    check_name(value, "role" if is_role else "name")
    return Selector(tenant=tenant, value=value, is_role=is_role)
