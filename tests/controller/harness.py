"""A real controller on loopback TLS, and clients that trust only its CA."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import sqlite3
import ssl
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from controller.bootstrap import open_data_dir
from controller.context import ControllerContext
from controller.server import ControllerServer, bind_listener
from controller.settings import Settings

T = TypeVar("T")
#: No single test step waits longer than this for the controller.
REQUEST_TIMEOUT = 20.0
#: SQLite's own AUTOINCREMENT counters: they move with the rows they count, which the snapshot holds.
SQLITE_INTERNAL_TABLES = ("sqlite_sequence",)

#: The audit chain's key for stores the tests open directly (a controller keeps its own in its data
#: directory, never in the store).
TEST_CHAIN_KEY = bytes(range(32))


def run(coroutine: Awaitable[T], loop: str = "asyncio") -> T:
    """Drive one async scenario to completion (no pytest-asyncio here) on asyncio's loop or uvloop."""
    if loop == "uvloop":
        from shared.event_loop import run as run_on

        return run_on(asyncio.wait_for(coroutine, 120), "uvloop")
    return asyncio.run(asyncio.wait_for(coroutine, 120))


@dataclasses.dataclass
class Running:
    context: ControllerContext
    url: str
    session: aiohttp.ClientSession
    client_tls: ssl.SSLContext
    server: ControllerServer
    #: The admin credential, from the outpostctl.toml the controller wrote (it keeps only a hash).
    admin_token: str = ""
    #: Where the management API is (its own listener, or ``url``).
    api_url: str = ""

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_token}"}

    async def call(self, method: str, path: str, body: Any = None, admin: bool = True) -> tuple[int, Any]:
        """One JSON request; returns (status, decoded JSON body)."""
        headers = self.admin if admin else {}
        base = self.api_url if path.startswith("/api/") and self.api_url else self.url
        async with self.session.request(method, base + path, json=body, headers=headers) as response:
            return response.status, await response.json(content_type=None)

    async def post_bytes(self, path: str, data: Any) -> tuple[int, Any]:
        """POST ``data`` as it is (bytes, or an async generator for a chunked body) without credentials."""
        async with self.session.post(self.url + path, data=data) as response:
            return response.status, await response.json(content_type=None)

    async def post_declaring(self, path: str, declared: int, first_bytes: bytes) -> bytes:
        """POST a ``declared``-byte body but send only ``first_bytes``; the answer's status line.

        An answer at all proves the controller judged the request from its header, without reading the body.
        """
        port = int(self.url.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=self.client_tls, server_hostname="localhost")
        try:
            writer.write(
                f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n".encode()
                + f"Content-Length: {declared}\r\n\r\n".encode()
                + first_bytes
            )
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
        finally:
            writer.close()
        return head.split(b"\r\n", 1)[0]

    async def create_identity(self, name: str, roles: list[str] | None = None, tenant: str = "default") -> dict:
        status, body = await self.call("POST", "/api/v1/identities", {"name": name, "roles": roles or [], "tenant": tenant})
        assert status == 201, body
        return body

    async def enroll(self, token: str, key: ec.EllipticCurvePrivateKey, name: str = "gw") -> tuple[int, Any]:
        return await self.call("POST", "/v1/enroll", {"token": token, "csr": make_csr(key, name)}, admin=False)


def client_tls_for(context: ControllerContext) -> ssl.SSLContext:
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    tls.minimum_version = ssl.TLSVersion.TLSv1_2
    tls.load_verify_locations(cadata=context.ca.certificate_pem)
    return tls


