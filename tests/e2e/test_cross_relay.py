"""Dials across relays: a dial at relay A reaches a gateway bound at relay B over one link between them."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tests.controller.postgres_harness import postgres, postgres_url  # noqa: F401
from tests.e2e.cross_relay_harness import (
    RelayProcess,
    StoreRelay,
    audit_events,
    controller_on,
    enroll_gateway,
    hosted,
    start_agent_on,
)
from tests.e2e.harness import EchoServer, free_port, read_status, round_trip, wait_until

MIB = 1024 * 1024


def on_relay(state: Path, relay: RelayProcess) -> bool:
    status = read_status(state)
    return status.get("state") == "connected" and status.get("relay") == relay.url


def refused_dial(port: int) -> bool:
    """True when a dial through ``port`` gets no echo (the relay reset it)."""
    try:
        return round_trip(port, b"ping", timeout=30) != b"ping"
    except OSError:
        return True


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.slow)])
def store_url(request: pytest.FixtureRequest) -> str | None:
    """None: the controller's SQLite file, shared by the three processes; else a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return None
    url: str = request.getfixturevalue("postgres_url")
    return url


def test_a_dial_at_relay_a_reaches_a_gateway_bound_at_relay_b(tmp_path: Path, echo_server: EchoServer,
                                                               store_url: str | None) -> None:
    controller = controller_on(tmp_path / "controller", store_url)
    relays: list[RelayProcess] = []
    agents = []
    try:
        relay_b = StoreRelay(controller, tmp_path, "rb", store_url)
        relay_a = StoreRelay(controller, tmp_path, "ra", store_url)
        relay_c = StoreRelay(controller, tmp_path, "rc", store_url)
        relays += [relay_a, relay_b, relay_c]
        controller.ctl("service", "create", "telemetry")
        controller.ctl("policy", "create", "--kind", "bind", "--identities", "site-a", "--services", "telemetry")
        controller.ctl("policy", "create", "--kind", "dial", "--identities", "central", "--services", "telemetry")
        host_state = enroll_gateway(controller, tmp_path, "site-a")
        dial_state = enroll_gateway(controller, tmp_path, "central")
        port, aimed = free_port(), free_port()
        agents.append(start_agent_on(tmp_path, "site-a", host_state, relay_b, binds={"telemetry": echo_server.port},
                                     then=(relay_c,)))
        agents.append(start_agent_on(tmp_path, "central", dial_state, relay_a,
                                     dials={"telemetry": port, "telemetry@site-a": aimed}))
        wait_until(lambda: hosted(controller, "rb", "telemetry"), what="rb publishing telemetry")

        assert round_trip(port, b"hello across relays") == b"hello across relays"
        payload = os.urandom(MIB)
        assert round_trip(port, payload, timeout=30) == payload
        assert round_trip(aimed, b"aimed") == b"aimed"  # SERVICE@GATEWAY across relays

        # Decided once, at A; served at B under the same correlation id; one link for all three dials.
        wait_until(lambda: len(audit_events(controller, "dial_served")) >= 6, what="the served rows")
        allowed = audit_events(controller, "dial_allowed")
        served_at_b = [e for e in audit_events(controller, "dial_served") if e.get("link") == "ra"]
        assert len(allowed) == 3 and len(served_at_b) == 3
        assert {e["correlation"] for e in allowed} == {e["correlation"] for e in served_at_b}
        assert all(e["relay"] == "rb" and e["identity"] == "default/central" for e in served_at_b)
        assert len(audit_events(controller, "link_connected")) == 1

        # B dies: the dials on its link end, A says why; the binder moves to C, and A's dials follow it there.
        relay_b.process.proc.send_signal(signal.SIGKILL)
        relay_b.process.proc.wait(10)
        wait_until(lambda: on_relay(host_state, relay_c), timeout=60, what="site-a moved to rc")
        wait_until(lambda: not refused_dial(port), timeout=30, what="dials through a link to rc")
        # The admitting relay queues its row for a worker thread: a dial through the link may come first.
        wait_until(lambda: len(audit_events(controller, "link_connected")) >= 2, what="rc's link_connected row")
        assert [e["relay"] for e in audit_events(controller, "link_connected")] == ["rb", "rc"]

        # B back and C killed: the binder returns to B, and A opens a new link to it.
        relay_b.restart()
        relay_c.process.proc.send_signal(signal.SIGKILL)
        relay_c.process.proc.wait(10)
        wait_until(lambda: refused_dial(port), timeout=30, what="dials failing while site-a moves")
        wait_until(lambda: any("cannot be reached" in e["reason"] or "no gateway hosting" in e["reason"]
                               for e in audit_events(controller, "dial_failed")), what="A saying why")
        wait_until(lambda: on_relay(host_state, relay_b), timeout=60, what="site-a back on rb")
        wait_until(lambda: not refused_dial(port), timeout=30, what="dials through a new link to rb")
        wait_until(lambda: len(audit_events(controller, "link_connected")) >= 3, what="rb's new link_connected row")
        assert [e["relay"] for e in audit_events(controller, "link_connected")] == ["rb", "rc", "rb"]
    except BaseException:
        for process in [*(r.process for r in relays), *agents]:
            print(process.output[-3000:])
        raise
    finally:
        for agent in agents:
            agent.stop()
        for relay in relays:
            relay.process.stop()
        controller.process.stop()


