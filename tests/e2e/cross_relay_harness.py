"""One controller and two relay processes on one shared store (SQLite or PostgreSQL), a binder on relay B, a dialer on relay A."""

from __future__ import annotations

import json
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from controller.store import Store
from tests.e2e.harness import Process, free_port, read_status, wait_until
from tests.e2e.relay_harness import RelayProcess, RoleController
from tests.e2e.test_walking_skeleton import enroll_gateway, write_agent_config


def agent_config(path: Path, state: Path, relay: RelayProcess, binds: dict[str, int] | None = None,
                 dials: dict[str, int] | None = None, then: tuple[RelayProcess, ...] = ()) -> Path:
    """An agent config that prefers ``relay``, then ``then`` (the controller's list names every relay)."""
    return write_agent_config(path, state, binds, dials, prefer_relays=[r.address for r in (relay, *then)])


def start_agent_on(tmp_path: Path, name: str, state: Path, relay: RelayProcess, **kwargs: Any) -> Process:
    config = agent_config(tmp_path / f"{name}.toml", state, relay, **kwargs)
    agent = Process([sys.executable, "-m", "agent", "run", "--config", str(config)])
    wait_until(lambda: read_status(state).get("state") == "connected" and read_status(state).get("relay") == relay.url,
               what=f"{name} connected to relay {relay.name}")
    return agent


class StoreRelay(RelayProcess):
    """A relay process on the store ``store_url`` names (PostgreSQL), or on the controller's SQLite file (None)."""

    def __init__(self, controller: RoleController, tmp_path: Path, name: str, store_url: str | None = None) -> None:
        self.store_url = store_url
        super().__init__(controller, tmp_path, name)

    def argv(self, *extra: str) -> list[str]:
        argv = super().argv(*extra)
        if self.store_url is not None:
            argv[argv.index("--store") + 1] = self.store_url
        return argv


def controller_on(data: Path, store_url: str | None) -> RoleController:
    controller = RoleController(data, "controller", 0, *(("--store", store_url) if store_url else ()))
    controller.store_location = store_url or data / "store.sqlite3"  # type: ignore[attr-defined]
    return controller


def store_rows(controller: RoleController, sql: str, parameters: tuple[object, ...] = ()) -> list[tuple]:
    """Rows of the controller's store, on either engine (the store's own ``?`` dialect)."""
    store = Store(getattr(controller, "store_location", controller.data / "store.sqlite3"))
    try:
        return [tuple(row[key] for key in row.keys()) for row in store.query(sql, parameters)]
    finally:
        store.close()


def audit_events(controller: RoleController, event: str) -> list[dict]:
    return [json.loads(fields) for (fields,) in store_rows(
        controller, "SELECT fields FROM audit WHERE event = ? ORDER BY id", (event,))]


def hosted(controller: RoleController, relay: str, service: str) -> bool:
    return bool(store_rows(controller, "SELECT 1 FROM relay_services WHERE relay = ? AND service = ?",
                           (relay, service)))


__all__ = ["RelayProcess", "RoleController", "StoreRelay", "agent_config", "audit_events", "controller_on",
           "enroll_gateway", "hosted", "start_agent_on", "store_rows"]


def echoes(conn: socket.socket, byte: bytes) -> bool:
    """Whether one byte sent on a held dial comes back."""
    try:
        conn.sendall(byte)
        return conn.recv(1) == byte
    except OSError:
        return False


@dataclass
class TwoRelays:
    """A controller, relay B (the binders' side) and relay A (the dialers' side), and what a test started on them."""

    controller: RoleController
    relay_b: RelayProcess
    relay_a: RelayProcess
    agents: list[Process] = field(default_factory=list)
    held: list[socket.socket] = field(default_factory=list)
    #: Each gateway's state directory, by name.
    states: dict[str, Path] = field(default_factory=dict)

    def plc_across(self, tmp_path: Path, echo_port: int) -> int:
        """Service plc bound by gateway site on relay B and dialed by gateway central on relay A: the local
        port central dials it on, once relay B published it."""
        ctl = self.controller.ctl
        ctl("service", "create", "plc")
        ctl("policy", "create", "--kind", "bind", "--identities", "site", "--services", "plc")
        ctl("policy", "create", "--kind", "dial", "--identities", "central", "--services", "plc")
        site = self.states["site"] = enroll_gateway(self.controller, tmp_path, "site")
        central = self.states["central"] = enroll_gateway(self.controller, tmp_path, "central")
        port = free_port()
        self.agents.append(start_agent_on(tmp_path, "site", site, self.relay_b, binds={"plc": echo_port}))
        self.agents.append(start_agent_on(tmp_path, "central", central, self.relay_a, dials={"plc": port}))
        wait_until(lambda: hosted(self.controller, self.relay_b.name, "plc"), what="relay B publishing plc")
        return port


@contextmanager
def two_relays(tmp_path: Path, controller: RoleController, relay_b_kind: type[RelayProcess] = RelayProcess,
               relay_a_kind: type[RelayProcess] = RelayProcess) -> Iterator[TwoRelays]:
    """Relays rb and ra started on ``controller``; every dial, agent and process stopped at the end, whatever
    happened, and their last output printed when the test failed."""
    relays: list[RelayProcess] = []
    agents: list[Process] = []
    held: list[socket.socket] = []
    try:
        relays.append(relay_b_kind(controller, tmp_path, "rb"))
        relays.append(relay_a_kind(controller, tmp_path, "ra"))
        yield TwoRelays(controller, relays[0], relays[1], agents, held)
    except BaseException:
        for process in [*(r.process for r in relays), *agents, controller.process]:
            print(process.output[-3000:])
        raise
    finally:
        for conn in held:
            conn.close()
        for agent in agents:
            agent.stop()
        for relay in relays:
            relay.process.stop()
        controller.process.stop()
