"""A fleet behind one path: reconnections after a relay restart spread out; a CONNECT proxy carries the tunnel."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
from pathlib import Path

from agent.tunnel.link_profiles import plan_for
from tests.controller.harness import run, running_controller
from tests.e2e.link_harness import emulated, enrolled, gateway, relay_port, relay_url
from tests.linkemu.profiles import CLEAN

FLEET = 20
# The first reconnect after a stable tunnel waits uniform(0, this) seconds.
SPREAD = 4.0


def test_after_a_relay_restart_a_fleet_reconnects_spread_out(tmp_path: Path) -> None:
    plan = plan_for("ethernet", keepalive_interval=5.0, ping_timeout=5.0, reconnect_initial=SPREAD,
                    reconnect_max=SPREAD * 4)

    async def body() -> None:
        async with running_controller(tmp_path / "ctl") as ctl:
            creds = [await enrolled(ctl, f"gw-fleet-{i}", ["gateway"]) for i in range(FLEET)]
            async with emulated(relay_port(ctl), CLEAN) as emu, contextlib.AsyncExitStack() as stack:
                gws = [await stack.enter_async_context(gateway(c, [relay_url(emu.port)], plan, seed=i))
                       for i, c in enumerate(creds)]
                await asyncio.wait_for(asyncio.gather(*(g.supervisor.connected.wait() for g in gws)), 60)
                for g in gws:
                    g.supervisor.backoff.reset()  # as after a stable period
                restart = time.monotonic()
                assert emu.reset_all() == FLEET
                await asyncio.sleep(0.5)
                await asyncio.wait_for(asyncio.gather(*(g.supervisor.connected.wait() for g in gws)), SPREAD + 15)
                arrivals = sorted(t - restart for t in emu.stats.arrivals if t > restart)
        assert len(arrivals) == FLEET
        within_first_second = sum(1 for t in arrivals if t <= 1.0)
        # Uniform over 4 s puts a quarter in the first second; all at once would be 100%.
        assert within_first_second <= FLEET // 2, arrivals
        assert arrivals[-1] - arrivals[0] >= SPREAD / 2, arrivals
        assert arrivals[-1] <= SPREAD + 5.0, arrivals

    run(asyncio.wait_for(body(), 150))


async def connect_proxy(counter: list[int], login: tuple[str, str] | None = None) -> asyncio.AbstractServer:
    """A minimal HTTP CONNECT proxy on 127.0.0.1 that counts tunnels it opened; with ``login``, Basic auth first."""
    expected = None if login is None else "Basic " + base64.b64encode(":".join(login).encode()).decode()

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        method, target, _ = head.split(b"\r\n", 1)[0].decode().split(" ", 2)
        host, _, port = target.rpartition(":")
        if method != "CONNECT" or host not in ("127.0.0.1", "localhost"):
            writer.write(b"HTTP/1.1 403 Forbidden\r\n\r\n")
            writer.close()
            return
        headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n")[1:] if ": " in line)
        if expected is not None and headers.get("Proxy-Authorization") != expected:
            writer.write(b'HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm="t"\r\n'
                         b"Content-Length: 0\r\n\r\n")
            await writer.drain()
            writer.close()
            return
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", int(port))
        counter.append(int(port))
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await writer.drain()
        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))

    return await asyncio.start_server(handle, "127.0.0.1", 0)


def test_the_tunnel_goes_through_an_https_connect_proxy(tmp_path: Path) -> None:
    tunnels: list[int] = []

    async def body() -> None:
        async with running_controller(tmp_path / "ctl") as ctl:
            creds = await enrolled(ctl, "gw-proxied", ["gateway"])
            proxy = await connect_proxy(tunnels)
            proxy_url = f"http://127.0.0.1:{proxy.sockets[0].getsockname()[1]}"
            plan = plan_for("ethernet", keepalive_interval=1.0, ping_timeout=2.0, proxy=proxy_url)
            try:
                async with gateway(creds, [relay_url(relay_port(ctl))], plan) as gw:
                    await gw.wait_connected(15)
                    await asyncio.sleep(2.5)  # keepalives answered through the proxy
                    assert gw.supervisor.connected.is_set()
                    assert gw.supervisor.session.last_rtt is not None
            finally:
                proxy.close()

    run(asyncio.wait_for(body(), 60))
    assert len(tunnels) == 1


def test_a_proxy_asking_for_a_login_gets_the_one_in_the_proxy_url_and_the_password_is_never_shown(
        tmp_path: Path, caplog) -> None:
    tunnels: list[int] = []
    secret = "pr0xy-s3cret"

    async def body() -> str:
        async with running_controller(tmp_path / "ctl") as ctl:
            creds = await enrolled(ctl, "gw-login", ["gateway"])
            proxy = await connect_proxy(tunnels, login=("outpost", secret))
            where = f"127.0.0.1:{proxy.sockets[0].getsockname()[1]}"
            try:
                good = plan_for("ethernet", keepalive_interval=1.0, ping_timeout=2.0, proxy=f"http://outpost:{secret}@{where}")
                async with gateway(creds, [relay_url(relay_port(ctl))], good) as gw:
                    await gw.wait_connected(15)
                    await asyncio.sleep(1.5)  # keepalives answered through the proxy
                    assert gw.supervisor.session.last_rtt is not None
                wrong = plan_for("ethernet", reconnect_initial=0.5, reconnect_max=1.0,
                                 proxy=f"http://outpost:not-{secret}@{where}")
                async with gateway(creds, [relay_url(relay_port(ctl))], wrong) as gw:
                    for _ in range(100):  # bounded: the first attempt answers within a second
                        if gw.supervisor.stats.last_error:
                            break
                        await asyncio.sleep(0.05)
                    assert not gw.supervisor.connected.is_set()
                    return gw.supervisor.stats.last_error or ""
            finally:
                proxy.close()

    with caplog.at_level(logging.DEBUG):
        error = run(asyncio.wait_for(body(), 60))
    assert len(tunnels) == 1
    assert "refused to carry the tunnel" in error and "(HTTP 407); check the user and password" in error, error
    assert secret not in error and all(secret not in r.getMessage() for r in caplog.records)
