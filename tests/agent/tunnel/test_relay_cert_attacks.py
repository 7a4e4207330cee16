"""RELAY_CERT attacked at the agent: another key, trailing bytes, a certificate outliving the CA, clock steps.

The same real TLS relay on 127.0.0.1 and fake trusted clock as
tests/agent/tunnel/test_relay_cert_trust.py.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging

import aiohttp
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

import agent.tunnel.client as agent_client
from agent.identity.ephemeral import EphemeralKeyStore
from agent.identity.tls_trust import pinned_ssl_context
from agent.tunnel.client import TunnelCredentials, TunnelOptions, open_tunnel
from shared.protocol import Connection
from shared.trust import cert_not_after
from tests.agent.tunnel.relay_pki import der, relay_certificate
from tests.agent.tunnel.test_relay_cert_trust import (
    LIFE,
    FakeRelay,
    RelayEnd,
    closed_within,
    fake_relay,
    near_the_end,
    run,
    tunnel,
)


def _refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "refused the renewed certificate" in r.getMessage()]


def test_a_renewal_for_a_new_key_is_taken_when_that_key_signs_the_binding(caplog: pytest.LogCaptureFixture) -> None:
    """The signature binds the tunnel's nonce and the new certificate, and proves its key: a relay may
    change keys at renewal. The key of the tunnel's TLS handshake cannot stand in for the new one."""
    async def scenario() -> None:
        async with fake_relay() as relay:
            async with tunnel(relay, near_the_end(relay, left=LIFE / 2)) as (session, end):
                new_key = ec.generate_private_key(ec.SECP256R1())
                renewed = der(relay_certificate(relay.ca, new_key, lifetime=2 * LIFE))
                await end.push(renewed, end.sign(relay.key, renewed))  # signed by the handshake's key
                await asyncio.sleep(0.2)
                assert session.trusted is not None and session.trusted.certificate == relay.certificate
                await end.push(renewed, end.sign(new_key, renewed))
                await asyncio.sleep(0.2)
                assert der(session.trusted.certificate) == renewed and not session.conn.closed

    with caplog.at_level(logging.WARNING, logger="agent.tunnel.client"):
        run(scenario)
    [line] = _refusals(caplog)
    assert "not signed over this tunnel" in line


def test_a_certificate_with_trailing_bytes_is_refused_even_when_signed(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        async with fake_relay() as relay:
            async with tunnel(relay, near_the_end(relay, left=LIFE / 2)) as (session, end):
                padded = der(relay_certificate(relay.ca, relay.key, lifetime=2 * LIFE)) + b"\0"
                await end.push(padded, end.sign(relay.key, padded))
                await asyncio.sleep(0.2)
                assert session.trusted is not None and session.trusted.certificate == relay.certificate
                assert not session.conn.closed

    with caplog.at_level(logging.WARNING, logger="agent.tunnel.client"):
        run(scenario)
    [line] = _refusals(caplog)
    assert "not a certificate" in line


def test_a_push_outliving_the_pinned_ca_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    """The handshake refuses a relay once the pinned CA has ended; a push must not carry a tunnel past it."""
    async def scenario() -> None:
        async with fake_relay() as relay:
            async with tunnel(relay, near_the_end(relay, left=LIFE / 2)) as (session, end):
                ca_end = cert_not_after(relay.ca.certificate)
                lifetime = (ca_end - dt.datetime.now(dt.UTC)).total_seconds() + LIFE
                outliving = der(relay_certificate(relay.ca, relay.key, lifetime=lifetime))
                await end.push(outliving, end.sign(relay.key, outliving))
                await asyncio.sleep(0.2)
                assert session.trusted is not None and session.trusted.certificate == relay.certificate
                assert session.trusted.leave_at <= ca_end.timestamp() and not session.conn.closed

    with caplog.at_level(logging.WARNING, logger="agent.tunnel.client"):
        run(scenario)
    [line] = _refusals(caplog)
    assert "outlives the pinned controller CA" in line


def test_a_clock_stepped_forward_past_the_leave_leaves_within_the_recheck(monkeypatch: pytest.MonkeyPatch) -> None:
    """An NTP step forward past the leave moment: the agent notices at its next recheck (TRUST_RECHECK)."""
    monkeypatch.setattr(agent_client, "TRUST_RECHECK", 0.5)

    async def scenario() -> None:
        async with fake_relay() as relay:
            clock = near_the_end(relay, left=LIFE / 2)
            async with tunnel(relay, clock) as (session, end):
                await asyncio.sleep(0.6)
                assert not session.conn.closed
                clock.offset += LIFE  # past the certificate's end
                await closed_within(session, end, 3.0)
                assert end.goaway is not None and "certificate ends" in end.goaway.reason

    run(scenario)


def test_a_clock_stepped_back_keeps_the_tunnel_by_trusted_time_as_the_handshake_would(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The leave moment is a moment of trusted time: stepped back, the tunnel stays as long as a new
    handshake at that time would be accepted; stepped forward again, it goes."""
    monkeypatch.setattr(agent_client, "TRUST_RECHECK", 0.5)

    async def scenario() -> None:
        async with fake_relay() as relay:
            clock = near_the_end(relay, left=1.0)
            async with tunnel(relay, clock) as (session, end):
                leave_at = session.trusted.leave_at if session.trusted else 0.0
                clock.offset -= 3600.0
                await asyncio.sleep(2.0)  # past the end by the clock it trusted before the step
                assert not session.conn.closed and session.trusted is not None
                assert session.trusted.leave_at == leave_at
                clock.offset += 3600.0
                await closed_within(session, end, 3.0)

    run(scenario)


class PushingAtAdmission(FakeRelay):
    """A relay whose TLS handshake came just before its renewal: it pushes right behind AUTH_OK, in the
    same write, as controller/relay/cert_push.py ``push_if_missed`` does at admission."""

    renewed: bytes = b""

    def admitted(self, conn: Connection, end: RelayEnd) -> None:
        conn.send_relay_certificate(self.renewed, end.sign(self.key, self.renewed))


@pytest.mark.parametrize("binds", [{}, {"default/plc": ("127.0.0.1", 1)}], ids=["no binds", "binds"])
def test_a_push_right_behind_auth_ok_is_taken(binds: dict[str, tuple[str, int]]) -> None:
    async def scenario() -> None:
        async with fake_relay(kind=PushingAtAdmission) as relay:
            assert isinstance(relay, PushingAtAdmission)
            relay.renewed = der(relay_certificate(relay.ca, relay.key, lifetime=2 * LIFE))
            keystore = EphemeralKeyStore()
            keystore.create()
            credentials = TunnelCredentials(uri="spiffe://outpost.local/default/gw", chain_pem=["-"],
                                            ca_pem=relay.ca.pem, keystore=keystore)
            options = TunnelOptions(clock=near_the_end(relay, left=LIFE / 2),  # type: ignore[arg-type]
                                    transport="websocket", binds=binds)
            async with aiohttp.ClientSession() as http:
                session, task = await open_tunnel(http, relay.url, credentials, pinned_ssl_context(relay.ca.pem),
                                                  options)
                try:
                    await asyncio.sleep(0.2)
                    assert session.conn.relay_certificates == 1
                    assert session.trusted is not None and der(session.trusted.certificate) == relay.renewed
                finally:
                    await session.close()
                    await task

    run(scenario)
