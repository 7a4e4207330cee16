"""The tunnel on TLS directly (Outpost's ALPN) and over a WebSocket, against the real relay and listener;
``auto``'s fallback against a relay that does not choose the ALPN."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from agent.identity.tls_trust import pinned_ssl_context
from agent.tunnel.client import TunnelOptions, open_tunnel
from agent.tunnel.tls_link import AlpnRefused, relay_address, tunnel_tls_context
from shared.protocol import AUTH_DEADLINE
from tests.agent.tunnel.test_tunnel_client import credentials, make_ca_and_server
from tests.controller.harness import client_tls_for, run, running_controller
from tests.controller.relay.relay_harness import SCENARIO_TIMEOUT, connect, enrolled


@pytest.mark.parametrize("transport", ["tls", "websocket", "auto"])
def test_the_relay_admits_a_tunnel_on_either_transport_and_carries_its_frames(tmp_path: Path,
                                                                                    transport: str) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl") as ctl:
            credentials_ = await enrolled(ctl, "gw-a")
            async with connect(ctl, credentials_, TunnelOptions(transport=transport)) as (session, _):
                assert session.relay_info["identity"] == credentials_.uri
                assert session.transport_kind == ("websocket" if transport == "websocket" else "tls")
                pong = asyncio.get_running_loop().create_future()
                session.pong_listeners.append(lambda rtt: pong.done() or pong.set_result(rtt))
                session.conn.ping(session.now())
                session.schedule_flush()
                assert await asyncio.wait_for(pong, 5) >= 0
                # A tunnel that passed AUTH no longer counts against the listener's unauthenticated caps.
                assert ctl.server.guards[0].admission.total == 0

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))


def test_a_silent_peer_on_the_alpn_counts_as_unauthenticated_and_is_closed_at_the_auth_deadline(
        tmp_path: Path) -> None:
    """No request-head deadline applies to a raw tunnel: the core's AUTH deadline must end one that says nothing."""
    async def scenario() -> tuple[bytes, float, int]:
        async with running_controller(tmp_path / "ctl") as ctl:
            context = tunnel_tls_context(client_tls_for(ctl.context))  # a context of its own: never the session's
            host, port = relay_address(ctl.url)
            reader, writer = await asyncio.open_connection(host, port, ssl=context, server_hostname="localhost")
            assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == "outpost/1"
            started = asyncio.get_running_loop().time()
            await asyncio.sleep(0.2)
            held = ctl.server.guards[0].admission.total
            received = b""
            try:
                while chunk := await reader.read(4096):  # the relay's CHALLENGE, then its close
                    received += chunk
            except ConnectionResetError:
                pass  # a deadline drops the connection with an RST (shared/tunnel/session.py)
            took = asyncio.get_running_loop().time() - started
            writer.close()
            return received, took, held

    received, took, held = run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))
    assert held == 1, "an unauthenticated tunnel must count against the listener's caps"
    assert received, "the relay sends its CHALLENGE first"
    assert took <= AUTH_DEADLINE + 3.0, took


