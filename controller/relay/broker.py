"""Which tunnel hosts which service, for dials through this relay process."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from controller.relay.session import RelaySession

ServiceKey = tuple[str, str]  # (tenant, name)


def service_key(requested: str, default_tenant: str) -> ServiceKey:
    """``name`` means the caller's tenant; ``tenant/name`` names another."""
    tenant, _, name = requested.rpartition("/")
    return (tenant or default_tenant, name)


class Broker:
    """Bound services of the tunnels connected to this relay."""

    def __init__(self) -> None:
        # Dicts as ordered sets: the order tunnels bound in (aiming prefers the newest), and
        # unbinding one tunnel touches only its own keys. A scan of every key for each tunnel that
        # closed made a stop of n binding tunnels cost n * n.
        self._binders: dict[ServiceKey, dict[RelaySession, None]] = {}
        self._bound: dict[RelaySession, dict[ServiceKey, None]] = {}

    def bind(self, key: ServiceKey, session: RelaySession) -> None:
        self._binders.setdefault(key, {}).setdefault(session, None)
        self._bound.setdefault(session, {})[key] = None

    def unbind_all(self, session: RelaySession) -> None:
        for key in self._bound.pop(session, ()):
            sessions = self._binders[key]
            del sessions[session]
            if not sessions:
                del self._binders[key]

    def binder(self, key: ServiceKey) -> RelaySession | None:
        """The most recently bound live tunnel for ``key``, if any."""
        for session in reversed(self._binders.get(key, {})):
            if not session.conn.closed:
                return session
        return None

    def binders(self, key: ServiceKey) -> list[RelaySession]:
        """Every tunnel binding ``key``, in the order they bound (controller/relay/aiming.py chooses)."""
        return list(self._binders.get(key, ()))

    def bound_pairs(self) -> set[tuple[str, str, str]]:
        """(tenant, service, gateway ``tenant/name``) of every live bind (controller/relay/directory.py publishes them)."""
        return {(key[0], key[1], s.identity.label) for key, sessions in self._binders.items() for s in sessions
                if s.identity is not None and not s.conn.closed}

    def keys_bound_by(self, session: RelaySession) -> frozenset[ServiceKey]:
        return frozenset(self._bound.get(session, ()))

    def bound_services(self, session: RelaySession) -> list[str]:
        return sorted(f"{t}/{n}" for t, n in self._bound.get(session, ()))
