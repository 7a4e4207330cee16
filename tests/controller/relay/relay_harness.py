"""Agents for the relay tests: the agent's own tunnel client against a real controller on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.identity.csr import build_csr
from agent.identity.ephemeral import EphemeralKeyStore
from agent.identity.tls_trust import pinned_ssl_context
from agent.tunnel.client import AgentSession, TunnelCredentials, TunnelOptions, open_tunnel
from tests.controller.harness import Running, store_snapshot

# Bounds every scenario: nothing here should take more than a few seconds.
SCENARIO_TIMEOUT = 30.0


def csr_for(keystore: EphemeralKeyStore, name: str) -> str:
    return build_csr(keystore, name).public_bytes(serialization.Encoding.PEM).decode()


def new_keystore() -> EphemeralKeyStore:
    keystore = EphemeralKeyStore()
    keystore.create()
    return keystore


def credentials_from(issued: dict, keystore: EphemeralKeyStore) -> TunnelCredentials:
    """Tunnel credentials from an enrollment or session answer of the controller."""
    return TunnelCredentials(uri=issued["identity"], chain_pem=[issued["certificate"]], ca_pem=issued["ca"],
                             keystore=keystore)


async def redeem(ctl: Running, token: str, name: str) -> TunnelCredentials:
    """Enroll with ``token`` and a new in-memory key."""
    keystore = new_keystore()
    status, body = await ctl.call("POST", "/v1/enroll", {"token": token, "csr": csr_for(keystore, name)}, admin=False)
    assert status == 200, body
    return credentials_from(body, keystore)


async def enrolled(ctl: Running, name: str, roles: list[str] | None = None) -> TunnelCredentials:
    """A new identity enrolled with its token and an in-memory key."""
    created = await ctl.create_identity(name, ["gateway"] if roles is None else roles)
    return await redeem(ctl, created["token"], name)


async def session_credentials(ctl: Running, name: str = "operator") -> TunnelCredentials:
    """A session certificate for ``name`` over the management API, as ``outpostctl connect`` gets one."""
    keystore = new_keystore()
    status, body = await ctl.call("POST", f"/api/v1/identities/{name}/session", {"csr": csr_for(keystore, name)})
    assert status == 201, body
    return credentials_from(body, keystore)


def relay_url(ctl: Running) -> str:
    return ctl.url.replace("https://", "wss://") + "/v1/tunnel"


@contextlib.asynccontextmanager
async def connect(ctl: Running, credentials: TunnelCredentials,
                  options: TunnelOptions | None = None) -> AsyncIterator[tuple[AgentSession, Any]]:
    """An authenticated tunnel to ``ctl``'s relay, open for the block."""
    async with aiohttp.ClientSession() as http:
        ssl_context = pinned_ssl_context(credentials.ca_pem)
        session, task = await open_tunnel(http, relay_url(ctl), credentials, ssl_context, options or TunnelOptions())
        try:
            yield session, task
        finally:
            await session.close()
            await task


def foreign_certificate(uri: str, key: ec.EllipticCurvePrivateKey) -> str:
    """A certificate naming ``uri``, signed by a CA that is not the controller's."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
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


#: How long a test waits for an audit row the relay writes in a worker thread.
AUDIT_ROW_WAIT = 5.0


async def tunnel_closed_recorded(ctl: Running, name: str) -> None:
    """Wait (bounded) for a ``tunnel_closed`` row of ``name``: the relay writes it in a worker thread
    after the tunnel ended, so a store snapshot taken at once may miss it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + AUDIT_ROW_WAIT
    while loop.time() < deadline:
        rows = store_snapshot(ctl.context.settings.store_path)["audit"]
        if any(row[2] == "tunnel_closed" and f'/{name}"' in row[3] for row in rows):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"no tunnel_closed row for {name} within {AUDIT_ROW_WAIT} s")
