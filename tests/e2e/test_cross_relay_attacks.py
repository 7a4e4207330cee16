"""A relay's link listener under attack, with real processes: peers that trickle bytes, a linking relay that stops
reading while dials push data, a linking relay that floods one frame type. The relay must stay bounded and keep
admitting links and serving gateways."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from controller.relay import link_client
from controller.relay.link_client import LinkSession, link_tls_context, open_link
from shared.protocol import TUNNEL_ALPN, ProtocolLimits
from shared.protocol.frames import HEADER, FrameType
from shared.tunnel.transport import StreamTransport
from tests.e2e.cross_relay_harness import (
    RelayProcess,
    RoleController,
    audit_events,
    enroll_gateway,
    start_agent_on,
)
from tests.e2e.harness import EchoServer, Process

#: The relay's TLS handshake and AUTH deadlines in these tests (10 s in production): short, so the test is quick.
SHORT_DEADLINE = 2.0
#: A trickling peer sends one byte this often: well inside the deadline, so only a deadline that counts from
#: the connection's start (not from its last byte) ends it.
TRICKLE_INTERVAL = 0.25
#: A trickling peer gives up after this long; the relay must have closed it well before.
TRICKLE_LIMIT = 30.0
#: A relay that closed a trickling peer by this long after it connected kept its deadline (2 s, plus a loaded
#: machine's slack), far below TRICKLE_LIMIT.
CLOSED_WITHIN = 15.0
#: Each link attempt or dial of these tests ends within this long.
ATTEMPT_TIMEOUT = 20.0
#: A pushing service writes this much at a time, and stops after PUSH_LIMIT bytes or PUSH_SECONDS.
PUSH_CHUNK = 64 * 1024
PUSH_LIMIT = 2 * 1024**3
PUSH_SECONDS = 60.0
#: Dials a stalled link carries, each from a gateway that pushes as fast as it can.
STALLED_DIALS = 4
#: The window the stalling link grants each dial: far more than any window a relay advertises (8 MiB).
GREEDY_WINDOW = 1024**3
#: How long the stalled link is watched.
STALL_WATCH = 6.0
#: What the relay may grow by while the link is stalled: each dial's own window (8 MiB) and the socket buffers,
#: far below what a relay trusting the stalled link's window would take (hundreds of MiB in STALL_WATCH).
STALL_GROWTH_KIB = 128 * 1024
#: DATA frames a flooding link sends on streams that are closed, and how long it may take sending them.
FLOOD_FRAMES = 2_000_000
FLOOD_SECONDS = 6.0
#: Frames written at once by the flooding link.
FLOOD_BATCH = 1000
#: What the relay may grow by while flooded by a link that reads nothing.
FLOOD_GROWTH_KIB = 64 * 1024
#: A relay started with some of its listener's limits (ListenerLimits, the settings) replaced: argv[1] is JSON.
LIMITS_RUNNER = r"""
import dataclasses, json, sys
from controller import cli
from shared.event_loop import run
args = cli.build_parser().parse_args(sys.argv[2:])
settings = cli.settings_from_args(args)
limits = dataclasses.replace(settings.limits, **json.loads(sys.argv[1]))
run(cli.serve(dataclasses.replace(settings, limits=limits)), args.event_loop)
"""

#: How long relay B lets a link take nothing of what it writes, in the stalled-link test (20 s in production):
#: past STALL_WATCH, so the memory is measured while the link is stalled, and short enough for a quick test.
SHORT_WRITE_STALL = 8.0
#: The stalled link's close is looked for this long after the stall began.
STALL_CLOSE_WITHIN = 30.0


class LimitedRelay(RelayProcess):
    """A relay whose listener limits ``LIMITS`` replaces."""

    LIMITS: dict[str, float] = {}

    def argv(self, *extra: str) -> list[str]:
        argv = super().argv(*extra)
        return [sys.executable, "-c", LIMITS_RUNNER, json.dumps(self.LIMITS), *argv[3:]]


class ShortStallRelay(LimitedRelay):
    """A relay that closes a link taking nothing it writes after SHORT_WRITE_STALL."""

    LIMITS = {"link_write_stall": SHORT_WRITE_STALL}


class ShortDeadlineRelay(LimitedRelay):
    """A relay whose listener's TLS handshake and AUTH deadlines are SHORT_DEADLINE."""

    LIMITS = {"handshake_deadline": SHORT_DEADLINE, "auth_deadline": SHORT_DEADLINE}


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


