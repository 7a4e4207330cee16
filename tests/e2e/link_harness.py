"""A real controller-plus-relay in-process, gateways behind the link emulator, and a dialer.

Everything runs in one asyncio loop on 127.0.0.1: the controller (real TLS,
real relay), TunnelSupervisors (the agent's own reconnect logic) whose path to
the relay goes through a ``LinkEmulator``, an echo service, and an operator
tunnel that dials it directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
from cryptography.hazmat.primitives import serialization

from agent.identity.csr import build_csr
from agent.identity.ephemeral import EphemeralKeyStore
from agent.identity.tls_trust import pinned_ssl_context
from agent.proxy import DIRECT, ProxySettings
from agent.tunnel.client import TunnelCredentials, TunnelOptions, open_tunnel
from agent.tunnel.link_profiles import LinkPlan
from agent.tunnel.runner import backoff_for, options_for
from agent.tunnel.supervisor import TunnelSupervisor
from shared.tunnel.channel import ChannelReset, StreamChannel
from tests.controller.harness import Running
from tests.linkemu.emulator import LinkEmulator, peer_gone
from tests.linkemu.profiles import LinkProfile

ECHO_SERVICE = "echo"
SOURCE_SERVICE = "source"
# What the source service sends per connection at most: far more than any
# test reads, yet a bound on a loop that sends.
SOURCE_LIMIT = 512 * 1024 * 1024
SOURCE_CHUNK = 256 * 1024


async def enrolled(ctl: Running, name: str, roles: list[str]) -> TunnelCredentials:
    """A freshly enrolled identity with its key in memory."""
    created = await ctl.create_identity(name, roles)
    keystore = EphemeralKeyStore()
    keystore.create()
    csr = build_csr(keystore, name).public_bytes(serialization.Encoding.PEM).decode()
    status, body = await ctl.call("POST", "/v1/enroll", {"token": created["token"], "csr": csr}, admin=False)
    assert status == 200, body
    return TunnelCredentials(uri=body["identity"], chain_pem=[body["certificate"]], ca_pem=body["ca"],
                             keystore=keystore)


async def allow_echo(ctl: Running, *services: str) -> None:
    """Gateways may bind ``echo`` (and ``services``); operators may dial them."""
    names = [ECHO_SERVICE, *services]
    requests = [("/api/v1/services", {"name": name, "roles": ["plc"]}) for name in names]
    requests += [
        ("/api/v1/policies", {"kind": "bind", "identities": ["role:gateway"], "services": names}),
        ("/api/v1/policies", {"kind": "dial", "identities": ["role:operator"], "services": ["role:plc"]}),
    ]
    for path, body in requests:
        status, answer = await ctl.call("POST", path, body)
        assert status == 201, answer


def relay_port(ctl: Running) -> int:
    return int(ctl.url.rsplit(":", 1)[1])


def relay_url(port: int) -> str:
    return f"wss://127.0.0.1:{port}/v1/tunnel"


@contextlib.asynccontextmanager
async def tcp_service(handle) -> AsyncIterator[int]:
    """Serve ``handle(reader, writer)`` on 127.0.0.1; yields the port. ``handle`` may raise ConnectionError."""
    async def guarded(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await handle(reader, writer)
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(guarded, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()


async def _source(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    block = bytes(SOURCE_CHUNK)
    for _ in range(SOURCE_LIMIT // SOURCE_CHUNK):
        writer.write(block)
        await writer.drain()


def echo_service():
    """A service that echoes every byte; yields its port."""
    return tcp_service(_echo)


def source_service():
    """A service that sends bytes as fast as it may until the connection ends (at most SOURCE_LIMIT); yields its port."""
    return tcp_service(_source)


# A service that stops reading: its socket's kernel receive buffer (Linux
# doubles it), so the bytes it swallows before pushing back are few.
STUCK_RECEIVE_BUFFER = 64 * 1024


class StuckService:
    """A service that accepts connections and never reads from them (a hung PLC, a full disk)."""

    def __init__(self) -> None:
        self.connections: list[asyncio.StreamWriter] = []
        self._server: asyncio.AbstractServer | None = None
        self.port = 0

    async def start(self) -> StuckService:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, STUCK_RECEIVE_BUFFER)
        sock.bind(("127.0.0.1", 0))

        async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.transport.pause_reading()  # not even asyncio's own buffer takes more
            self.connections.append(writer)

        self._server = await asyncio.start_server(hold, sock=sock)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def dropped(self) -> int:
        """Connections the gateway has ended (FIN or RST) though nothing was read."""
        return sum(1 for writer in self.connections if peer_gone(writer))

    async def close(self) -> None:
        for writer in self.connections:
            writer.transport.abort()
        if self._server is not None:
            self._server.close()


async def read_all(channel: StreamChannel, received: list[int], index: int) -> None:
    """Read a stream until it ends or is reset, counting its bytes into ``received[index]``."""
    try:
        while data := await channel.read():
            received[index] += len(data)
    except ChannelReset:
        pass


@dataclass
class Gateway:
    supervisor: TunnelSupervisor
    task: asyncio.Task

    async def wait_connected(self, timeout: float) -> float:
        """Seconds until the tunnel is up (raises on timeout)."""
        started = time.monotonic()
        await asyncio.wait_for(self.supervisor.connected.wait(), timeout)
        return time.monotonic() - started

    async def stop(self) -> None:
        self.supervisor.stop()
        await asyncio.wait_for(self.task, 10)


@contextlib.asynccontextmanager
async def gateway(credentials: TunnelCredentials, relays: list[str], plan: LinkPlan,
                  binds: dict[str, tuple[str, int]] | None = None, seed: int = 0,
                  saved: list | None = None, proxy: ProxySettings = DIRECT) -> AsyncIterator[Gateway]:
    """A TunnelSupervisor running the agent's reconnect loop with ``plan``'s timers (through ``proxy``)."""
    backoff = dataclasses.replace(backoff_for(plan), rng=random.Random(seed))  # the agent's own, seeded
    supervisor = TunnelSupervisor(relays, credentials, options_for(plan, binds, proxy), backoff=backoff,
                                  save_relays=None if saved is None else saved.append)
    task = asyncio.get_running_loop().create_task(supervisor.run())
    gw = Gateway(supervisor, task)
    try:
        yield gw
    finally:
        await gw.stop()


@contextlib.asynccontextmanager
async def emulated(port: int, profile: LinkProfile) -> AsyncIterator[LinkEmulator]:
    async with LinkEmulator("127.0.0.1", port, profile) as emu:
        yield emu


@contextlib.asynccontextmanager
async def operator_tunnel(ctl: Running, credentials: TunnelCredentials):
    """A direct (unemulated) tunnel from which streams are dialled."""
    async with aiohttp.ClientSession() as http:
        session, task = await open_tunnel(http, relay_url(relay_port(ctl)), credentials,
                                          pinned_ssl_context(credentials.ca_pem), TunnelOptions())
        try:
            yield session
        finally:
            await session.close()
            await task


async def echo_once(channel: StreamChannel, payload: bytes, timeout: float) -> bytes:
    """Write ``payload`` on an open stream and read the same number of bytes back."""
    await asyncio.wait_for(channel.write(payload), timeout)
    received = b""
    while len(received) < len(payload):
        chunk = await asyncio.wait_for(channel.read(), timeout)
        if not chunk:
            break
        received += chunk
    return received


async def dial_echo(operator, payload: bytes, timeout: float) -> bytes:
    """A fresh stream to ``echo``: one round trip, then end it."""
    channel = operator.open_stream(ECHO_SERVICE)
    await asyncio.wait_for(channel.wait_accepted(), timeout)
    try:
        return await echo_once(channel, payload, timeout)
    finally:
        channel.reset()
