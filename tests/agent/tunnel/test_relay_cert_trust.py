"""A tunnel trusts its relay only until the relay's certificate ends, or a renewed one the relay pushed.

The relay is a real TLS WebSocket server on 127.0.0.1 with a certificate from a
CA made here, which the agent pins; it speaks through a relay-side protocol
``Connection`` and pushes what each test chooses. The agent's trusted clock is
a fake one set near the certificate's end, so nothing waits for hours.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import logging
import random
import secrets
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from agent.identity.ephemeral import EphemeralKeyStore
from agent.identity.tls_trust import pinned_ssl_context
from agent.tunnel.client import AgentSession, TunnelCredentials, TunnelOptions, open_tunnel
from shared.protocol import (
    RELAY_CERT_FEATURE,
    AuthReceived,
    BindRequested,
    Connection,
    ConnectionTerminated,
    ErrorCode,
    Role,
    relay_cert_message,
)
from shared.trust import cert_not_after
from tests.agent.tunnel.relay_pki import Authority, authority, der, relay_certificate, server_context

#: Bounds each scenario; the longest waits out one certificate's last seconds.
SCENARIO_TIMEOUT = 30.0
#: Seconds of the relay's certificate left by the agent's clock when the tunnel comes up.
LEFT = 2.0
#: The relay certificate's life (never waited for: the agent's clock starts near its end).
LIFE = 3600.0


def LAST_MOMENT() -> float:  # noqa: N802 - a constant draw
    """The draw that leaves at the last moment the schedule allows (here: the certificate's end)."""
    return 0.999999


@dataclass
class FakeClock:
    """Trusted time ``offset`` seconds ahead of the system clock (what agent.clock.trusted.TrustedClock answers).

    ``hold`` stops it until ``release``: a tunnel's handshake and authentication (seconds under
    emulation on a slow board) must not eat the few seconds of certificate a test leaves it.
    """

    offset: float = 0.0
    measured: bool = True
    held_at: float | None = None

    def now(self) -> float:
        return self.held_at if self.held_at is not None else time.time() + self.offset

    def hold(self) -> None:
        if self.held_at is None:
            self.held_at = self.now()

    def release(self) -> None:
        if self.held_at is not None:
            self.offset, self.held_at = self.held_at - time.time(), None


@dataclass
class RelayEnd:
    """One tunnel at the fake relay."""

    ws: web.WebSocketResponse
    conn: Connection
    nonce: bytes
    info: dict = field(default_factory=dict)
    up: asyncio.Event = field(default_factory=asyncio.Event)
    goaway: ConnectionTerminated | None = None
    gone: asyncio.Event = field(default_factory=asyncio.Event)

    async def push(self, certificate_der: bytes, signature: bytes) -> None:
        self.conn.send_relay_certificate(certificate_der, signature)
        await self.ws.send_bytes(self.conn.data_to_send())

    def sign(self, key: ec.EllipticCurvePrivateKey, certificate_der: bytes, nonce: bytes | None = None) -> bytes:
        message = relay_cert_message(self.nonce if nonce is None else nonce, hashlib.sha256(certificate_der).digest())
        return key.sign(message, ec.ECDSA(hashes.SHA256()))


@dataclass
class FakeRelay:
    ca: Authority
    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate
    url: str = ""
    server_tls: ssl.SSLContext | None = None
    tunnels: list[RelayEnd] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(protocols=("outpost.v1",))
        await ws.prepare(request)
        conn = Connection(Role.RELAY, 0.0)
        end = RelayEnd(ws, conn, secrets.token_bytes(32))
        conn.send_challenge(end.nonce)
        await ws.send_bytes(conn.data_to_send())
        self.tunnels.append(end)
        self.arrived.set()
        try:
            async for message in ws:
                for event in conn.receive_data(message.data, 0.0):
                    if isinstance(event, AuthReceived):
                        end.info = dict(event.info)
                        conn.accept_auth({"relays": []})  # the agent's signature is not what these tests are about
                        self.admitted(conn, end)
                        end.up.set()
                    elif isinstance(event, BindRequested):
                        conn.send_bind_result(list(event.services), {})
                    elif isinstance(event, ConnectionTerminated):
                        end.goaway = event
                out = conn.data_to_send()
                if out:
                    await ws.send_bytes(out)
        finally:
            end.gone.set()
        return ws

    def admitted(self, conn: Connection, end: RelayEnd) -> None:
        """Called with AUTH_OK queued, before it is written: what a relay sends in the same write."""


@contextlib.asynccontextmanager
async def fake_relay(lifetime: float = LIFE, *, ca: Authority | None = None, key: ec.EllipticCurvePrivateKey | None = None,
                     certificate: x509.Certificate | None = None, kind: type[FakeRelay] = FakeRelay
                     ) -> AsyncIterator[FakeRelay]:
    """A relay on 127.0.0.1: by default with a CA, key and certificate of its own, else the ones given."""
    ca = ca or authority()
    key = key or ec.generate_private_key(ec.SECP256R1())
    relay = kind(ca, key, certificate or relay_certificate(ca, key, lifetime=lifetime))
    relay.server_tls = server_context(relay.certificate, key)
    app = web.Application()
    app.router.add_get("/v1/tunnel", relay.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=relay.server_tls)
    await site.start()
    relay.url = f"wss://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/v1/tunnel"  # type: ignore[union-attr]
    try:
        yield relay
    finally:
        await runner.cleanup()


def near_the_end(relay: FakeRelay, left: float = LEFT) -> FakeClock:
    """A clock that reads ``left`` seconds before the relay's certificate ends."""
    return FakeClock(cert_not_after(relay.certificate).timestamp() - left - time.time())


@contextlib.asynccontextmanager
async def tunnel(relay: FakeRelay, clock: FakeClock,
                 draw: Callable[[], float] = LAST_MOMENT) -> AsyncIterator[tuple[AgentSession, RelayEnd]]:
    keystore = EphemeralKeyStore()
    keystore.create()
    credentials = TunnelCredentials(uri="spiffe://outpost.local/default/gw", chain_pem=["-"], ca_pem=relay.ca.pem,
                                    keystore=keystore)
    options = TunnelOptions(clock=clock, transport="websocket", draw=draw)  # type: ignore[arg-type]
    async with aiohttp.ClientSession() as http:
        clock.hold()
        try:
            session, task = await open_tunnel(http, relay.url, credentials, pinned_ssl_context(relay.ca.pem), options)
            end = relay.tunnels[-1]
            await asyncio.wait_for(end.up.wait(), 5)
        finally:
            clock.release()  # the certificate's last seconds count from here
        try:
            yield session, end
        finally:
            await session.close()
            await task


async def closed_within(session: AgentSession, end: RelayEnd, seconds: float) -> float:
    """Seconds until the agent closed the tunnel (AssertionError past ``seconds``)."""
    started = time.monotonic()
    await asyncio.wait_for(session.closed.wait(), seconds)
    await asyncio.wait_for(end.gone.wait(), 5)
    return time.monotonic() - started


def near_clock_now(session: AgentSession) -> float:
    assert session.options.clock is not None
    return session.options.clock.now()


def run(scenario: Callable[[], object]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))  # type: ignore[arg-type]


