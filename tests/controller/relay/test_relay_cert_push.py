"""A relay presents its renewed certificate on its tunnels, to agents that said they understand it;
a revoked relay cannot renew, so a gateway it holds leaves by its certificate's end."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

import agent.tunnel.client as agent_client
from controller import relay_node
from controller.errors import StartupError
from controller.relays import read_token
from controller.settings import Settings
from tests.agent.tunnel.relay_pki import Authority
from tests.agent.tunnel.test_relay_cert_trust import LEFT, closed_within, fake_relay, near_the_end, tunnel
from tests.controller.harness import run, running_controller
from tests.controller.relay.relay_harness import SCENARIO_TIMEOUT, connect, enrolled
from tests.controller.relay.test_relay_decisions import dial_refusal


async def _until(condition, what: str, seconds: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"{what} did not happen within {seconds} s"
        await asyncio.sleep(0.05)


def test_a_renewal_is_pushed_to_agents_that_announced_it_and_to_no_older_agent(tmp_path: Path,
                                                                               monkeypatch) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl") as ctl:
            gateway = await enrolled(ctl, "gw-a")
            async with connect(ctl, gateway) as (current, _):
                # An agent from before RELAY_CERT: its AUTH does not carry the key.
                monkeypatch.setattr(agent_client, "RELAY_CERT_FEATURE", "from_before_relay_cert")
                async with connect(ctl, gateway) as (older, _):
                    monkeypatch.undo()
                    before = current.trusted
                    ctl.server.use_certificate(*await asyncio.to_thread(ctl.server.issue_certificate))
                    renewed = x509.load_der_x509_certificate(ctl.context.server_certificate_der)
                    await _until(lambda: current.conn.relay_certificates == 1, "the push")
                    assert current.trusted is not None and before is not None
                    assert current.trusted.certificate == renewed and current.trusted.not_after >= before.not_after
                    await asyncio.sleep(0.3)
                    assert older.conn.relay_certificates == 0  # it would read the frame as a protocol error
                    for session in (current, older):
                        assert not session.conn.closed
                        await dial_refusal(session, "no-such-service")

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))


def test_a_revoked_relay_cannot_renew_and_its_gateways_leave_by_its_certificate_s_end(tmp_path: Path,
                                                                                      caplog) -> None:
    """A relay machine stolen and revoked keeps running whatever it likes; the tunnels it holds still end."""
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl") as ctl:
            status, added = await ctl.call("POST", "/api/v1/relays", {"name": "r1", "address": "127.0.0.1:9443"})
            assert status == 201, added
            token_file = tmp_path / "r1.token"
            token_file.write_text(added["token"])
            settings = Settings(data_dir=tmp_path / "r1", store_file=ctl.context.settings.store_path, role="relay",
                                enroll_token=token_file)
            identity = await asyncio.to_thread(relay_node.enroll, settings, token_file)
            assert read_token(added["token"])["relay"] == identity.name
            key = serialization.load_pem_private_key(settings.server_key_path.read_bytes(), password=None)
            certificate = x509.load_pem_x509_certificate(settings.server_cert_path.read_bytes())
            ca = Authority(ctl.context.ca.signing_key, ctl.context.ca.certificate)
            # The stolen relay serves its real certificate and key; the gateway pins the controller's CA.
            async with fake_relay(ca=ca, key=key, certificate=certificate) as stolen:  # type: ignore[arg-type]
                async with tunnel(stolen, near_the_end(stolen)) as (session, end):
                    status, _ = await ctl.call("POST", "/api/v1/relays/r1/revoke")
                    assert status == 200
                    with pytest.raises(StartupError, match="not the key of an enrolled relay"):
                        await asyncio.to_thread(relay_node.renew, settings, identity)
                    # What it can still present is its old certificate: the one trusted, so nothing moves.
                    before = session.trusted
                    await end.push(stolen.certificate.public_bytes(serialization.Encoding.DER),
                                   end.sign(key, stolen.certificate.public_bytes(serialization.Encoding.DER)))  # type: ignore[arg-type]
                    await closed_within(session, end, LEFT + 5)
                    assert session.trusted is before
                    assert end.goaway is not None and "certificate ends" in end.goaway.reason

    with caplog.at_level(logging.DEBUG, logger="agent.tunnel.client"):
        run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))
    assert any("already trusts" in r.getMessage() for r in caplog.records)


def test_two_renewals_in_a_row_leave_the_tunnel_trusting_the_last_one(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl") as ctl:
            gateway = await enrolled(ctl, "gw-a")
            async with connect(ctl, gateway) as (session, _):
                for _ in range(2):
                    ctl.server.use_certificate(*await asyncio.to_thread(ctl.server.issue_certificate))
                last = x509.load_der_x509_certificate(ctl.context.server_certificate_der)
                await _until(lambda: session.trusted is not None and session.trusted.certificate == last,
                             "trusting the last certificate")
                await asyncio.sleep(0.3)
                assert session.pushes_refused == 0 and not session.conn.closed
                await dial_refusal(session, "no-such-service")

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))


def test_a_renewal_between_a_tunnel_s_handshake_and_its_challenge_is_pushed_at_admission(tmp_path: Path,
                                                                                          monkeypatch) -> None:
    """The listener chose the old certificate when it accepted; the renewal lands before the relay sees the
    tunnel. Admission presents the renewed one, so the agent does not leave by the old one's end; a tunnel
    opened on the new certificate in the same window gets it again and ignores it."""
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl") as ctl:
            gateway = await enrolled(ctl, "gw-a")
            relay = ctl.server.relay
            assert relay is not None
            renewal = await asyncio.to_thread(ctl.server.issue_certificate)
            challenge = type(relay)._challenge

            def renewed_first(self, link, remote):  # after the TLS handshake (on the old certificate)
                monkeypatch.undo()
                ctl.server.use_certificate(*renewal)
                return challenge(self, link, remote)

            old = x509.load_der_x509_certificate(ctl.context.server_certificate_der)
            monkeypatch.setattr(type(relay), "_challenge", renewed_first)
            async with connect(ctl, gateway) as (missed, _):
                new = x509.load_der_x509_certificate(ctl.context.server_certificate_der)
                assert new != old
                await _until(lambda: missed.trusted is not None and missed.trusted.certificate == new,
                             "the push at admission")
                assert missed.pushes_refused == 0 and missed.conn.relay_certificates == 1
                async with connect(ctl, gateway) as (seen, _):  # its handshake saw the renewed certificate
                    await _until(lambda: seen.conn.relay_certificates == 1, "the redundant push")
                    assert seen.trusted is not None and seen.trusted.certificate == new
                    assert seen.pushes_refused == 0
                    for session in (missed, seen):
                        assert not session.conn.closed
                        await dial_refusal(session, "no-such-service")

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))
