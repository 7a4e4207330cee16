"""The agent renews and recovers against the real controller over pinned TLS on loopback."""

from __future__ import annotations

import asyncio
import datetime
import random
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from agent.enrollment.enroll import enroll_async
from agent.errors import ControllerUnreachable
from agent.identity.keeper import CertificateKeeper, keeper_for_tunnel
from agent.identity.recovery import recover_at_start, recover_if_expired
from agent.identity.renewal import RenewalRefused, renew_certificate
from agent.identity.renewal_schedule import RenewalSchedule
from agent.identity.select import KeyStoreSettings, open_keystore
from agent.identity.software import SoftwareKeyStore
from agent.identity.state import StateDir
from tests.controller.harness import run, running_controller

DAY = 86400.0
SOFTWARE = KeyStoreSettings(backend="software")


async def enrolled_gateway(running, tmp_path: Path, name: str = "gw") -> StateDir:
    created = await running.create_identity(name)
    token = tmp_path / f"{name}.token"
    token.write_text(created["token"] + "\n")
    await enroll_async(token, tmp_path / f"{name}-state", SOFTWARE)
    return StateDir(tmp_path / f"{name}-state")


def state_files(state: StateDir) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(state.path.iterdir()) if p.is_file()}


def test_renewal_stores_a_new_certificate_for_the_same_key_and_identity(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "c") as running:
            state = await enrolled_gateway(running, tmp_path)
            before = state.load()
            identity_json = (state.path / "identity.json").read_bytes()
            keystore = open_keystore(state.path, SOFTWARE)
            cert = await renew_certificate(state, keystore)
            after = state.load()
            assert after.certificate().serial_number == cert.serial_number != before.certificate().serial_number
            assert after.uri == before.uri
            spki = serialization.PublicFormat.SubjectPublicKeyInfo
            assert cert.public_key().public_bytes(serialization.Encoding.DER, spki) == \
                keystore.public_key().public_bytes(serialization.Encoding.DER, spki)
            # Only cert.pem moved; the commit marker and the key are untouched.
            assert (state.path / "identity.json").read_bytes() == identity_json
            assert not list(state.path.glob(".*.tmp"))
            assert running.context.audit.recent()[-1]["event"] == "renewal"

    run(scenario())


def test_the_keeper_renews_when_due_and_hands_the_certificate_to_new_tunnels(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "c") as running:
            state = await enrolled_gateway(running, tmp_path)
            first = state.load().certificate()
            keystore = open_keystore(state.path, SOFTWARE)
            # The gateway's (trusted) clock says 20 h passed: past every jittered renewal point.
            # Once renewed, the clock is right again, so the new certificate is not due at once.
            offset = [20 * 3600.0]
            handed: list[str] = []
            plans: list[tuple[float, float, str | None]] = []

            def renewed(pem: str) -> None:
                handed.append(pem)
                offset[0] = 0.0

            keeper = CertificateKeeper(state, keystore, clock=lambda: time.time() + offset[0], rng=random.Random(3),
                                       on_renewed=renewed, on_status=lambda *a: plans.append(a))
            task = asyncio.ensure_future(keeper.run())
            try:
                for _ in range(200):
                    if keeper.renewals:
                        break
                    await asyncio.sleep(0.05)
                await asyncio.sleep(0.1)
            finally:
                task.cancel()
            assert keeper.renewals == 1, keeper.last_error
            renewed = state.load()
            assert renewed.certificate().serial_number != first.serial_number
            assert handed == [renewed.cert_pem]
            # The plan after renewal points into the new certificate's life, at about two thirds.
            not_after, next_renewal, error = plans[-1]
            schedule = RenewalSchedule.for_certificate(renewed.certificate())
            assert error is None and not_after == schedule.not_after
            fraction = (next_renewal - schedule.not_before) / schedule.lifetime
            assert 2 / 3 - 0.1 - 1e-6 <= fraction <= 2 / 3 + 0.1 + 1e-6
            assert keeper.next_renewal == next_renewal

    run(scenario())


def test_a_failed_renewal_backs_off_and_leaves_the_certificate_in_place(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "c") as running:
            state = await enrolled_gateway(running, tmp_path)
            keystore = open_keystore(state.path, SOFTWARE)
        # The controller is gone now.
        before = state_files(state)
        now = time.time() + 20 * 3600.0
        plans: list[tuple[float, float, str | None]] = []
        keeper = CertificateKeeper(state, keystore, clock=lambda: now, rng=random.Random(5),
                                   on_status=lambda *a: plans.append(a))
        task = asyncio.ensure_future(keeper.run())
        try:
            for _ in range(200):
                if len(plans) >= 2:
                    break
                await asyncio.sleep(0.05)
        finally:
            task.cancel()
        assert len(plans) >= 2
        _, retry, error = plans[1]
        assert error and "could not reach the controller" in error
        assert now + 1.0 <= retry <= now + 10.0  # the first retry: within the first backoff step
        assert state_files(state) == before
        with pytest.raises(ControllerUnreachable):
            await renew_certificate(state, keystore)

    run(scenario())