@contextlib.asynccontextmanager
async def running_controller(data_dir: Path, *, separate_api: bool = False, **overrides: Any) -> AsyncIterator[Running]:
    """The real server (TLS, middlewares, relay mounted) on 127.0.0.1 with an ephemeral port.

    ``separate_api``: the management API on a listener of its own (``--api-listen 127.0.0.1:0``).
    """
    listener = bind_listener("127.0.0.1", 0)
    api_listener = bind_listener("127.0.0.1", 0) if separate_api else None
    settings = Settings(data_dir=data_dir, listen_host="127.0.0.1", listen_port=listener.getsockname()[1],
                        api_listen_host="127.0.0.1" if separate_api else None,
                        api_listen_port=api_listener.getsockname()[1] if api_listener else None, **overrides)
    fresh = not data_dir.exists()
    context = open_data_dir(settings)
    server = ControllerServer(context, listener, api_listener)
    await server.start()
    tls = client_tls_for(context)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
    token = admin_token_of(data_dir) if fresh or settings.outpostctl_config_path.exists() else ""
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=tls), timeout=timeout) as session:
            yield Running(context, settings.base_url, session, tls, server, token, settings.api_url)
    finally:
        await server.stop()
        context.close()


def admin_token_of(data_dir: Path) -> str:
    """The admin token in the outpostctl.toml a controller wrote into ``data_dir``."""
    import tomllib

    return tomllib.loads((data_dir / "outpostctl.toml").read_text())["token"]


def make_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def make_csr(key: Any, name: str = "gw") -> str:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode("ascii")


#: Tables of live state, not history: presence rows and heartbeats are rewritten by the relay's batches
#: every 30 s (controller/presence.py) whatever a test does, as status.json is on a gateway.
LIVE_TABLES = frozenset({"presence", "presence_relays", "relay_services"})
#: Columns of live state in tables of history: a relay's heartbeat (the controller in role all is one,
#: controller/box_relay.py), written every 5 s whatever a test does.
LIVE_COLUMNS = {"relays": ("heartbeat_at", "started_at", "tunnels")}


def store_snapshot(path: Path, *, live: bool = False) -> dict[str, list[tuple]]:
    """Every row of every table the schema has, through a separate connection (as another process sees it).

    ``live``: the presence tables too (``LIVE_TABLES``), which change on their own every 30 s.
    """
    connection = sqlite3.connect(str(path))
    try:
        tables = [row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
                  if row[0] not in SQLITE_INTERNAL_TABLES and (live or row[0] not in LIVE_TABLES)]
        assert {"identities", "tokens", "policies", "status_changes", "audit"} <= set(tables), tables
        return {table: list(connection.execute(f"SELECT {_columns(connection, table, live)} FROM {table} ORDER BY 1"))
                for table in tables}
    finally:
        connection.close()


def _columns(connection: sqlite3.Connection, table: str, live: bool) -> str:
    left_out = () if live else LIVE_COLUMNS.get(table, ())
    return ", ".join(row[1] for row in connection.execute(f"PRAGMA table_info({table})") if row[1] not in left_out)


def audit_events_added(before: dict[str, list[tuple]], after: dict[str, list[tuple]]) -> list[tuple[str, dict]]:
    """The audit events appended between two snapshots, as (event, fields); fails if anything else changed.

    The random correlation id is left out (``audit_correlations_added`` has them); so are the relay
    process's name and the dialer's tunnel, which a dial's request names.
    """
    assert {t: rows for t, rows in after.items() if t != "audit"} == {t: rows for t, rows in before.items() if t != "audit"}
    assert after["audit"][: len(before["audit"])] == before["audit"], "the audit log was rewritten"
    added = []
    for row in after["audit"][len(before["audit"]):]:
        fields = json.loads(row[3])
        for varying in VARYING_AUDIT_FIELDS:
            fields.pop(varying, None)
        added.append((row[2], fields))
    return added


#: Audit fields whose value is random or names this process: compared apart.
VARYING_AUDIT_FIELDS = ("correlation", "relay", "tunnel", "gateway_tunnel")


def audit_correlations_added(before: dict[str, list[tuple]], after: dict[str, list[tuple]]) -> list[tuple[str, str]]:
    """(event, correlation id) of each audit event appended between two snapshots."""
    return [(row[2], json.loads(row[3])["correlation"]) for row in after["audit"][len(before["audit"]):]]


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_json(value: dict) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode())


def token_parts(token: str) -> tuple[dict, dict, str]:
    header, payload, signature = token.split(".")

    def decode(part: str) -> dict:
        return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))

    return decode(header), decode(payload), signature
