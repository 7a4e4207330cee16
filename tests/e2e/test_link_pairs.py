"""More dials at once between two relays than one link carries: another link opens; past the most, a sentence."""

from __future__ import annotations

import socket
from pathlib import Path

from tests.e2e.cross_relay_harness import (
    RoleController,
    audit_events,
    enroll_gateway,
    start_agent_on,
    store_rows,
    two_relays,
)
from tests.e2e.harness import EchoServer, free_port, wait_until
from tests.e2e.test_cross_relay_attacks import LimitedRelay

#: Relay A's dials per link and links per pair, shrunk from 240 and 8 so a quick test fills them.
LINK_DIALS = 2
LINKS_PER_PAIR = 2
#: Dials held at once across one pair at production limits: past one link's 240 and the protocol's 256,
#: from two dialing gateways to two binding ones (each tunnel itself carries at most 256 streams).
MANY_DIALS = 300
#: Seconds a held dial waits for its echo.
ECHO_TIMEOUT = 20.0


class FewLinksRelay(LimitedRelay):
    LIMITS = {"link_dials": LINK_DIALS, "links_per_pair": LINKS_PER_PAIR}


def held_dial(port: int) -> tuple[socket.socket, bool]:
    """A dial kept open after one echoed byte; (its socket, whether the byte came back)."""
    conn = socket.create_connection(("127.0.0.1", port), timeout=ECHO_TIMEOUT)
    try:
        conn.sendall(b"x")
        return conn, conn.recv(1) == b"x"
    except OSError:
        return conn, False


def links_from_a(controller: RoleController) -> list[dict]:
    """The links relay B admitted from relay A, by its audit rows."""
    return [e for e in audit_events(controller, "link_connected") if e["peer"] == "ra"]


def dial_once(port: int) -> bool:
    conn, echoed = held_dial(port)
    conn.close()
    return echoed


def test_a_full_link_opens_another_and_past_the_most_a_dial_is_refused_in_a_sentence(
        tmp_path: Path, echo_server: EchoServer) -> None:
    with two_relays(tmp_path, RoleController(tmp_path / "controller", "controller"),
                    relay_a_kind=FewLinksRelay) as pair:
        controller, held = pair.controller, pair.held
        port = pair.plc_across(tmp_path, echo_server.port)

        for _ in range(LINK_DIALS * LINKS_PER_PAIR):
            conn, echoed = held_dial(port)
            held.append(conn)
            assert echoed
        # Relay B writes its audit rows from a queue, a moment after the link is up: wait for the row.
        wait_until(lambda: len(links_from_a(controller)) >= LINKS_PER_PAIR, what="the second link's row")
        assert len(links_from_a(controller)) == LINKS_PER_PAIR

        conn, echoed = held_dial(port)
        held.append(conn)
        assert not echoed
        sentence = (f"relay ra carries {LINK_DIALS * LINKS_PER_PAIR} dials to relay rb at once, the most for one "
                    f"pair of relays ({LINKS_PER_PAIR} links of {LINK_DIALS}); try again when one ends")
        wait_until(lambda: any(e["reason"] == sentence for e in audit_events(controller, "dial_failed")),
                   what="the refused dial's row")

        # One dial ends: its place is free again, on the links already open.
        held.pop(0).close()
        wait_until(lambda: dial_once(port), timeout=ECHO_TIMEOUT, what="a dial once one ended")
        assert len(links_from_a(controller)) == LINKS_PER_PAIR


def test_three_hundred_dials_at_once_between_two_relays_all_go_through(tmp_path: Path,
                                                                      echo_server: EchoServer) -> None:
    with two_relays(tmp_path, RoleController(tmp_path / "controller", "controller")) as pair:
        controller, relay_b, relay_a, agents, held = (pair.controller, pair.relay_b, pair.relay_a, pair.agents,
                                                      pair.held)
        controller.ctl("service", "create", "plc")
        controller.ctl("policy", "create", "--kind", "bind", "--identities", "site-1,site-2", "--services", "plc")
        controller.ctl("policy", "create", "--kind", "dial", "--identities", "central-1,central-2", "--services",
                       "plc")
        ports = []
        for n in (1, 2):
            site = enroll_gateway(controller, tmp_path, f"site-{n}")
            central = enroll_gateway(controller, tmp_path, f"central-{n}")
            port = free_port()
            ports.append(port)
            agents.append(start_agent_on(tmp_path, f"site-{n}", site, relay_b, binds={"plc": echo_server.port}))
            agents.append(start_agent_on(tmp_path, f"central-{n}", central, relay_a, dials={f"plc@site-{n}": port}))
        wait_until(lambda: len(store_gateways(controller)) == 2, what="rb publishing plc for both sites")

        for i in range(MANY_DIALS):
            conn, echoed = held_dial(ports[i % 2])
            held.append(conn)
            assert echoed, f"dial {i + 1} of {MANY_DIALS} got no echo"
        # Relay B writes its audit rows from a queue, a moment after the link is up: wait for the row.
        wait_until(lambda: len(links_from_a(controller)) >= 2, what="the second link's row")
        assert len(links_from_a(controller)) == 2


def store_gateways(controller: RoleController) -> list[tuple]:
    return store_rows(controller, "SELECT gateway FROM relay_services WHERE relay = 'rb' AND service = 'plc'")
