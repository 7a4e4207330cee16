"""A fleet behind one path: reconnections after a relay restart spread out; a CONNECT proxy carries the tunnel."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path

from agent.proxy import ProxySettings
from agent.tunnel.link_profiles import plan_for
from tests.controller.harness import run, running_controller
from tests.e2e.connect_proxy import ConnectProxy
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


def test_the_tunnel_goes_through_an_https_connect_proxy(tmp_path: Path) -> None:
    proxy = ConnectProxy()

    async def body() -> None:
        async with running_controller(tmp_path / "ctl") as ctl:
            creds = await enrolled(ctl, "gw-proxied", ["gateway"])
            await proxy.start()
            plan = plan_for("ethernet", keepalive_interval=1.0, ping_timeout=2.0)
            try:
                async with gateway(creds, [relay_url(relay_port(ctl))], plan, proxy=ProxySettings(proxy.url())) as gw:
                    await gw.wait_connected(15)
                    await asyncio.sleep(2.5)  # keepalives answered through the proxy
                    assert gw.supervisor.connected.is_set()
                    assert gw.supervisor.session.last_rtt is not None
            finally:
                proxy.close()

    run(asyncio.wait_for(body(), 60))
    assert len(proxy.carried) == 1


def test_a_proxy_asking_for_a_login_gets_the_one_in_the_proxy_url_and_the_password_is_never_shown(
        tmp_path: Path, caplog) -> None:
    secret = "pr0xy-s3cret"
    proxy = ConnectProxy(login=("outpost", secret))

    async def body() -> str:
        async with running_controller(tmp_path / "ctl") as ctl:
            creds = await enrolled(ctl, "gw-login", ["gateway"])
            await proxy.start()
            try:
                good = plan_for("ethernet", keepalive_interval=1.0, ping_timeout=2.0)
                async with gateway(creds, [relay_url(relay_port(ctl))], good,
                                   proxy=ProxySettings(proxy.url("outpost", secret))) as gw:
                    await gw.wait_connected(15)
                    await asyncio.sleep(1.5)  # keepalives answered through the proxy
                    assert gw.supervisor.session.last_rtt is not None
                wrong = plan_for("ethernet", reconnect_initial=0.5, reconnect_max=1.0)
                async with gateway(creds, [relay_url(relay_port(ctl))], wrong,
                                   proxy=ProxySettings(proxy.url("outpost", f"not-{secret}"))) as gw:
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
    assert len(proxy.carried) == 1
    assert error.startswith(f"the proxy http://127.0.0.1:{proxy.port} refused to carry the connection to the relay at "
                            "wss://127.0.0.1:"), error
    assert error.endswith("(HTTP 407); check the user and password in [link] proxy"), error
    assert secret not in error and all(secret not in r.getMessage() for r in caplog.records)