def test_the_agent_says_it_understands_pushes_and_leaves_when_the_relay_certificate_ends(caplog) -> None:
    async def scenario() -> None:
        async with fake_relay() as relay:
            async with tunnel(relay, near_the_end(relay), draw=random.random) as (session, end):
                assert end.info.get(RELAY_CERT_FEATURE) is True
                assert not session.conn.closed
                assert session.trusted is not None and session.trusted.leave_at <= session.trusted.not_after
                took = await closed_within(session, end, LEFT + 5)
                # Left through the normal close: a GOAWAY the relay read, by the agent, before the end.
                assert end.goaway is not None and end.goaway.code is ErrorCode.NO_ERROR
                assert "certificate ends" in end.goaway.reason
                assert session.close_reason is not None and session.close_reason[2] is False
                assert took <= LEFT + 1

    with caplog.at_level(logging.INFO, logger="agent.tunnel.client"):
        run(scenario)
    assert any("leaving the tunnel" in r.getMessage() for r in caplog.records)


async def renewal_outlives_the_old_end(relay: FakeRelay, session: AgentSession, end: RelayEnd) -> None:
    """Push a renewed certificate and wait past the old one's end: the tunnel stays, trusting the new one."""
    renewed = relay_certificate(relay.ca, relay.key, lifetime=2 * LIFE)
    await end.push(der(renewed), end.sign(relay.key, der(renewed)))
    await asyncio.sleep(LEFT + 1)  # past the old certificate's end by the agent's clock
    assert not session.conn.closed
    assert session.trusted is not None and session.trusted.certificate == renewed


def test_a_renewed_certificate_pushed_over_the_tunnel_keeps_it_past_the_old_end(caplog) -> None:
    async def scenario() -> None:
        async with fake_relay() as relay:
            async with tunnel(relay, near_the_end(relay)) as (session, end):
                await renewal_outlives_the_old_end(relay, session, end)

    with caplog.at_level(logging.INFO, logger="agent.tunnel.client"):
        run(scenario)
    assert any("renewed its certificate" in r.getMessage() for r in caplog.records)


def _another_relay(relay: FakeRelay) -> tuple[bytes, bytes | None]:
    cert = der(relay_certificate(relay.ca, relay.key, name="r2", lifetime=2 * LIFE))
    return cert, None


