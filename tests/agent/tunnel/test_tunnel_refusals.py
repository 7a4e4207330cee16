"""How the agent reads a relay's refusal of its AUTH: revoked ends the agent, disabled does not.

The relay is a real TLS WebSocket server on 127.0.0.1 speaking the relay side of the protocol
(``Connection``): it sends CHALLENGE, reads the agent's AUTH and closes with the code under test.
"""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import web

from agent.errors import EXIT_IDENTITY_REFUSED, TunnelRefused
from agent.identity.refusals import DISABLED, REVOKED, identity_status
from shared.protocol import AuthReceived, Connection, ErrorCode, Role
from tests.agent.tunnel.test_tunnel_client import SCENARIO_TIMEOUT, try_tunnel, with_fake_relay


def refusing(code: ErrorCode, reason: str):
    async def behaviour(ws: web.WebSocketResponse) -> None:
        loop = asyncio.get_running_loop()
        conn = Connection(Role.RELAY, loop.time())
        conn.send_challenge(bytes(32))
        await ws.send_bytes(conn.data_to_send())
        while True:
            message = await ws.receive()
            if message.type != aiohttp.WSMsgType.BINARY:
                return
            if any(isinstance(e, AuthReceived) for e in conn.receive_data(message.data, loop.time())):
                conn.close(code, reason)
                await ws.send_bytes(conn.data_to_send())
                await ws.close()
                return
    return behaviour


def refusal(code: ErrorCode, reason: str) -> TunnelRefused:
    caught: list[TunnelRefused] = []

    async def agent(url: str, ca_pem: str) -> None:
        with pytest.raises(TunnelRefused) as refused:
            await try_tunnel(url, ca_pem)
        caught.append(refused.value)

    asyncio.run(asyncio.wait_for(with_fake_relay(refusing(code, reason), agent), SCENARIO_TIMEOUT))
    return caught[0]


def test_revoked_is_terminal_with_exit_77_and_says_what_helps() -> None:
    error = refusal(ErrorCode.REVOKED, "identity default/gw is revoked")
    assert identity_status(error) == REVOKED
    assert error.terminal and error.exit_code == EXIT_IDENTITY_REFUSED
    assert "identity default/gw is revoked" in str(error) and "new identity" in str(error)


def test_disabled_is_not_terminal_and_says_who_can_enable_it() -> None:
    error = refusal(ErrorCode.DISABLED, "identity default/gw is disabled")
    assert identity_status(error) == DISABLED and not error.terminal
    assert "outpostctl identity enable" in str(error)


def test_a_relay_from_before_the_disabled_code_is_read_by_its_reason() -> None:
    # Such a relay says REVOKED for a disabled identity too; stopping the agent would need a site visit.
    error = refusal(ErrorCode.REVOKED, "identity default/gw is disabled")
    assert identity_status(error) == DISABLED and not error.terminal


def test_other_refusals_are_neither() -> None:
    error = refusal(ErrorCode.AUTH_FAILED, "the certificate names no identity this controller knows")
    assert identity_status(error) is None and not error.terminal


def test_the_controllers_relay_sends_disabled_and_revoked_as_their_own_codes(tmp_path) -> None:
    from agent.identity.select import open_keystore
    from agent.identity.tls_trust import pinned_ssl_context
    from agent.tunnel.client import TunnelCredentials, TunnelOptions, open_tunnel
    from tests.agent.identity.test_renewal_keeper import SOFTWARE, enrolled_gateway
    from tests.controller.harness import run, running_controller

    async def refused_as(running, state) -> TunnelRefused:
        identity = state.load()
        credentials = TunnelCredentials(identity.uri, [identity.cert_pem], identity.ca_pem,
                                        open_keystore(state.path, SOFTWARE))
        async with aiohttp.ClientSession() as http:
            with pytest.raises(TunnelRefused) as refused:
                await open_tunnel(http, identity.relays[0], credentials, pinned_ssl_context(identity.ca_pem),
                                  TunnelOptions())
        return refused.value

    async def scenario() -> None:
        async with running_controller(tmp_path / "c") as running:
            disabled = await enrolled_gateway(running, tmp_path, "gw-d")
            revoked = await enrolled_gateway(running, tmp_path, "gw-r")
            await running.call("POST", "/api/v1/identities/gw-d/disable")
            await running.call("POST", "/api/v1/identities/gw-r/revoke")
            error = await refused_as(running, disabled)
            assert (error.code, identity_status(error)) == (ErrorCode.DISABLED, DISABLED)
            error = await refused_as(running, revoked)
            assert (error.code, identity_status(error)) == (ErrorCode.REVOKED, REVOKED)

    run(scenario())
