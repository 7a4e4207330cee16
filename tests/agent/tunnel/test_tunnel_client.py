"""The agent's tunnel client against relays that misbehave, before and after authentication.

The misbehaving relay is a real TLS WebSocket server on 127.0.0.1 whose
certificate comes from a CA made here, which the agent pins. After the
handshake it speaks through a relay-side protocol ``Connection`` (so its
frames are well formed) and breaks the rules on purpose.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import ipaddress
import logging
import ssl
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.errors import ControllerUnreachable, TunnelFailed
from agent.identity.ephemeral import EphemeralKeyStore
from agent.identity.tls_trust import pinned_ssl_context
from agent.tunnel.client import TunnelCredentials, TunnelOptions, open_tunnel
from shared.protocol import (
    AuthReceived,
    BindRequested,
    Connection,
    ConnectionTerminated,
    ErrorCode,
    ProtocolLimits,
    Role,
    StreamAccepted,
    StreamReset,
)
from shared.protocol.frames import FrameType, encode_frame
from tests.e2e.link_harness import echo_service

SCENARIO_TIMEOUT = 20.0
#: The silent relay's test waits out this deadline, not the protocol's default of 10 s: it is about the agent
#: giving up at its deadline, whatever the number, and this suite runs in four passes, two of them emulated.
QUICK_AUTH_DEADLINE = 1.0


def make_ca_and_server() -> tuple[str, ssl.SSLContext]:
    """A CA (PEM) and a server TLS context with a 127.0.0.1 certificate from it."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test relay CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "relay")]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    folder = Path(tempfile.mkdtemp())
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(folder / "cert.pem", folder / "key.pem")
    return ca.public_bytes(serialization.Encoding.PEM).decode(), server