def _another_ca(relay: FakeRelay) -> tuple[bytes, bytes | None]:
    return der(relay_certificate(authority("another CA"), relay.key, lifetime=2 * LIFE)), None


def _expired(relay: FakeRelay) -> tuple[bytes, bytes | None]:
    issued = dt.datetime.now(dt.UTC) - dt.timedelta(hours=3)
    return der(relay_certificate(relay.ca, relay.key, issued=issued, lifetime=2 * LIFE)), None


def _not_yet_valid(relay: FakeRelay) -> tuple[bytes, bytes | None]:
    issued = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=2 * LIFE)
    return der(relay_certificate(relay.ca, relay.key, issued=issued, lifetime=2 * LIFE)), None


def _not_newer(relay: FakeRelay) -> tuple[bytes, bytes | None]:
    return der(relay_certificate(relay.ca, relay.key, lifetime=LIFE / 2)), None


def _a_gateway_certificate(relay: FakeRelay) -> tuple[bytes, bytes | None]:
    return der(relay_certificate(relay.ca, relay.key, lifetime=2 * LIFE, usage=ExtendedKeyUsageOID.CLIENT_AUTH)), None


def _signed_over_another_nonce(relay: FakeRelay) -> tuple[bytes, bytes | None]:
    cert = der(relay_certificate(relay.ca, relay.key, lifetime=2 * LIFE))
    return cert, relay.tunnels[-1].sign(relay.key, cert, nonce=secrets.token_bytes(32))


def _signed_by_another_key(relay: FakeRelay) -> tuple[bytes, bytes | None]:
    cert = der(relay_certificate(relay.ca, relay.key, lifetime=2 * LIFE))
    return cert, relay.tunnels[-1].sign(ec.generate_private_key(ec.SECP256R1()), cert)


def _not_a_certificate(relay: FakeRelay) -> tuple[bytes, bytes | None]:
    return b"\x30\x03junk", b"sig"


@pytest.mark.parametrize("make, why", [
    (_another_relay, "for another relay"),
    (_another_ca, "not signed by the pinned controller CA"),
    (_expired, "ends before"),  # an ended certificate ends before the one still trusted
    (_not_yet_valid, "not valid now"),
    (_not_newer, "ends before"),
    (_a_gateway_certificate, "for another relay"),
    (_signed_over_another_nonce, "not signed over this tunnel"),
    (_signed_by_another_key, "not signed over this tunnel"),
    (_not_a_certificate, "not a certificate"),
], ids=lambda v: getattr(v, "__name__", "")[1:] if callable(v) else "")
def test_a_bad_push_is_refused_with_one_line_and_the_tunnel_still_leaves_at_the_old_end(
        caplog, make: Callable[[FakeRelay], tuple[bytes, bytes | None]], why: str) -> None:
    async def scenario() -> None:
        async with fake_relay() as relay:
            async with tunnel(relay, near_the_end(relay)) as (session, end):
                before = session.trusted
                certificate, signature = make(relay)
                await end.push(certificate, signature if signature is not None else end.sign(relay.key, certificate))
                await asyncio.sleep(0.2)
                # Refused alone: the tunnel carries on, trusting what it trusted ...
                assert not session.conn.closed and session.trusted == before
                # ... until the old certificate's end: not later, and not sooner than this agent's draw.
                assert before is not None
                due_in = before.leave_at - near_clock_now(session)
                took = await closed_within(session, end, LEFT + 5)
                assert took >= due_in - 0.5
                assert end.goaway is not None and "certificate ends" in end.goaway.reason

    with caplog.at_level(logging.WARNING, logger="agent.tunnel.client"):
        run(scenario)
    [line] = [r.getMessage() for r in caplog.records if "refused the renewed certificate" in r.getMessage()]
    assert why in line and "\n" not in line


def test_a_push_of_the_certificate_already_trusted_is_ignored_and_costs_no_refusal(caplog) -> None:
    """A relay pushes at admission to a tunnel that may have shaken hands before its renewal
    (controller/relay/cert_push.py); one that had not gets what it trusts: nothing changes."""
    async def scenario() -> None:
        async with fake_relay() as relay:
            async with tunnel(relay, near_the_end(relay)) as (session, end):
                before = session.trusted
                # More than MAX_REFUSED_PUSHES of them, well signed or not: none is counted against the tunnel.
                await end.push(der(relay.certificate), end.sign(relay.key, der(relay.certificate)))
                for _ in range(3):
                    await end.push(der(relay.certificate), b"not a signature")
                await asyncio.sleep(0.2)
                assert session.trusted is before and session.pushes_refused == 0 and not session.conn.closed
                # A real renewal after them is still believed.
                await renewal_outlives_the_old_end(relay, session, end)

    with caplog.at_level(logging.DEBUG, logger="agent.tunnel.client"):
        run(scenario)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("already trusts" in r.getMessage() for r in caplog.records)