def test_the_last_renewal_error_and_the_retry_reach_a_running_agents_status(tmp_path: Path) -> None:
    from agent.tunnel.client import TunnelCredentials
    from agent.tunnel.status import TunnelStats

    async def scenario() -> tuple[TunnelStats, float]:
        async with running_controller(tmp_path / "c") as running:
            state = await enrolled_gateway(running, tmp_path)
            keystore = open_keystore(state.path, SOFTWARE)
        # The controller is gone, and the certificate is due (20 h into 24).
        now = time.time() + 20 * 3600.0
        stats = TunnelStats()
        credentials = TunnelCredentials(state.load().uri, [state.load().cert_pem], state.load().ca_pem, keystore)
        keeper = keeper_for_tunnel(state, keystore, credentials, stats, lambda: now)
        task = asyncio.ensure_future(keeper.run())
        try:
            for _ in range(200):
                if stats.renewal_error:
                    break
                await asyncio.sleep(0.05)
        finally:
            task.cancel()
        assert credentials.chain_pem == [state.load().cert_pem], "nothing new to hand on"
        return stats, now

    stats, now = run(scenario())
    assert stats.renewal_error and stats.renewal_error.startswith("could not reach the controller at ")
    assert now < stats.next_renewal <= now + 10.0, "the retry is planned and shown"
    assert stats.cert_not_after > now


def test_a_wrong_key_is_refused_with_a_sentence_and_changes_nothing(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "c") as running:
            state = await enrolled_gateway(running, tmp_path)
            # Another device's key in this state directory (a restored backup of the wrong gateway).
            (state.path / "key.pem").unlink()
            other = SoftwareKeyStore(state.path)
            other.create()
            before = state_files(state)
            with pytest.raises(RenewalRefused) as refused:
                await renew_certificate(state, other)
            assert refused.value.code == "renewal_unknown_key"
            assert "re-enroll it with a new token" in str(refused.value)
            assert refused.value.exit_code == 77  # EX_NOPERM: the controller refuses this identity
            assert state_files(state) == before

    run(scenario())


def age_certificate(running, state: StateDir, days: float) -> None:
    """Make the gateway as if it had been offline: its certificate expired ``days`` ago, in its
    state directory and in the controller's store alike (every clock stays real)."""
    current = state.load().certificate()
    now = datetime.datetime.now(datetime.UTC)
    not_after = now - datetime.timedelta(days=days)
    builder = (
        x509.CertificateBuilder()
        .subject_name(current.subject)
        .issuer_name(current.issuer)
        .public_key(current.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_after - datetime.timedelta(days=1))
        .not_valid_after(not_after)
    )
    for extension in current.extensions:
        builder = builder.add_extension(extension.value, extension.critical)
    expired = builder.sign(running.context.ca.private_key, hashes.SHA256())
    state.replace_certificate(expired.public_bytes(serialization.Encoding.PEM).decode())
    identity = state.load()
    with running.context.store.transaction() as db:
        db.execute("UPDATE identities SET cert_not_after = ? WHERE tenant = ? AND name = ?",
                    (not_after.timestamp(), identity.tenant, identity.name))


def test_an_expired_certificate_recovers_at_start_and_a_revoked_one_does_not(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "c") as running:
            state = await enrolled_gateway(running, tmp_path, "gw-a")
            keystore = open_keystore(state.path, SOFTWARE)
            assert not await recover_if_expired(state, keystore)  # valid: nothing to do
            age_certificate(running, state, days=10)
            old = state.load().certificate().serial_number
            assert await recover_at_start(state, keystore)
            recovered = state.load().certificate()
            assert recovered.serial_number != old
            assert not RenewalSchedule.for_certificate(recovered).expired(time.time())
            assert running.context.audit.recent()[-1]["event"] == "recovery"

            revoked = await enrolled_gateway(running, tmp_path, "gw-b")
            age_certificate(running, revoked, days=2)
            await running.call("POST", "/api/v1/identities/gw-b/revoke")
            before = state_files(revoked)
            with pytest.raises(RenewalRefused) as refused:
                await recover_at_start(revoked, open_keystore(revoked.path, SOFTWARE))
            assert refused.value.code == "identity_revoked"
            assert state_files(revoked) == before

            # Past the grace period: a clear sentence, state unchanged.
            late = await enrolled_gateway(running, tmp_path, "gw-c")
            age_certificate(running, late, days=45)
            before = state_files(late)
            with pytest.raises(RenewalRefused) as refused:
                await recover_at_start(late, open_keystore(late.path, SOFTWARE))
            assert refused.value.code == "recovery_expired"
            assert "more than 30 days ago; re-enroll it with a new token" in str(refused.value)
            assert state_files(late) == before

    run(scenario())