async def with_fake_relay(behaviour: Callable[[web.WebSocketResponse], Awaitable[None]],
                          agent: Callable[[str, str], Awaitable[None]]) -> None:
    ca_pem, server_tls = make_ca_and_server()

    async def handle(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(protocols=("outpost.v1",))
        await ws.prepare(request)
        await behaviour(ws)
        return ws

    app = web.Application()
    app.router.add_get("/v1/tunnel", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_tls)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        await agent(f"wss://127.0.0.1:{port}/v1/tunnel", ca_pem)
    finally:
        await runner.cleanup()


def credentials(ca_pem: str) -> TunnelCredentials:
    keystore = EphemeralKeyStore()
    keystore.create()
    return TunnelCredentials(uri="spiffe://outpost.local/default/gw", chain_pem=["-"], ca_pem=ca_pem,
                             keystore=keystore)


async def try_tunnel(url: str, ca_pem: str, options: TunnelOptions | None = None) -> None:
    async with aiohttp.ClientSession() as http:
        await open_tunnel(http, url, credentials(ca_pem), pinned_ssl_context(ca_pem), options or TunnelOptions())


def test_a_relay_that_sends_garbage_closes_the_tunnel_with_a_clear_log_line(caplog) -> None:
    async def garbage(ws: web.WebSocketResponse) -> None:
        await ws.send_bytes(b"\x42" * 100)
        await ws.receive()

    async def agent(url: str, ca_pem: str) -> None:
        with pytest.raises(ControllerUnreachable, match="closed during authentication"):
            await try_tunnel(url, ca_pem)

    with caplog.at_level(logging.WARNING):
        asyncio.run(asyncio.wait_for(with_fake_relay(garbage, agent), SCENARIO_TIMEOUT))
    assert any("broke the protocol" in r.getMessage() for r in caplog.records)


def test_a_relay_that_announces_a_frame_over_the_limit_is_dropped(caplog) -> None:
    async def oversized(ws: web.WebSocketResponse) -> None:
        # A CHALLENGE header claiming a 1 GiB payload: refused from the header alone.
        await ws.send_bytes(bytes([0x01, 0]) + (0).to_bytes(4, "big") + (1 << 30).to_bytes(4, "big"))
        await ws.receive()

    async def agent(url: str, ca_pem: str) -> None:
        with pytest.raises(ControllerUnreachable):
            await try_tunnel(url, ca_pem)

    with caplog.at_level(logging.WARNING):
        asyncio.run(asyncio.wait_for(with_fake_relay(oversized, agent), SCENARIO_TIMEOUT))
    assert any(ErrorCode.FRAME_SIZE_ERROR.name in r.getMessage() for r in caplog.records)


def test_a_refusal_of_the_protocol_core_reaches_the_agent_as_its_own_error_with_the_sentence() -> None:
    # A certificate chain past the AUTH limit: the core refuses to send it (LocalProtocolError, not an
    # OutpostError); the agent's glue says so as a TunnelFailed, which the runner retries and reports.
    async def challenge(ws: web.WebSocketResponse) -> None:
        await ws.send_bytes(bytes([0x01, 0]) + (0).to_bytes(4, "big") + (33).to_bytes(4, "big") + bytes([1]) + bytes(32))
        await ws.receive()

    async def agent(url: str, ca_pem: str) -> None:
        oversized = dataclasses.replace(credentials(ca_pem), chain_pem=["x" * 70_000])
        async with aiohttp.ClientSession() as http:
            with pytest.raises(TunnelFailed, match="failed during authentication: AUTH payload of .* exceeds"):
                await open_tunnel(http, url, oversized, pinned_ssl_context(ca_pem), TunnelOptions())

    asyncio.run(asyncio.wait_for(with_fake_relay(challenge, agent), SCENARIO_TIMEOUT))


def test_a_relay_that_never_answers_the_handshake_is_given_up_on() -> None:
    async def silent(ws: web.WebSocketResponse) -> None:
        await ws.receive()

    async def agent(url: str, ca_pem: str) -> None:
        started = asyncio.get_running_loop().time()
        with pytest.raises(ControllerUnreachable, match=f"no AUTH_OK within {QUICK_AUTH_DEADLINE:g} s"):
            await try_tunnel(url, ca_pem, TunnelOptions(limits=ProtocolLimits(auth_deadline=QUICK_AUTH_DEADLINE)))
        assert asyncio.get_running_loop().time() - started < SCENARIO_TIMEOUT - 2

    asyncio.run(asyncio.wait_for(with_fake_relay(silent, agent), SCENARIO_TIMEOUT))


class ScriptedRelay:
    """The relay side of one tunnel: a real handshake, then whatever the test sends."""

    def __init__(self, ws: web.WebSocketResponse) -> None:
        self.ws = ws
        self.loop = asyncio.get_running_loop()
        self.conn = Connection(Role.RELAY, self.loop.time())
        self.events: list = []

    async def send_queued(self) -> None:
        data = self.conn.data_to_send()
        if data:
            await self.ws.send_bytes(data)

    async def receive(self, timeout: float = 5.0) -> bool:
        """Take one message from the agent into the protocol; False once the agent has gone."""
        try:
            msg = await asyncio.wait_for(self.ws.receive(), timeout)
        except TimeoutError:
            return True
        if msg.type != aiohttp.WSMsgType.BINARY:
            return False
        for event in self.conn.receive_data(msg.data, self.loop.time()):
            self.events.append(event)
            if isinstance(event, AuthReceived):
                self.conn.accept_auth({"relays": []})  # the signature is not what these tests are about
            elif isinstance(event, BindRequested):
                self.conn.send_bind_result(list(event.services), {})
        await self.send_queued()
        return not self.conn.closed

    async def authenticate(self, binds: bool) -> None:
        self.conn.send_challenge(bytes(32))
        await self.send_queued()
        while not (self.conn.authenticated and (not binds or any(isinstance(e, BindRequested) for e in self.events))):
            assert await self.receive(), "the agent left during the handshake"

    async def until_agent_leaves(self, rounds: int = 200) -> None:
        for _ in range(rounds):  # bounded: each round waits at most a few seconds
            if not await self.receive(0.2):
                return


async def agent_against(behaviour, options: TunnelOptions, within: float = 10.0):
    """Run the agent's tunnel against ``behaviour``; returns (session, its run task) after it ended or ``within``."""
    outcome: dict = {}

    async def agent(url: str, ca_pem: str) -> None:
        async with aiohttp.ClientSession() as http:
            session, task = await open_tunnel(http, url, credentials(ca_pem), pinned_ssl_context(ca_pem), options)
            outcome["session"] = session
            done, _ = await asyncio.wait({task}, timeout=within)
            outcome["ended"] = bool(done)
            outcome["streams"] = len(session.streams)
            await session.close()
            await task

    await with_fake_relay(behaviour, agent)
    return outcome


def test_garbage_from_the_relay_after_authentication_closes_the_tunnel_with_a_clear_log_line(caplog) -> None:
    async def garbage_later(ws: web.WebSocketResponse) -> None:
        relay = ScriptedRelay(ws)
        await relay.authenticate(binds=False)
        await ws.send_bytes(b"\x42" * 100)
        await relay.until_agent_leaves()

    with caplog.at_level(logging.WARNING):
        outcome = asyncio.run(asyncio.wait_for(agent_against(garbage_later, TunnelOptions()), SCENARIO_TIMEOUT))
    assert outcome["ended"]
    assert outcome["session"].close_reason[:1] == (ErrorCode.PROTOCOL_ERROR,)
    assert any("broke the protocol (PROTOCOL_ERROR: unknown frame type 0x42)" in r.getMessage()
               for r in caplog.records)


def test_a_relay_that_sends_past_the_window_ends_the_tunnel_with_flow_control_error(caplog) -> None:
    window = 64 * 1024
    seen: list = []

    async def past_the_window(ws: web.WebSocketResponse) -> None:
        relay = ScriptedRelay(ws)
        await relay.authenticate(binds=True)
        stream_id = relay.conn.open_stream("svc")
        await relay.send_queued()
        # One frame of window + 1 bytes, which a correct relay's core would refuse to send.
        await ws.send_bytes(encode_frame(FrameType.DATA, 0, stream_id, bytes(window + 1)))
        await relay.until_agent_leaves()
        seen.extend(relay.events)

    async def scenario() -> dict:
        async with echo_service() as port:
            options = TunnelOptions(limits=ProtocolLimits(initial_window=window), binds={"svc": ("127.0.0.1", port)})
            return await agent_against(past_the_window, options)

    with caplog.at_level(logging.WARNING):
        outcome = asyncio.run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))
    assert outcome["ended"]
    assert outcome["session"].close_reason[0] is ErrorCode.FLOW_CONTROL_ERROR
    assert any("broke the protocol (FLOW_CONTROL_ERROR: 65537 bytes of DATA exceed" in r.getMessage()
               for r in caplog.records)
    # The relay was told why, in a GOAWAY.
    assert [e.code for e in seen if isinstance(e, ConnectionTerminated)] == [ErrorCode.FLOW_CONTROL_ERROR]


