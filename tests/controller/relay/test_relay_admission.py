"""The relay admits a tunnel only on what it verified itself.

A real controller (TLS, relay mounted) runs in-process on 127.0.0.1; agents
connect with the agent's own tunnel client.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.errors import TrustError, TunnelRefused
from agent.identity.tls_trust import pinned_ssl_context
from agent.tunnel.client import TunnelCredentials, TunnelOptions, open_tunnel
from shared.protocol import NONCE_SIZE, SUBPROTOCOL, ErrorCode, ProtocolLimits, auth_message
from shared.protocol.connection import AUTH_MESSAGE_PREFIX
from shared.trust import cert_not_after, cert_not_before
from shared.tunnel.auth import certificate_digest
from tests.controller.harness import Running, audit_events_added, run, running_controller, store_snapshot
from tests.controller.relay.relay_harness import (
    SCENARIO_TIMEOUT,
    KeyOf,
    connect,
    enrolled,
    foreign_certificate,
    redeem,
    relay_url,
    session_credentials,
    tunnel_closed_recorded,
)
from tests.shared.test_libcrypto import spliced


def snapshot(ctl: Running) -> dict:
    return store_snapshot(ctl.context.settings.store_path)


def refusals_only(before: dict, after: dict) -> list[str]:
    """The reasons of the tunnel refusals recorded between two snapshots; fails on any other change."""
    added = audit_events_added(before, after)
    assert [event for event, _ in added] == ["tunnel_refused"] * len(added), added
    return [fields["reason"] for _, fields in added]


async def tunnel_status(ctl: Running) -> list[dict]:
    status, body = await ctl.call("GET", "/api/v1/status")
    assert status == 200
    return sorted((t["identity"], t["bound"], t["bytes_in"]) for t in body["tunnels"])


def test_an_enrolled_agent_is_admitted_under_the_identity_in_its_certificate(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl") as ctl:
            credentials = await enrolled(ctl, "gw-a")
            async with connect(ctl, credentials) as (session, _):
                assert session.relay_info["identity"] == credentials.uri == "spiffe://outpost.local/default/gw-a"

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))


def test_a_certificate_from_another_ca_is_refused_even_for_a_known_identity(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl") as ctl:
            genuine = await enrolled(ctl, "gw-b")
            key = ec.generate_private_key(ec.SECP256R1())
            forged = TunnelCredentials(uri=genuine.uri, chain_pem=[foreign_certificate(genuine.uri, key)],
                                       ca_pem=genuine.ca_pem, keystore=KeyOf(key))
            before = snapshot(ctl)
            with pytest.raises(TunnelRefused, match="not issued by this controller's CA"):
                async with connect(ctl, forged):
                    pass
            assert refusals_only(before, snapshot(ctl)) == ["the certificate was not issued by this controller's CA"]

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))


def test_a_genuine_signature_beside_a_foreign_leaf_or_a_genuine_leaf_with_bytes_after_it_admits_nobody(
        tmp_path: Path) -> None:
    """What the relay checks is the bytes the agent sent, and what it reads the identity from is those bytes."""
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl") as ctl:
            genuine = await enrolled(ctl, "gw-s")
            genuine_cert = x509.load_pem_x509_certificate(genuine.chain_pem[0].encode())
            key = ec.generate_private_key(ec.SECP256R1())
            # The victim's name and the CA's name, the intruder's key: its to-be-signed part beside the
            # CA's real signature over the victim's certificate.
            foreign = x509.load_pem_x509_certificate(foreign_certificate(genuine.uri, key).encode())
            tbs = (x509.CertificateBuilder().subject_name(foreign.subject)
                   .issuer_name(ctl.context.ca.certificate.subject).public_key(key.public_key())
                   .serial_number(genuine_cert.serial_number).not_valid_before(cert_not_before(foreign))
                   .not_valid_after(cert_not_after(foreign))
                   .add_extension(foreign.extensions.get_extension_for_class(x509.SubjectAlternativeName).value,
                                  critical=False)
                   .add_extension(foreign.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value,
                                  critical=False)
                   .sign(key, hashes.SHA256()))
            forged = spliced(tbs, genuine_cert)
            trailing = genuine_cert.public_bytes(serialization.Encoding.DER) + foreign.public_bytes(
                serialization.Encoding.DER)
            for chain, keystore, why in ((forged, KeyOf(key), "not issued by this controller's CA"),
                                         (trailing, genuine.keystore, "unreadable")):
                attempt = TunnelCredentials(uri=genuine.uri, chain_pem=[ssl.DER_cert_to_PEM_cert(chain)],
                                            ca_pem=genuine.ca_pem, keystore=keystore)
                with pytest.raises(TunnelRefused, match=why):
                    async with connect(ctl, attempt):
                        pass
            async with connect(ctl, genuine) as (session, _):  # the genuine one is still admitted
                assert session.relay_info["identity"] == genuine.uri

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))


def test_a_valid_certificate_with_the_wrong_key_is_refused(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl") as ctl:
            genuine = await enrolled(ctl, "gw-c")
            thief = TunnelCredentials(uri=genuine.uri, chain_pem=genuine.chain_pem, ca_pem=genuine.ca_pem,
                                      keystore=KeyOf(ec.generate_private_key(ec.SECP256R1())))
            before = snapshot(ctl)
            with pytest.raises(TunnelRefused, match="signature does not verify"):
                async with connect(ctl, thief):
                    pass
            assert refusals_only(before, snapshot(ctl)) == [
                "the challenge signature does not verify with the certificate's key"
            ]

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))


class SignsForAnotherRelay(KeyOf):
    """The genuine device key, signing this relay's nonce as if it came from the relay ``other_der``.

    What a man in the middle would hold: the gateway's real signature, made
    for the certificate the gateway saw (the interceptor's), not ours.
    """

    def __init__(self, key: ec.EllipticCurvePrivateKey, other_der: bytes) -> None:
        super().__init__(key)
        self.other_digest = certificate_digest(other_der)
        self.signed = 0

    def sign(self, data: bytes) -> bytes:
        nonce = data[len(AUTH_MESSAGE_PREFIX):len(AUTH_MESSAGE_PREFIX) + NONCE_SIZE]
        assert data == auth_message(nonce, data[len(AUTH_MESSAGE_PREFIX) + NONCE_SIZE:]), "not a tunnel challenge"
        self.signed += 1
        return super().sign(auth_message(nonce, self.other_digest))


def test_a_signature_made_for_another_relays_certificate_is_refused(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl") as ctl:
            genuine = await enrolled(ctl, "gw-m")
            # Another relay of the same fleet: a certificate from the same CA, for another name.
            other_key = ec.generate_private_key(ec.SECP256R1())
            other = ctl.context.ca.issue_server(other_key.public_key(), ["relay-b.example.net"])
            assert other.public_bytes(serialization.Encoding.DER) != ctl.context.server_certificate_der
            keystore = SignsForAnotherRelay(genuine.keystore._key, other.public_bytes(serialization.Encoding.DER))
            relayed = TunnelCredentials(uri=genuine.uri, chain_pem=genuine.chain_pem, ca_pem=genuine.ca_pem,
                                        keystore=keystore)
            before = snapshot(ctl)
            with pytest.raises(TunnelRefused, match="signature does not verify"):
                async with connect(ctl, relayed):
                    pass
            assert keystore.signed == 1
            assert refusals_only(before, snapshot(ctl)) == [
                "the challenge signature does not verify with the certificate's key"
            ]
            async with connect(ctl, genuine) as (session, _):  # the same key, signing for this relay
                assert session.relay_info["identity"] == genuine.uri

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))


def test_a_revoked_identity_is_refused_and_its_live_tunnel_closed(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl") as ctl:
            credentials = await enrolled(ctl, "gw-d")
            async with connect(ctl, credentials) as (session, task):
                status, _ = await ctl.call("POST", "/api/v1/identities/gw-d/revoke")
                assert status == 200
                await asyncio.wait_for(task, 2.0)
                assert "revoked" in session.close_reason[1]
            with pytest.raises(TunnelRefused, match="revoked"):
                async with connect(ctl, credentials):
                    pass

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))


def test_a_relay_whose_certificate_is_not_from_the_pinned_ca_is_not_trusted(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "real") as real, running_controller(tmp_path / "impostor") as impostor:
            credentials = await enrolled(real, "gw-e")
            before = snapshot(real), snapshot(impostor)
            with pytest.raises(TrustError, match="not issued by the pinned controller CA"):
                async with aiohttp.ClientSession() as http:
                    await open_tunnel(http, relay_url(impostor), credentials,
                                      pinned_ssl_context(credentials.ca_pem), TunnelOptions())
            # The agent hung up in the TLS handshake: not a byte of its AUTH reached the impostor.
            assert (snapshot(real), snapshot(impostor)) == before
            assert impostor.context.audit.recent()[-1]["event"] != "tunnel_refused"

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))


def test_garbage_on_a_tunnel_closes_that_tunnel_and_no_other(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl") as ctl:
            credentials = await enrolled(ctl, "gw-f")
            async with connect(ctl, credentials) as (session, task), aiohttp.ClientSession() as http:
                before, tunnels = snapshot(ctl), await tunnel_status(ctl)
                ws = await http.ws_connect(relay_url(ctl), ssl=ctl.client_tls, protocols=(SUBPROTOCOL,))
                await ws.receive()  # the CHALLENGE
                await ws.send_bytes(b"\xff" * 64)
                closing = await asyncio.wait_for(ws.receive(), 5.0)
                while closing.type == aiohttp.WSMsgType.BINARY:  # a GOAWAY frame, then the close
                    closing = await asyncio.wait_for(ws.receive(), 5.0)
                assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
                assert not session.conn.closed and not task.done()
                # Nothing authenticated, so nothing is recorded, and the other tunnel is as it was.
                assert snapshot(ctl) == before
                assert await tunnel_status(ctl) == tunnels and len(tunnels) == 1

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))


def test_a_peer_that_does_not_authenticate_in_time_is_dropped(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl") as ctl:
            async with aiohttp.ClientSession() as http:
                ws = await http.ws_connect(relay_url(ctl), ssl=ctl.client_tls, protocols=(SUBPROTOCOL,))
                started = asyncio.get_running_loop().time()
                while True:
                    msg = await asyncio.wait_for(ws.receive(), ProtocolLimits().auth_deadline + 5)
                    if msg.type != aiohttp.WSMsgType.BINARY:
                        break
                waited = asyncio.get_running_loop().time() - started
                assert ProtocolLimits().auth_deadline - 1 <= waited <= ProtocolLimits().auth_deadline + 3

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))


#: The issue's promise for re-enrollment, as for revocation: the old key's tunnels close within this.
REKEY_DEADLINE = 2.0


async def re_enroll(ctl: Running, name: str):
    status, body = await ctl.call("POST", f"/api/v1/identities/{name}/token", {})
    assert status == 201, body
    return await redeem(ctl, body["token"], name)


def test_re_enrollment_closes_the_old_keys_live_tunnel_and_refuses_its_certificate(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl") as ctl:
            old = await enrolled(ctl, "gw-r")
            async with connect(ctl, old) as (old_session, old_task):
                new = await re_enroll(ctl, "gw-r")
                # The old certificate is still within its dates; only the identity's key moved on.
                await asyncio.wait_for(old_task, REKEY_DEADLINE)
                assert old_session.close_reason[0] == ErrorCode.REVOKED
                assert "replaced" in old_session.close_reason[1]
            await tunnel_closed_recorded(ctl, "gw-r")
            before = snapshot(ctl)
            with pytest.raises(TunnelRefused, match="no longer the key of identity default/gw-r"):
                async with connect(ctl, old):
                    pass
            [reason] = refusals_only(before, snapshot(ctl))
            assert "re-enrolled with a new key" in reason
            async with connect(ctl, new) as (session, task):
                assert session.relay_info["identity"] == new.uri
                assert not task.done()

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))


def test_re_enrollment_leaves_the_new_keys_tunnel_and_other_identities_alone(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl") as ctl:
            other = await enrolled(ctl, "gw-o")
            old = await enrolled(ctl, "gw-s")
            async with connect(ctl, other) as (_, other_task), connect(ctl, old) as (_, old_task):
                new = await re_enroll(ctl, "gw-s")
                async with connect(ctl, new) as (_, new_task):
                    await asyncio.wait_for(old_task, REKEY_DEADLINE)
                    # The same key enrolled again (a crash retry of the newest token) closes nothing.
                    with ctl.context.store.transaction() as db:
                        identity = ctl.context.registry.get_identity_in(db, "default", "gw-s")
                    ctl.context.registry.announce_rekeyed(identity)
                    await asyncio.sleep(0.3)
                    assert not new_task.done() and not other_task.done()
                    names = [t[0] for t in await tunnel_status(ctl)]
                    assert names == [other.uri, new.uri]

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))


def test_a_session_tunnel_closes_when_its_identity_enrolls_a_device_key(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl") as ctl:
            token = (await ctl.create_identity("gw-p", ["gateway"]))["token"]
            early = await session_credentials(ctl, "gw-p")
            async with connect(ctl, early) as (session, task):
                await redeem(ctl, token, "gw-p")
                await asyncio.wait_for(task, REKEY_DEADLINE)
                assert session.close_reason[0] == ErrorCode.REVOKED

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))


def test_a_session_certificate_of_an_identity_that_never_enrolled_keeps_working(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl") as ctl:
            operator = await session_credentials(ctl, "operator")
            await enrolled(ctl, "gw-q")
            await re_enroll(ctl, "gw-q")
            async with connect(ctl, operator) as (session, task):
                assert session.relay_info["identity"] == operator.uri
                await asyncio.sleep(0.2)
                assert not task.done()

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))


def test_a_revocation_committed_while_admission_is_checked_still_closes_the_tunnel(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Admission reads the store in a worker thread before the tunnel is registered; a revocation
    announced in that gap found no tunnel to close, so the relay reads the identity again once the
    tunnel is registered."""
    import controller.relay.tunnel_auth as tunnel_auth
    from controller.watcher import POLL_INTERVAL_SECONDS

    real_admit = tunnel_auth.admit

    def admit_then_revoked(context, *args, **kwargs):  # type: ignore[no-untyped-def]
        admitted = real_admit(context, *args, **kwargs)
        # Committed (and announced) after the check passed, before the relay registers the tunnel,
        # and the store watcher polls (and announces it again) within the gap too.
        context.registry.revoke(admitted.identity.tenant, admitted.identity.name)
        time.sleep(3 * POLL_INTERVAL_SECONDS)
        return admitted

    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl") as ctl:
            credentials = await enrolled(ctl, "gw-gap")
            monkeypatch.setattr(tunnel_auth, "admit", admit_then_revoked)
            async with connect(ctl, credentials) as (session, task):
                await asyncio.wait_for(task, 2.0)
                assert session.close_reason[0] == ErrorCode.REVOKED
                assert "revoked" in session.close_reason[1]

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))


