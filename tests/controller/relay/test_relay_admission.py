"""The relay admits a tunnel only on what it verified itself.

A real controller (TLS, relay mounted) runs in-process on 127.0.0.1; agents
connect with the agent's own tunnel client.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.errors import TrustError, TunnelRefused
from agent.identity.csr import build_csr
from agent.identity.ephemeral import EphemeralKeyStore
from agent.identity.trust import pinned_ssl_context
from agent.tunnel.client import TunnelCredentials, TunnelOptions, open_tunnel
from agent.tunnel.protocol import SUBPROTOCOL, ProtocolLimits

from tests.controller.harness import Running, run, running_controller

# Bounds every scenario: nothing here should take more than a few seconds.
SCENARIO_TIMEOUT = 30.0


async def enrolled(ctl: Running, name: str) -> TunnelCredentials:
    created = await ctl.create_identity(name, ["gateway"])
    keystore = EphemeralKeyStore()
    keystore.create()
    csr = build_csr(keystore, name).public_bytes(serialization.Encoding.PEM).decode()
    status, body = await ctl.call("POST", "/v1/enroll", {"token": created["token"], "csr": csr}, admin=False)
    assert status == 200, body
    return TunnelCredentials(uri=body["identity"], chain_pem=[body["certificate"]], ca_pem=body["ca"], keystore=keystore)


def relay_url(ctl: Running) -> str:
    return ctl.url.replace("https://", "wss://") + "/v1/tunnel"


@contextlib.asynccontextmanager
async def connect(ctl: Running, credentials: TunnelCredentials):
    """An authenticated tunnel to ``ctl``'s relay, open for the block."""
    async with aiohttp.ClientSession() as http:
        ssl_context = pinned_ssl_context(credentials.ca_pem)
        session, task = await open_tunnel(http, relay_url(ctl), credentials, ssl_context, TunnelOptions())
        try:
            yield session, task
        finally:
            await session.close()
            await task


def foreign_certificate(uri: str, key: ec.EllipticCurvePrivateKey) -> str:
    """A certificate naming ``uri``, signed by a CA that is not the controller's."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Outpost CA")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "forged")]))
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode()


class KeyOf(EphemeralKeyStore):
    """An in-memory key store around a given key (to present someone's certificate with a wrong key)."""

    def __init__(self, key: ec.EllipticCurvePrivateKey) -> None:
        super().__init__()
        self._key = key


def test_an_enrolled_agent_is_admitted_under_the_identity_in_its_certificate(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl") as ctl:
            credentials = await enrolled(ctl, "gw-a")
            async with connect(ctl, credentials) as (session, _):
                assert session.relay_info["identity"] == credentials.uri == "spiffe://outpost.local/default/gw-a"

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))


def test_a_certificate_from_another_ca_is_refused_even_for_a_known_identity(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl") as ctl:
            genuine = await enrolled(ctl, "gw-b")
            key = ec.generate_private_key(ec.SECP256R1())
            forged = TunnelCredentials(uri=genuine.uri, chain_pem=[foreign_certificate(genuine.uri, key)],
                                       ca_pem=genuine.ca_pem, keystore=KeyOf(key))
            with pytest.raises(TunnelRefused, match="not issued by this controller's CA"):
                async with connect(ctl, forged):
                    pass

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))


def test_a_valid_certificate_with_the_wrong_key_is_refused(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl") as ctl:
            genuine = await enrolled(ctl, "gw-c")
            thief = TunnelCredentials(uri=genuine.uri, chain_pem=genuine.chain_pem, ca_pem=genuine.ca_pem,
                                      keystore=KeyOf(ec.generate_private_key(ec.SECP256R1())))
            with pytest.raises(TunnelRefused, match="signature does not verify"):
                async with connect(ctl, thief):
                    pass

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))


def test_a_revoked_identity_is_refused_and_its_live_tunnel_closed(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl") as ctl:
            credentials = await enrolled(ctl, "gw-d")
            async with connect(ctl, credentials) as (session, task):
                status, _ = await ctl.call("POST", "/api/v1/identities/gw-d/revoke")
                assert status == 200
                await asyncio.wait_for(task, 2.0)
                assert "revoked" in session.close_reason[1]
            with pytest.raises(TunnelRefused, match="revoked"):
                async with connect(ctl, credentials):
                    pass

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))


def test_a_relay_whose_certificate_is_not_from_the_pinned_ca_is_not_trusted(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "real") as real, running_controller(tmp_path / "impostor") as impostor:
            credentials = await enrolled(real, "gw-e")
            with pytest.raises(TrustError, match="not issued by the pinned controller CA"):
                async with aiohttp.ClientSession() as http:
                    await open_tunnel(http, relay_url(impostor), credentials,
                                      pinned_ssl_context(credentials.ca_pem), TunnelOptions())

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))


def test_garbage_on_a_tunnel_closes_that_tunnel_and_no_other(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl") as ctl:
            credentials = await enrolled(ctl, "gw-f")
            async with connect(ctl, credentials) as (session, task), aiohttp.ClientSession() as http:
                ws = await http.ws_connect(relay_url(ctl), ssl=ctl.client_tls, protocols=(SUBPROTOCOL,))
                await ws.receive()  # the CHALLENGE
                await ws.send_bytes(b"\xff" * 64)
                closing = await asyncio.wait_for(ws.receive(), 5.0)
                while closing.type == aiohttp.WSMsgType.BINARY:  # the GOAWAY frame, then the close
                    closing = await asyncio.wait_for(ws.receive(), 5.0)
                assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
                assert not session.conn.closed and not task.done()

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))


def test_a_peer_that_does_not_authenticate_in_time_is_dropped(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl") as ctl:
            async with aiohttp.ClientSession() as http:
                ws = await http.ws_connect(relay_url(ctl), ssl=ctl.client_tls, protocols=(SUBPROTOCOL,))
                started = asyncio.get_running_loop().time()
                while True:
                    msg = await asyncio.wait_for(ws.receive(), ProtocolLimits().auth_deadline + 5)
                    if msg.type != aiohttp.WSMsgType.BINARY:
                        break
                waited = asyncio.get_running_loop().time() - started
                assert ProtocolLimits().auth_deadline - 1 <= waited <= ProtocolLimits().auth_deadline + 3

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))
