"""Deadlines and caps for connections that have not authenticated, with real TLS clients on loopback.

The deadlines are shortened through the settings so that each test takes
seconds; the code paths are the ones the default deadlines take.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import struct
import time
from pathlib import Path

import pytest

from controller.admission import cap_key
from controller.listener import ListenerLimits
from tests.controller.harness import Running, make_key, run, running_controller
from tests.controller.relay.relay_harness import SCENARIO_TIMEOUT, connect, enrolled
from tests.controller.relay.test_relay_decisions import dial_refusal

#: Short deadlines for the tests: still several loopback round trips' worth of margin.
SHORT = ListenerLimits(handshake_deadline=3.0, head_deadline=3.0, body_deadline=3.0)
#: How much later than its deadline a close may come on a loaded machine.
LATE = 4.0
#: A slow client sends a line this often, far below any deadline's margin of a real link.
TRICKLE_INTERVAL = 1.0
#: And never more lines than this (the loop is bounded even if the controller never closes).
TRICKLE_MAX_LINES = 15


async def tls_client(ctl: Running, source: str = "127.0.0.1", port: int | None = None
                     ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    port = port or int(ctl.url.rsplit(":", 1)[1])
    return await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, ssl=ctl.client_tls, server_hostname="localhost",
                                local_addr=(source, 0)),
        10,
    )


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    """True if the server closes the connection (EOF or reset) within ``seconds``."""
    try:
        while await asyncio.wait_for(reader.read(65536), seconds):
            pass
        return True
    except (ConnectionError, ssl.SSLError):
        return True
    except TimeoutError:
        return False


@pytest.mark.parametrize("prefix", [b"", b"\r\n\r\n\r\n"], ids=["plain", "after_blank_lines"])
def test_a_client_sending_one_header_line_every_second_is_closed_at_the_head_deadline(
        tmp_path: Path, loop_name: str, prefix: bytes) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl", limits=SHORT) as ctl:
            reader, writer = await tls_client(ctl)
            loop = asyncio.get_running_loop()
            started = loop.time()
            writer.write(prefix + b"GET /v1/time HTTP/1.1\r\nHost: localhost\r\n")
            closed_after = None
            for line in range(TRICKLE_MAX_LINES):
                if await closed_within(reader, TRICKLE_INTERVAL):
                    closed_after = loop.time() - started
                    break
                try:
                    writer.write(f"X-Slow-{line}: {'a' * 20}\r\n".encode())
                    await writer.drain()
                except (ConnectionError, ssl.SSLError):
                    closed_after = loop.time() - started
                    break
            writer.close()
            assert closed_after is not None, "a trickling request head was never cut off"
            assert SHORT.head_deadline - 0.5 <= closed_after <= SHORT.head_deadline + LATE

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT), loop_name)


def test_a_silent_connection_after_the_handshake_and_one_that_never_handshakes_are_closed(tmp_path: Path, loop_name: str) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl", limits=SHORT) as ctl:
            reader, writer = await tls_client(ctl)
            assert await closed_within(reader, SHORT.head_deadline + LATE)
            writer.close()
            port = int(ctl.url.rsplit(":", 1)[1])
            raw_reader, raw_writer = await asyncio.open_connection("127.0.0.1", port)
            raw_writer.write(b"\x16\x03\x01")  # the first bytes of a ClientHello, and then nothing
            assert await closed_within(raw_reader, SHORT.handshake_deadline + LATE)
            raw_writer.close()
            assert ctl.server.guards[0].admission.total == 0

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT), loop_name)


def test_a_trickling_body_is_closed_at_the_body_deadline_and_keep_alive_is_not_the_head_deadline(
        tmp_path: Path, loop_name: str) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl", limits=SHORT) as ctl:
            reader, writer = await tls_client(ctl)
            # One request, answered; then idle longer than the head deadline; then another on the same connection.
            request = b"GET /v1/time HTTP/1.1\r\nHost: localhost\r\n\r\n"
            writer.write(request)
            assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)).startswith(b"HTTP/1.1 200")
            await asyncio.wait_for(reader.readuntil(b"}"), 10)
            await asyncio.sleep(SHORT.head_deadline + 1)
            writer.write(request)
            assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)).startswith(b"HTTP/1.1 200")
            await asyncio.wait_for(reader.readuntil(b"}"), 10)
            # Now a body that trickles.
            writer.write(b"POST /v1/enroll HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 1000\r\n\r\n{")
            started = asyncio.get_running_loop().time()
            closed_after = None
            for _ in range(TRICKLE_MAX_LINES):
                if await closed_within(reader, TRICKLE_INTERVAL):
                    closed_after = asyncio.get_running_loop().time() - started
                    break
                try:
                    writer.write(b" ")
                    await writer.drain()
                except (ConnectionError, ssl.SSLError):
                    closed_after = asyncio.get_running_loop().time() - started
                    break
            writer.close()
            assert closed_after is not None, "a trickling body was never cut off"
            assert SHORT.body_deadline - 0.5 <= closed_after <= SHORT.body_deadline + LATE

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT), loop_name)


def test_a_client_that_resets_during_a_body_is_one_log_line_not_a_traceback(tmp_path: Path, loop_name: str, caplog) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl") as ctl:
            port = int(ctl.url.rsplit(":", 1)[1])
            raw = socket.create_connection(("127.0.0.1", port), timeout=10)
            tls = ctl.client_tls.wrap_socket(raw, server_hostname="localhost", do_handshake_on_connect=False)
            await asyncio.to_thread(tls.do_handshake)
            body = b'{"token": "' + b"x" * 500
            tls.sendall(b"POST /v1/enroll HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                        b"Content-Length: 5000\r\n\r\n" + body)
            await asyncio.sleep(0.5)
            # A reset, not a close: SO_LINGER with a zero timeout sends RST.
            tls.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            tls.close()
            await asyncio.sleep(1.0)
            # The controller still serves.
            status, _ = await ctl.call("GET", "/v1/time", admin=False)
            assert status == 200

    with caplog.at_level(logging.DEBUG):
        run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT), loop_name)
    about_it = [r for r in caplog.records if "/v1/enroll" in r.getMessage() or r.exc_info]
    assert len(about_it) == 1, [r.getMessage() for r in about_it]
    assert about_it[0].exc_info is None and "went away during the body" in about_it[0].getMessage()
    assert "Traceback" not in caplog.text


def test_the_cap_per_address_bites_with_one_log_line_and_tunnels_and_the_api_keep_working(
        tmp_path: Path, loop_name: str, caplog) -> None:
    limits = ListenerLimits(max_unauthenticated_per_address=4, max_unauthenticated=1000)

    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl", limits=limits) as ctl:
            gateway = await enrolled(ctl, "gw-a")
            # More authenticated tunnels from one address than the cap: they do not count once admitted.
            async with connect(ctl, gateway) as (tunnel, _), connect(ctl, gateway), connect(ctl, gateway), \
                    connect(ctl, gateway), connect(ctl, gateway):
                held = [await tls_client(ctl, "127.0.0.2") for _ in range(limits.max_unauthenticated_per_address)]
                refused = 0
                for _ in range(10):
                    try:
                        reader, writer = await tls_client(ctl, "127.0.0.2")
                    except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
                        refused += 1
                        continue
                    refused += await closed_within(reader, 2)
                    writer.close()
                assert refused == 10
                # Another address, the management API, an admitted tunnel and a new one are unaffected.
                status, _ = await ctl.call("GET", "/api/v1/status")
                assert status == 200
                await dial_refusal(tunnel, "no-such-service")
                async with connect(ctl, gateway):
                    pass
                for _, writer in held:
                    writer.close()

    with caplog.at_level(logging.INFO, logger="controller.listener"):
        run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT), loop_name)
    bites = [r for r in caplog.records if "refusing new connections" in r.getMessage()]
    assert len(bites) == 1, caplog.text
    assert "127.0.0.2" in bites[0].getMessage()


def test_the_total_cap_bites_while_admitted_tunnels_and_the_api_listener_keep_working(tmp_path: Path, loop_name: str) -> None:
    limits = ListenerLimits(max_unauthenticated_per_address=100, max_unauthenticated=6)

    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl", limits=limits, separate_api=True) as ctl:
            gateway = await enrolled(ctl, "gw-a")
            async with connect(ctl, gateway) as (tunnel, _):
                # The enrollment's kept-alive connection counts too: fill up to the cap exactly.
                free = limits.max_unauthenticated - ctl.server.guards[0].admission.total
                held = [await tls_client(ctl, f"127.0.0.{2 + n % 3}") for n in range(free)]
                try:
                    reader, writer = await tls_client(ctl, "127.0.0.9")
                    assert await closed_within(reader, 2)
                    writer.close()
                except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
                    pass
                status, body = await ctl.call("GET", "/api/v1/status")
                assert status == 200 and len(body["tunnels"]) == 1
                await dial_refusal(tunnel, "no-such-service")
                for _, writer in held:
                    writer.close()

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT), loop_name)


def test_an_enrollment_still_works_under_the_deadlines(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl", limits=SHORT) as ctl:
            created = await ctl.create_identity("gw-b")
            status, body = await ctl.enroll(created["token"], make_key(), "gw-b")
            assert status == 200, body

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))


def test_the_cap_counts_an_ipv6_peer_by_its_64_and_a_mapped_ipv4_as_ipv4() -> None:
    assert cap_key("2001:db8:1:2:aaaa::1") == cap_key("2001:db8:1:2:bbbb::9") == "2001:db8:1:2::/64"
    assert cap_key("2001:db8:1:3::1") != cap_key("2001:db8:1:2::1")
    assert cap_key("::ffff:192.0.2.7") == cap_key("192.0.2.7") == "192.0.2.7"
    assert cap_key("fe80::1%eth0") == "fe80::/64"


def test_a_head_that_arrived_while_the_loop_was_stalled_past_the_deadline_is_served(
        tmp_path: Path, loop_name: str) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl", limits=SHORT) as ctl:
            reader, writer = await tls_client(ctl)
            await asyncio.sleep(0.2)  # the server side is past its handshake, the head deadline running
            writer.write(b"GET /v1/time HTTP/1.1\r\nHost: localhost\r\n\r\n")
            await writer.drain()
            # The controller's loop (this loop) stalls past the deadline, as under a burst of work.
            time.sleep(SHORT.head_deadline + 1)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 200"), head
            writer.close()

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT), loop_name)