def test_without_a_change_announced_during_admission_the_identity_is_not_read_a_second_time(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The second read closes the gap above; with nothing announced in the gap it would cost a worker job and a
    query per admission for nothing (a reconnecting fleet of 10,000)."""
    import controller.relay.tunnel_auth as tunnel_auth

    second_reads: list[str] = []
    real_confirm = tunnel_auth.confirm_admission

    def counted(session):  # type: ignore[no-untyped-def]
        second_reads.append(session.admitted.name)
        return real_confirm(session)

    monkeypatch.setattr(tunnel_auth, "confirm_admission", counted)

    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl") as ctl:
            credentials = await enrolled(ctl, "gw-quiet")
            async with connect(ctl, credentials) as (session, task):
                assert session.relay_info["identity"] == credentials.uri
                await asyncio.sleep(0.2)
                assert not task.done()
            assert second_reads == []
            relay = ctl.server.relay
            assert relay is not None
            real_admit = tunnel_auth.admit

            def admit_then_announced(context, *args, **kwargs):  # type: ignore[no-untyped-def]
                admitted = real_admit(context, *args, **kwargs)
                relay.identity_changes += 1
                return admitted

            monkeypatch.setattr(tunnel_auth, "admit", admit_then_announced)
            # The gateway is in the admission cache now: forget it, so that admission reads the store again.
            relay.admission_cache.forget(credentials.uri)
            async with connect(ctl, credentials) as (session, task):
                await asyncio.sleep(0.2)
                assert not task.done()  # read again, still enrolled: the tunnel stays
            assert second_reads == ["gw-quiet"]

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))