def test_a_push_replayed_from_another_tunnel_is_refused(caplog) -> None:
    async def scenario() -> None:
        async with fake_relay() as relay:
            clock = near_the_end(relay, left=LIFE / 2)
            async with tunnel(relay, clock) as (first, first_end), tunnel(relay, clock) as (second, second_end):
                renewed = der(relay_certificate(relay.ca, relay.key, lifetime=2 * LIFE))
                signature = first_end.sign(relay.key, renewed)
                await first_end.push(renewed, signature)
                await second_end.push(renewed, signature)  # the same frame, on another tunnel
                await asyncio.sleep(0.2)
                assert first.trusted is not None and der(first.trusted.certificate) == renewed
                assert second.trusted is not None and second.trusted.certificate == relay.certificate
                assert not first.conn.closed and not second.conn.closed

    with caplog.at_level(logging.WARNING, logger="agent.tunnel.client"):
        run(scenario)
    [line] = [r.getMessage() for r in caplog.records if "refused the renewed certificate" in r.getMessage()]
    assert "replayed from another tunnel" in line


def test_the_supervisor_reconnects_after_leaving_and_the_new_handshake_checks_the_relay_again(tmp_path) -> None:
    """A relay that renewed but never pushes (one from before RELAY_CERT): its agents leave by the old
    certificate's end and come back with the usual backoff, and the new handshake meets the new certificate."""
    from agent.tunnel.backoff import Backoff
    from agent.tunnel.supervisor import TunnelSupervisor

    async def scenario() -> None:
        async with fake_relay() as relay:
            keystore = EphemeralKeyStore()
            keystore.create()
            credentials = TunnelCredentials(uri="spiffe://outpost.local/default/gw", chain_pem=["-"],
                                            ca_pem=relay.ca.pem, keystore=keystore)
            clock = near_the_end(relay)
            options = TunnelOptions(clock=clock, transport="websocket")  # type: ignore[arg-type]
            supervisor = TunnelSupervisor([relay.url], credentials, options, backoff=Backoff(initial=0.2, cap=1.0))
            clock.hold()
            running = asyncio.create_task(supervisor.run())
            try:
                await asyncio.wait_for(supervisor.connected.wait(), 10)
                clock.release()
                first = relay.tunnels[0]
                # The relay renews for the handshakes to come (the same key), and says nothing on the tunnel.
                renewed = relay_certificate(relay.ca, relay.key, lifetime=2 * LIFE)
                relay.server_tls.load_cert_chain(*write_pem(tmp_path, renewed, relay.key))
                await asyncio.wait_for(first.gone.wait(), LEFT + 5)
                assert first.goaway is not None and "certificate ends" in first.goaway.reason
                while len(relay.tunnels) < 2 or not relay.tunnels[1].up.is_set():
                    await asyncio.sleep(0.05)  # bounded by the scenario's timeout
                await asyncio.wait_for(supervisor.connected.wait(), 10)
                session = supervisor.current_session()
                assert session is not None and session.trusted is not None
                assert session.trusted.certificate == renewed
                assert supervisor.stats.reconnects == 1
            finally:
                supervisor.stop()
                await asyncio.wait_for(running, 10)

    run(scenario)


def write_pem(folder, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> tuple[str, str]:
    from cryptography.hazmat.primitives import serialization

    (folder / "renewed.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "renewed.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    (folder / "renewed.key").chmod(0o600)
    return str(folder / "renewed.pem"), str(folder / "renewed.key")


def test_a_relay_flooding_bad_pushes_costs_the_gateway_three_log_lines_and_then_a_good_one_is_ignored(caplog) -> None:
    async def scenario() -> None:
        async with fake_relay() as relay:
            async with tunnel(relay, near_the_end(relay, left=LIFE / 2)) as (session, end):
                bad = der(relay_certificate(relay.ca, relay.key, lifetime=LIFE / 2))  # ends before the trusted one
                for _ in range(50):
                    await end.push(bad, end.sign(relay.key, bad))
                renewed = der(relay_certificate(relay.ca, relay.key, lifetime=2 * LIFE))
                await end.push(renewed, end.sign(relay.key, renewed))
                await asyncio.sleep(0.3)
                assert session.pushes_refused == 3 and not session.conn.closed
                assert session.trusted is not None and session.trusted.certificate == relay.certificate

    with caplog.at_level(logging.WARNING, logger="agent.tunnel.client"):
        run(scenario)
    lines = [r.getMessage() for r in caplog.records if "refused the renewed certificate" in r.getMessage()]
    assert len(lines) == 3 and lines[-1].endswith("later ones on this tunnel are ignored")
