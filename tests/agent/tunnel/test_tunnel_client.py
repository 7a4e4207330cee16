"""The agent's tunnel client against relays that misbehave.

The misbehaving relay is a real TLS WebSocket server on 127.0.0.1 whose
certificate comes from a CA made here, which the agent pins.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import logging
import ssl
import tempfile
from pathlib import Path
from typing import Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.errors import ControllerUnreachable
from agent.identity.ephemeral import EphemeralKeyStore
from agent.identity.trust import pinned_ssl_context
from agent.tunnel.client import TunnelCredentials, TunnelOptions, open_tunnel
from agent.tunnel.protocol import ErrorCode

SCENARIO_TIMEOUT = 20.0


def make_ca_and_server() -> tuple[str, ssl.SSLContext]:
    """A CA (PEM) and a server TLS context with a 127.0.0.1 certificate from it."""
    now = dt.datetime.now(dt.timezone.utc)
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


async def try_tunnel(url: str, ca_pem: str) -> None:
    async with aiohttp.ClientSession() as http:
        await open_tunnel(http, url, credentials(ca_pem), pinned_ssl_context(ca_pem), TunnelOptions())


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


def test_a_relay_that_never_answers_the_handshake_is_given_up_on() -> None:
    async def silent(ws: web.WebSocketResponse) -> None:
        await ws.receive()

    async def agent(url: str, ca_pem: str) -> None:
        started = asyncio.get_running_loop().time()
        with pytest.raises(ControllerUnreachable, match="no AUTH_OK within"):
            await try_tunnel(url, ca_pem)
        assert asyncio.get_running_loop().time() - started < SCENARIO_TIMEOUT - 2

    asyncio.run(asyncio.wait_for(with_fake_relay(silent, agent), SCENARIO_TIMEOUT))
