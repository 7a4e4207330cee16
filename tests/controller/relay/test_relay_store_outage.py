"""The relay while its PostgreSQL store is away: live tunnels stay, what needs the store is refused saying why.

Then the store comes back and the same relay, not restarted, admits and decides again.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

pytest.importorskip("psycopg", reason="psycopg is not installed (python3-psycopg)")

from agent.errors import ControllerUnreachable  # noqa: E402
from agent.tunnel.client import TunnelOptions  # noqa: E402
from controller.store_postgres import CONNECT_HOLDOFF_SECONDS  # noqa: E402
from shared.protocol import ErrorCode  # noqa: E402
from shared.tunnel.session import ChannelReset  # noqa: E402
from tests.controller.harness import run, running_controller  # noqa: E402
from tests.controller.postgres_harness import PostgresServer, own_server  # noqa: E402, F401
from tests.controller.relay.relay_harness import SCENARIO_TIMEOUT, connect, enrolled, session_credentials  # noqa: E402
from tests.controller.relay.test_relay_decisions import DIAL_ANSWER_TIMEOUT, Echo, create  # noqa: E402


def test_while_the_store_is_down_live_tunnels_stay_and_dials_and_new_tunnels_are_refused_saying_why(
    own_server: PostgresServer, tmp_path: Path
) -> None:
    url = own_server.create_database()

    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl", store_url=url) as ctl, Echo() as echo:
            await create(ctl, "/api/v1/services", {"name": "modbus"})
            await create(ctl, "/api/v1/policies", {"kind": "bind", "identities": ["role:gateway"], "services": ["modbus"]})
            await create(ctl, "/api/v1/policies", {"kind": "dial", "identities": ["role:operator"], "services": ["modbus"]})
            gateway = await enrolled(ctl, "gw-a", ["gateway"])
            late = await enrolled(ctl, "gw-b", ["gateway"])
            operator = await session_credentials(ctl)
            binds = TunnelOptions(binds={"modbus": ("127.0.0.1", echo.port)})
            async with connect(ctl, gateway, binds) as (binder, _), connect(ctl, operator) as (dialer, _):
                assert binder.bound == ("modbus",)
                await asyncio.to_thread(own_server.stop)

                channel = dialer.open_stream("modbus")
                with pytest.raises(ChannelReset) as refused:
                    await asyncio.wait_for(channel.wait_accepted(), DIAL_ANSWER_TIMEOUT)
                assert refused.value.code == ErrorCode.SERVICE_UNAVAILABLE
                assert "cannot reach its store" in refused.value.reason and "postgresql" not in refused.value.reason
                # Unreachable, not refused: the agent retries on its backoff, as for a relay that is down.
                with pytest.raises(ControllerUnreachable, match="cannot reach its store right now"):
                    async with connect(ctl, late):
                        pass
                assert not binder.conn.closed and not dialer.conn.closed

                await asyncio.to_thread(own_server.start)
                await asyncio.sleep(CONNECT_HOLDOFF_SECONDS)  # refused at once for a moment after a failed connection
                channel = dialer.open_stream("modbus")
                await asyncio.wait_for(channel.wait_accepted(), DIAL_ANSWER_TIMEOUT)
                assert echo.connections == 1
                async with connect(ctl, late) as (session, _):
                    assert session.relay_info["name"] == "gw-b"

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))