async def _relay_without_alpn(agent_options: TunnelOptions) -> tuple[str, BaseException | None]:
    """A WebSocket relay whose TLS does not offer Outpost's ALPN: what ``agent_options`` make of it."""
    ca_pem, server_tls = make_ca_and_server()
    upgraded = asyncio.Event()

    async def handle(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(protocols=("outpost.v1",))
        await ws.prepare(request)
        upgraded.set()
        await ws.receive()
        return ws

    app = web.Application()
    app.router.add_get("/v1/tunnel", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_tls)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    url = f"wss://127.0.0.1:{port}/v1/tunnel"
    try:
        async with aiohttp.ClientSession() as http:
            try:
                await open_tunnel(http, url, credentials(ca_pem), pinned_ssl_context(ca_pem), agent_options)
            except Exception as error:  # noqa: BLE001 - the test judges which
                return ("websocket" if upgraded.is_set() else "none"), error
            return "websocket", None
    finally:
        await runner.cleanup()


def test_auto_falls_back_to_the_websocket_when_the_relay_does_not_choose_the_alpn_and_remembers_it() -> None:
    options = TunnelOptions(transport="auto")
    reached, error = asyncio.run(asyncio.wait_for(_relay_without_alpn(options), SCENARIO_TIMEOUT))
    # The fake relay never authenticates: what matters is that the WebSocket upgrade came after TLS was refused.
    assert reached == "websocket", error
    assert len(options.fallback_until) == 1


def test_tls_only_does_not_fall_back_and_says_the_relay_does_not_speak_the_alpn() -> None:
    options = TunnelOptions(transport="tls")
    reached, error = asyncio.run(asyncio.wait_for(_relay_without_alpn(options), SCENARIO_TIMEOUT))
    assert reached == "none"
    assert isinstance(error, AlpnRefused)
    assert "does not speak outpost/1 on TLS" in str(error)
    assert not options.fallback_until


def test_auto_does_not_fall_back_past_a_certificate_problem() -> None:
    from agent.errors import TrustError

    async def scenario() -> tuple[str, BaseException | None]:
        _, server_tls = make_ca_and_server()
        other_ca, _ = make_ca_and_server()
        server_tls.set_alpn_protocols(["outpost/1"])
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0, ssl=server_tls)
        port = server.sockets[0].getsockname()[1]
        try:
            options = dataclasses.replace(TunnelOptions(transport="auto"))
            async with aiohttp.ClientSession() as http:
                try:
                    await open_tunnel(http, f"wss://127.0.0.1:{port}/v1/tunnel", credentials(other_ca),
                                      pinned_ssl_context(other_ca), options)
                except Exception as error:  # noqa: BLE001
                    return str(options.fallback_until), error
            return "", None
        finally:
            server.close()

    fallback, error = asyncio.run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))
    assert isinstance(error, TrustError), error
    assert fallback == "{}"


class HttpOnlyProxy:
    """A CONNECT proxy that reads the ClientHello and drops a TLS that does not offer only HTTP's ALPN,
    as an inspecting site proxy does: the tunnel's TLS to the relay breaks, a WebSocket's passes."""

    def __init__(self) -> None:
        self.carried = 0
        self.dropped = 0
        self.port = 0

    async def start(self) -> HttpOnlyProxy:
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        host, _, port = head.split(" ", 2)[1].rpartition(":")
        up_reader, up_writer = await asyncio.open_connection(host, int(port))
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        hello = await reader.read(16384)
        if b"outpost/1" in hello:
            self.dropped += 1
            writer.transport.abort()
            up_writer.close()
            return
        self.carried += 1
        up_writer.write(hello)
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer), return_exceptions=True)


async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    try:
        while data := await source.read(65536):
            sink.write(data)
            await sink.drain()
    finally:
        sink.close()


@pytest.mark.parametrize("transport", ["auto", "tls"])
def test_behind_a_proxy_that_passes_only_http_auto_tunnels_over_the_websocket_and_tls_says_why_not(
        tmp_path: Path, transport: str) -> None:
    from agent.errors import ControllerUnreachable
    from agent.proxy import ProxySettings

    async def scenario() -> tuple[str | None, BaseException | None, HttpOnlyProxy, TunnelOptions]:
        proxy = await HttpOnlyProxy().start()
        async with running_controller(tmp_path / "ctl") as ctl:
            credentials_ = await enrolled(ctl, "gw-a")
            options = TunnelOptions(transport=transport, proxy=ProxySettings(url=f"http://127.0.0.1:{proxy.port}"))
            try:
                async with connect(ctl, credentials_, options) as (session, _):
                    return session.transport_kind, None, proxy, options
            except ControllerUnreachable as error:
                return None, error, proxy, options

    kind, error, proxy, options = run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))
    assert proxy.dropped == 1, "the first try is always TLS"
    if transport == "auto":
        assert kind == "websocket" and proxy.carried == 1, error
        assert len(options.fallback_until) == 1
    else:
        assert kind is None and "broke during TLS" in str(error), error
        assert proxy.carried == 0 and not options.fallback_until
