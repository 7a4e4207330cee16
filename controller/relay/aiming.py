"""Which gateway serves a dial: ``SERVICE@GATEWAY`` names it; a plain ``SERVICE`` takes the one gateway bound.

With several gateways bound, a plain dial is refused with the choices the
dialer may make (the gateways a policy lets it reach), unless the service
was created with ``choose any``: then the latest bound of those serves it.
The decision is made for the gateway that would serve (a policy may allow
``modbus@gw-0042`` or ``modbus@role:edge`` only), and it is the decision
``policy explain`` gives for ``SERVICE@GATEWAY``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from controller.names import NAME_PATTERN
from controller.policy_selectors import split_aimed
from controller.relay.broker import ServiceKey, service_key
from shared.protocol import ErrorCode

if TYPE_CHECKING:
    from controller.relay.session import RelaySession

#: Gateways a refusal lists: enough to pick from, short enough for one line of the audit and of a terminal.
MAX_NAMED_CHOICES = 8


def split_aim(requested: str, default_tenant: str) -> tuple[ServiceKey, str | None, int | None]:
    """(service key, gateway name or None, port or None) of ``[TENANT/]SERVICE[:PORT][@GATEWAY]``."""
    service, port, gateway = split_aimed(requested)
    return service_key(service, default_tenant), gateway, port


@dataclass(frozen=True)
class DialChoice:
    allowed: bool
    #: Which policy allowed it, or why it is refused (one sentence, as the dialer and the audit read it).
    reason: str
    key: ServiceKey
    policy: int | None = None
    #: The tunnel of the gateway that serves it; None when none is connected (``unavailable`` says so).
    binder: RelaySession | None = None
    code: ErrorCode = ErrorCode.POLICY_DENIED
    unavailable: str = ""
    #: The declared port dialed (the gateway's ``[[bind]]`` maps it); None for the service's own target.
    port: int | None = None


def choose(session: RelaySession, requested: str, candidates: list[RelaySession]) -> DialChoice:
    """Decide a dial of ``requested`` by ``session``'s identity among the tunnels binding it (worker thread)."""
    context = session.context
    key, gateway_name, port = split_aim(requested, session.admitted.tenant)
    service = context.registry.get_service(*key)
    if service is None:
        return DialChoice(False, f"no service named {key[0]}/{key[1]}", key, code=ErrorCode.SERVICE_UNKNOWN)
    if port is not None and port not in service.ports:
        declared = ", ".join(map(str, service.ports)) if service.ports else "none"
        return DialChoice(False, f"service {service.label} has no port {port}; its ports: {declared}", key,
                          code=ErrorCode.SERVICE_UNKNOWN)
    engine = context.policy
    live = [c for c in candidates if not c.conn.closed and c.identity is not None]
    certificate = session.session_certificate
    if gateway_name is not None:
        if not NAME_PATTERN.fullmatch(gateway_name):
            return DialChoice(False, f"{gateway_name[:63]!r} is not a gateway name; dial SERVICE@GATEWAY",
                              key, code=ErrorCode.SERVICE_UNKNOWN)
        gateway = context.registry.get_identity(key[0], gateway_name)
        decision = engine.decide("dial", session.admitted, service, gateway=gateway,
                                 port=port, session_certificate=certificate)
        if not decision.allowed:
            return DialChoice(False, decision.reason, key)
        binder = next((c for c in reversed(live) if gateway is not None and c.admitted.uri == gateway.uri), None)
        return DialChoice(True, decision.reason, key, decision.policy_id, binder,
                          unavailable=f"gateway {key[0]}/{gateway_name} does not host {key[0]}/{key[1]} now", port=port)
    gateways: dict[str, RelaySession] = {}
    for candidate in live:  # in the order bound: the latest of each gateway last
        gateways.pop(candidate.admitted.uri, None)
        gateways[candidate.admitted.uri] = candidate
    if len(gateways) <= 1:
        binder = next(iter(gateways.values()), None)
        decision = engine.decide("dial", session.admitted, service,
                                 gateway=None if binder is None else binder.admitted, port=port, session_certificate=certificate)
        if not decision.allowed and binder is not None:
            # The dialer named no gateway: the refusal names none either.
            reason = engine.explain("dial", session.admitted, service, port=port, session_certificate=certificate).decision.reason
            return DialChoice(False, reason, key)
        return DialChoice(decision.allowed, decision.reason, key, decision.policy_id, binder, port=port)
    reachable = [g for g in gateways.values()
                 if engine.explain("dial", session.admitted, service, gateway=g.admitted,
                                   port=port, session_certificate=certificate).decision.allowed]
    if not reachable:
        decision = engine.decide("dial", session.admitted, service, port=port, session_certificate=certificate)
        return DialChoice(False, decision.reason, key)
    if service.choose == "any":
        chosen = reachable[-1]
        decision = engine.decide("dial", session.admitted, service, gateway=chosen.admitted,
                                 port=port, session_certificate=certificate)
        return DialChoice(decision.allowed, decision.reason, key, decision.policy_id, chosen, port=port)
    name = (key[1] if key[0] == session.admitted.tenant else f"{key[0]}/{key[1]}") + (
        "" if port is None else f":{port}")
    choices = [f"{name}@{g.admitted.name}" for g in reachable]
    shown = ", ".join(choices[:MAX_NAMED_CHOICES]) + (
        f" and {len(choices) - MAX_NAMED_CHOICES} more" if len(choices) > MAX_NAMED_CHOICES else "")
    return DialChoice(
        False, f"service {key[0]}/{key[1]} is served by {len(gateways)} gateways; dial one of them: {shown} "
        f"(or let the service choose: outpostctl service create {key[1]} --choose any)", key,
        code=ErrorCode.SERVICE_UNAVAILABLE)
