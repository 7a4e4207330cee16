"""A full relay holds new connections before their TLS handshake instead of refusing them after it.

A real controller (TLS, relay mounted) on 127.0.0.1 with its admission cap
lowered, gateways the agent's own ``TunnelSupervisor``; and the holding
itself (controller/listener_park.py) on real sockets.
"""

from __future__ import annotations

import asyncio
import random
import socket
import ssl
import time
from pathlib import Path

import pytest

from agent.errors import RelayBusy
from agent.identity.tls_trust import pinned_ssl_context
from agent.tunnel.backoff import Backoff
from agent.tunnel.client import TunnelOptions, open_tunnel
from agent.tunnel.supervisor import TunnelSupervisor
from agent.tunnel.tls_link import relay_address, tunnel_tls_context
from controller.listener import Listener, ListenerLimits
from controller.listener_park import PARK_POLL, Parking
from tests.controller.harness import client_tls_for, run, running_controller
from tests.controller.relay.relay_harness import SCENARIO_TIMEOUT, connect, enrolled, relay_url
from tests.controller.relay.test_relay_shedding import ALL_BACK, ANSWER, FLEET, SMALL_CAP, TRANSPORTS, stop_all

#: A short hold for the test of a relay that stays full.
SHORT_PARK = 0.3
#: Tunnels past their handshake whose peers have not answered the CHALLENGE yet: more than the
#: relay once let wait at a time (256), fewer than it lets now.
WAITING_PEERS = 300


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_fleet_past_the_admission_cap_waits_before_its_handshakes_and_all_get_in_unrefused(
        tmp_path: Path, transport: str) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl", max_admitting=SMALL_CAP) as ctl:
            relay = ctl.server.relay
            assert relay is not None
            credentials = [await enrolled(ctl, f"gw-{i}") for i in range(FLEET)]
            fleet = [TunnelSupervisor([relay_url(ctl)], c, TunnelOptions(transport=transport),
                                      backoff=Backoff(rng=random.Random(i))) for i, c in enumerate(credentials)]
            tasks = [asyncio.get_running_loop().create_task(s.run()) for s in fleet]
            try:
                await asyncio.wait_for(asyncio.gather(*(s.connected.wait() for s in fleet)), ALL_BACK)
                parking = ctl.server.guards[0].parking
                assert parking is not None and parking.held_total > 0  # the cap was reached, and some waited
                # Nobody was refused: no handshake was paid for only to say "come back later".
                assert relay.told_to_come_back == 0
                assert sum(s.stats.reconnects for s in fleet) == 0
                assert len([s for s in relay.sessions if s.identity is not None]) == FLEET
            finally:
                await stop_all(fleet, tasks)

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))


def test_a_connection_held_past_the_limit_is_handshaken_and_told_when_to_come_back(tmp_path: Path) -> None:
    async def scenario() -> None:
        limits = ListenerLimits(park_limit=SHORT_PARK)
        async with running_controller(tmp_path / "ctl", limits=limits) as ctl:
            relay = ctl.server.relay
            assert relay is not None
            gateway = await enrolled(ctl, "gw-held")
            relay.max_admitting = 0  # full, and it stays full
            began = time.monotonic()
            with pytest.raises(RelayBusy) as caught:
                await asyncio.wait_for(open_tunnel(None, relay_url(ctl), gateway, pinned_ssl_context(gateway.ca_pem),
                                                   TunnelOptions(transport="tls")), ANSWER)
            assert time.monotonic() - began >= SHORT_PARK
            assert caught.value.retry_after is not None
            parking = ctl.server.guards[0].parking
            assert parking is not None and parking.held_total == 1 and len(parking) == 0
            assert relay.told_to_come_back == 1

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))


def test_hundreds_of_tunnels_waiting_on_their_peers_do_not_hold_up_a_gateway(tmp_path: Path) -> None:
    """Between handshake and AUTH a tunnel mostly waits on its peer (a satellite round trip, a TPM's
    signature), which costs the relay no CPU: a fleet on slow links must not queue behind it."""
    async def scenario() -> None:
        limits = ListenerLimits(max_unauthenticated_per_address=WAITING_PEERS + 10)
        async with running_controller(tmp_path / "ctl", limits=limits) as ctl:
            relay = ctl.server.relay
            assert relay is not None
            gateway = await enrolled(ctl, "gw-behind-slow-peers")
            context = tunnel_tls_context(client_tls_for(ctl.context))
            host, port = relay_address(ctl.url)
            silent = [await asyncio.open_connection(host, port, ssl=context, server_hostname="localhost")
                      for _ in range(WAITING_PEERS)]
            try:
                while relay.admitting < WAITING_PEERS:  # each got its CHALLENGE and says nothing
                    await asyncio.sleep(PARK_POLL)
                async with connect(ctl, gateway, TunnelOptions(transport="tls")) as (session, _):
                    assert session.relay_info["identity"] == gateway.uri
                parking = ctl.server.guards[0].parking
                assert parking is not None and parking.held_total == 0
                assert relay.told_to_come_back == 0
            finally:
                for _, writer in silent:
                    writer.close()

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))