def test_a_stream_flood_from_the_relay_is_refused_past_the_limit_and_the_tunnel_stays(caplog) -> None:
    limit, flood = 16, 400
    seen: list = []

    async def flood_of_opens(ws: web.WebSocketResponse) -> None:
        relay = ScriptedRelay(ws)
        await relay.authenticate(binds=True)
        for _ in range(flood):
            relay.conn.open_stream("svc")
        await relay.send_queued()  # one burst
        for _ in range(50):  # bounded: the answers come within a few messages
            await relay.receive(0.2)
            answered = sum(1 for e in relay.events if isinstance(e, (StreamReset, StreamAccepted)))
            if answered >= flood:
                break
        seen.extend(relay.events)
        await relay.until_agent_leaves()

    async def scenario() -> dict:
        async with echo_service() as port:
            options = TunnelOptions(limits=ProtocolLimits(max_streams=limit), binds={"svc": ("127.0.0.1", port)})
            return await agent_against(flood_of_opens, options, within=3.0)

    outcome = asyncio.run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))
    refused = [e for e in seen if isinstance(e, StreamReset) and e.code is ErrorCode.REFUSED_STREAM]
    accepted = [e for e in seen if isinstance(e, StreamAccepted)]
    assert len(refused) == flood - limit and len(accepted) == limit
    assert f"allows {limit} open streams" in refused[0].reason
    assert not outcome["ended"], "the flood ended the tunnel; refusing the streams is enough"
    assert outcome["streams"] == limit