class PushServer:
    """A local service that writes as fast as its reader takes, to every connection (bounded in bytes and time)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._push, args=(conn,), daemon=True).start()

    def _push(self, conn: socket.socket) -> None:
        chunk = b"x" * PUSH_CHUNK
        sent = 0
        until = time.monotonic() + PUSH_SECONDS
        conn.settimeout(1.0)
        try:
            while not self._closed and sent < PUSH_LIMIT and time.monotonic() < until:
                try:
                    sent += conn.send(chunk)
                except TimeoutError:
                    continue
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self._closed = True
        self.sock.close()


@contextmanager
def two_relays_and_a_gateway(tmp_path: Path, echo_port: int, push_port: int | None = None,
                             relay_class: type[RelayProcess] = RelayProcess
                             ) -> Iterator[tuple[RoleController, RelayProcess, Path, Path, Path]]:
    """Relay B with gateway site-a bound to telemetry (echo) and source (push), relay A's certificate and key
    for the links: (controller, relay B, CA, A's certificate, A's key)."""
    controller = RoleController(tmp_path / "controller", "controller")
    relays: list[RelayProcess] = []
    agents: list[Process] = []
    try:
        relay_b = relay_class(controller, tmp_path, "rb")
        relay_a = RelayProcess(controller, tmp_path, "ra")
        relays += [relay_b, relay_a]
        binds = {"telemetry": echo_port} | ({"source": push_port} if push_port is not None else {})
        for service in binds:
            controller.ctl("service", "create", service)
            controller.ctl("policy", "create", "--kind", "bind", "--identities", "site-a", "--services", service)
        state = enroll_gateway(controller, tmp_path, "site-a")
        agents.append(start_agent_on(tmp_path, "site-a", state, relay_b, binds=binds))
        yield (controller, relay_b, controller.data / "ca" / "ca.pem", relay_a.data / "tls" / "server.pem",
               relay_a.data / "tls" / "server.key")
    finally:
        for agent in agents:
            agent.stop()
        for relay in relays:
            relay.process.stop()
        controller.process.stop()


async def link(relay: RelayProcess, ca: Path, cert: Path, key: Path) -> tuple[LinkSession, asyncio.Task[None]]:
    return await asyncio.wait_for(open_link(relay.name, relay.address, link_tls_context(ca.read_text()),
                                            cert.read_text(), key.read_bytes(), "t-attack"), ATTEMPT_TIMEOUT)


async def echo_through(session: LinkSession, payload: bytes) -> bytes:
    """``payload`` sent to telemetry@site-a over the link, and what came back."""
    stream = session.open_stream("default/telemetry@site-a", peer="spiffe://outpost.local/default/central#c-echo")
    await asyncio.wait_for(stream.wait_accepted(), ATTEMPT_TIMEOUT)
    await stream.write(payload)
    received = b""
    while len(received) < len(payload):
        chunk = await asyncio.wait_for(stream.read(), ATTEMPT_TIMEOUT)
        assert chunk, "the echo ended early"
        received += chunk
    stream.reset()
    return received


async def a_link_and_a_gateway_still_served(relay: RelayProcess, ca: Path, cert: Path, key: Path) -> None:
    session, task = await link(relay, ca, cert, key)
    try:
        assert await echo_through(session, b"still here") == b"still here"
    finally:
        await session.close()
        await asyncio.gather(task, return_exceptions=True)


def client_hello() -> bytes:
    """The first flight of a real TLS client (its ClientHello), made in memory."""
    context = ssl.create_default_context()
    context.set_alpn_protocols([TUNNEL_ALPN])
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


async def trickle(send: asyncio.StreamWriter, reader: asyncio.StreamReader, data: bytes) -> float:
    """Send ``data`` one byte every TRICKLE_INTERVAL until the relay closes the connection; how long that took."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    eof = loop.create_task(reader.read(-1))
    try:
        for byte in data:
            if eof.done() or loop.time() - started > TRICKLE_LIMIT:
                break
            send.write(bytes([byte]))
            try:
                await send.drain()
            except (ConnectionError, ssl.SSLError):
                break
            await asyncio.wait({eof}, timeout=TRICKLE_INTERVAL)
        await asyncio.wait({eof}, timeout=max(0.0, TRICKLE_LIMIT - (loop.time() - started)))
        return loop.time() - started
    finally:
        eof.cancel()
        await asyncio.gather(eof, return_exceptions=True)
        send.close()