class Recorder:
    """What a Parking did with each connection, by the peer's port."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.dropped: list[str] = []
        self.full = True

    def start(self, conn: socket.socket, address: str) -> None:
        self.started.append(address)
        conn.close()

    def drop(self, conn: socket.socket, address: str) -> None:
        self.dropped.append(address)
        conn.close()


def test_held_connections_start_oldest_first_once_there_is_room_and_none_overtakes_them() -> None:
    async def scenario() -> None:
        seen = Recorder()
        parking = Parking(lambda: seen.full, seen.start, seen.drop, limit=ANSWER)
        pairs = [socket.socketpair() for _ in range(3)]
        try:
            for index, (conn, _) in enumerate(pairs[:2]):
                parking.admit_or_hold(conn, f"peer-{index}")
            await asyncio.sleep(5 * PARK_POLL)
            assert seen.started == [] and len(parking) == 2
            seen.full = False
            # A newcomer while two wait goes behind them, room or not.
            parking.admit_or_hold(pairs[2][0], "peer-2")
            assert seen.started == []
            await asyncio.sleep(5 * PARK_POLL)
            assert seen.started == ["peer-0", "peer-1", "peer-2"] and len(parking) == 0
            # With room and nobody waiting, a connection starts at once.
            extra, other = socket.socketpair()
            parking.admit_or_hold(extra, "peer-3")
            other.close()
            assert seen.started[-1] == "peer-3" and parking.held_total == 3
        finally:
            for _, peer in pairs:
                peer.close()

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))


def test_a_connection_held_past_the_limit_starts_while_full_and_a_closing_listener_drops_the_rest() -> None:
    async def scenario() -> None:
        seen = Recorder()
        parking = Parking(lambda: seen.full, seen.start, seen.drop, limit=SHORT_PARK)
        first, first_peer = socket.socketpair()
        parking.admit_or_hold(first, "old")
        await asyncio.sleep(SHORT_PARK / 2)
        second, second_peer = socket.socketpair()
        parking.admit_or_hold(second, "young")
        await asyncio.sleep(SHORT_PARK / 2 + 10 * PARK_POLL)
        assert seen.started == ["old"]  # its time is up; the younger one still waits for room
        parking.close()
        assert seen.dropped == ["young"] and len(parking) == 0
        await asyncio.sleep(5 * PARK_POLL)
        assert seen.started == ["old"]  # nothing is started after the close
        for peer in (first_peer, second_peer):
            peer.close()

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))


def test_a_zero_limit_never_holds() -> None:
    async def scenario() -> None:
        seen = Recorder()
        parking = Parking(lambda: True, seen.start, seen.drop, limit=0)
        conn, peer = socket.socketpair()
        parking.admit_or_hold(conn, "peer")
        peer.close()
        assert seen.started == ["peer"] and parking.held_total == 0

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))


def test_a_held_connection_let_go_while_the_handshake_cap_is_full_is_reset_and_uncounted() -> None:
    """Held connections let go at once (their time up) must not start more handshakes than the cap allows."""
    async def scenario() -> None:
        listener = Listener("test", ssl.create_default_context(ssl.Purpose.CLIENT_AUTH), ListenerLimits(max_handshakes=1))
        listener.start(socket.socket(), asyncio.Protocol)
        listener.close()  # no accept loop needed: the handshake is started by hand below
        in_progress = asyncio.get_running_loop().create_future()
        listener._handshakes.add(in_progress)  # type: ignore[arg-type]  # one handshake under way
        conn, peer = socket.socketpair()
        assert listener.admission.enter("peer")

        listener._begin(conn, "peer")

        assert conn.fileno() == -1 and listener.handshakes_shed == 1 and listener.admission.total == 0
        assert peer.recv(1) == b""
        peer.close()
        in_progress.cancel()

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))