async def trickle_tls_handshake(relay: RelayProcess) -> float:
    host, port = relay.address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    return await trickle(writer, reader, client_hello() * 4)


async def trickle_auth(relay: RelayProcess, ca: Path) -> float:
    host, port = relay.address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port), ssl=link_tls_context(ca.read_text()),
                                                   server_hostname=host)
    assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == TUNNEL_ALPN
    payload = b'{"chain": ["' + b"A" * 4000 + b'"], "link": true}'
    frame = HEADER.pack(int(FrameType.AUTH), 0, 0, len(payload)) + payload
    return await trickle(writer, reader, frame)


def test_peers_trickling_tls_or_auth_bytes_are_dropped_at_the_deadline_while_links_and_gateways_are_served(
        tmp_path: Path, echo_server: EchoServer) -> None:
    with two_relays_and_a_gateway(tmp_path, echo_server.port, relay_class=ShortDeadlineRelay) as (
            _controller, relay_b, ca, a_cert, a_key):
        async def scenario() -> list[float]:
            trickling = [asyncio.ensure_future(trickle_tls_handshake(relay_b)) for _ in range(2)]
            trickling += [asyncio.ensure_future(trickle_auth(relay_b, ca)) for _ in range(2)]
            await asyncio.sleep(0.5)
            # While they trickle: a link is admitted and a dial over it reaches the gateway.
            await a_link_and_a_gateway_still_served(relay_b, ca, a_cert, a_key)
            return list(await asyncio.gather(*trickling))

        took = asyncio.run(scenario())
        assert all(t < CLOSED_WITHIN for t in took), took
        asyncio.run(a_link_and_a_gateway_still_served(relay_b, ca, a_cert, a_key))


def test_a_link_that_stops_reading_while_dials_push_data_keeps_the_relay_bounded_and_others_served(
        tmp_path: Path, echo_server: EchoServer, monkeypatch: pytest.MonkeyPatch) -> None:
    push = PushServer()
    try:
        with two_relays_and_a_gateway(tmp_path, echo_server.port, push.port, ShortStallRelay) as (
                controller, relay_b, ca, a_cert, a_key):
            pid = relay_b.process.proc.pid

            async def scenario() -> tuple[int, int]:
                # A linking relay that grants every dial a huge window, then reads nothing.
                with monkeypatch.context() as patch:
                    patch.setattr(link_client, "LINK_LIMITS",
                                  ProtocolLimits(initial_window=GREEDY_WINDOW, receive_budget=GREEDY_WINDOW))
                    session, task = await link(relay_b, ca, a_cert, a_key)
                assert isinstance(session.transport, StreamTransport)
                session.transport.writer.transport.pause_reading()
                loop = asyncio.get_running_loop()
                try:
                    for index in range(STALLED_DIALS):
                        session.open_stream("default/source@site-a",
                                            peer=f"spiffe://outpost.local/default/central#c-push-{index}")
                    await session.flush()
                    before = rss_kib(pid)
                    await asyncio.sleep(STALL_WATCH)
                    grown = rss_kib(pid) - before
                    # Meanwhile another link and the gateway are served.
                    await a_link_and_a_gateway_still_served(relay_b, ca, a_cert, a_key)
                    # And the stalled link is closed, saying why.
                    deadline = loop.time() + STALL_CLOSE_WITHIN
                    while not any("read nothing of this link" in e["reason"]
                                  for e in await asyncio.to_thread(audit_events, controller, "link_closed")):
                        assert loop.time() < deadline, "the stalled link was not closed"
                        await asyncio.sleep(0.5)
                    return grown, before
                finally:
                    session.abort()
                    await asyncio.gather(task, return_exceptions=True)

            grown, before = asyncio.run(scenario())
            assert grown < STALL_GROWTH_KIB, f"the relay grew by {grown} KiB (from {before} KiB) behind a stalled link"
    finally:
        push.close()


def flood_frames(kind: str, first: int, count: int) -> bytes:
    """``count`` frames of ``kind``: zero-length DATA or WINDOW on streams ``first``, ``first + 2``, ... (closed at the
    relay, and never reset there, so each DATA would be answered by a RESET), or PINGs (each answered by a PONG)."""
    if kind == "PING":
        return b"".join(HEADER.pack(int(FrameType.PING), 0, 0, 8) + n.to_bytes(8, "big")
                        for n in range(first, first + count))
    ids = range(2 * first + 1, 2 * (first + count) + 1, 2)
    if kind == "WINDOW":
        return b"".join(HEADER.pack(int(FrameType.WINDOW), 0, sid, 4) + (1).to_bytes(4, "big") for sid in ids)
    return b"".join(HEADER.pack(int(FrameType.DATA), 0, sid, 0) for sid in ids)


@pytest.mark.parametrize("kind", ["DATA", "WINDOW", "PING"])
def test_a_link_flooding_one_frame_type_while_reading_nothing_keeps_the_relay_bounded_and_serving(
        tmp_path: Path, echo_server: EchoServer, kind: str) -> None:
    with two_relays_and_a_gateway(tmp_path, echo_server.port) as (_controller, relay_b, ca, a_cert, a_key):
        pid = relay_b.process.proc.pid

        async def scenario() -> tuple[int, int, int]:
            session, task = await link(relay_b, ca, a_cert, a_key)
            assert isinstance(session.transport, StreamTransport)
            writer = session.transport.writer
            writer.transport.pause_reading()
            served: asyncio.Future[None] | None = None
            try:
                # One stream with a high id: every id below it counts as opened and closed at the relay.
                session.conn._table.next_local_id = 2 * FLOOD_FRAMES + 1  # noqa: SLF001 - an attacker's shortcut
                session.open_stream("default/nothing@site-a", peer="spiffe://outpost.local/default/x#c-flood")
                await session.flush()
                before = rss_kib(pid)
                sent = 0
                loop = asyncio.get_running_loop()
                started = loop.time()
                while (sent < FLOOD_FRAMES and loop.time() < started + FLOOD_SECONDS
                       and not writer.transport.is_closing()):
                    writer.write(flood_frames(kind, sent, FLOOD_BATCH))
                    sent += FLOOD_BATCH
                    if served is None and loop.time() > started + 1.0:
                        # While the flood goes on: another link is admitted and reaches the gateway.
                        served = asyncio.ensure_future(a_link_and_a_gateway_still_served(relay_b, ca, a_cert, a_key))
                    try:
                        await asyncio.wait_for(writer.drain(), 1.0)
                    except TimeoutError:
                        await asyncio.sleep(0.1)  # the relay holds us back: keep pushing, as a flooder would
                await asyncio.sleep(1.0)
                if served is not None:
                    await served
                return rss_kib(pid) - before, before, sent
            finally:
                session.abort()
                await asyncio.gather(task, return_exceptions=True)

        grown, before, sent = asyncio.run(scenario())
        assert grown < FLOOD_GROWTH_KIB, f"the relay grew by {grown} KiB (from {before} KiB) after {sent} {kind} frames"
        asyncio.run(a_link_and_a_gateway_still_served(relay_b, ca, a_cert, a_key))
