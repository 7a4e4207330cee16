"""Renewal inside a running agent whose key is in the TPM, against the real controller.

The agent's own pieces run as ``outpost-agent run`` wires them (serve_agent,
TunnelSupervisor, CertificateKeeper); only the keeper's clock is moved ahead,
as a gateway's trusted clock would be 20 hours after enrollment, so that a
renewal is due now instead of tomorrow.
"""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

pytest.importorskip("agent.identity.tss", reason="the TPM backend needs tpm2-pytss")

from agent.enrollment.enroll import enroll_async  # noqa: E402
from agent.errors import DeviceKeyLost  # noqa: E402
from agent.identity.keeper import CertificateKeeper, keeper_for_tunnel  # noqa: E402
from agent.identity.renewal_schedule import RenewalSchedule  # noqa: E402
from agent.identity.select import KeyStoreSettings, open_keystore  # noqa: E402
from agent.identity.state import StateDir  # noqa: E402
from agent.identity.tpm_errors import LOST_SENTENCE  # noqa: E402
from agent.tunnel.backoff import Backoff  # noqa: E402
from agent.tunnel.client import TunnelCredentials, TunnelOptions  # noqa: E402
from agent.tunnel.supervisor import TunnelSupervisor, serve_agent  # noqa: E402
from tests.agent.identity.swtpm_harness import CC_CREATE_PRIMARY, CC_LOAD, CC_SIGN  # noqa: E402
from tests.controller.harness import run, running_controller  # noqa: E402

#: How far the keeper's clock is ahead until it has renewed: past every jittered renewal point of a day.
AHEAD = 20 * 3600.0
#: Connecting and one renewal on loopback take well under a second; a loaded machine gets far more.
STEP_TIMEOUT = 30.0
#: In the lost-key scenario the renewal falls due this long after the agent starts: the tunnel is up by then.
RENEWAL_DUE_AFTER = 8.0
#: And the TPM must be cleared this long before it falls due: one command to the simulator, under emulation
#: too. The rest is the tunnel's: its handshake signs in the TPM, seconds under emulation.
CLEAR_MARGIN = 2.0
SPKI = serialization.PublicFormat.SubjectPublicKeyInfo


async def tpm_gateway(running, tmp_path: Path, tcti: str, name: str) -> tuple[StateDir, KeyStoreSettings]:
    settings = KeyStoreSettings(backend="tpm", tcti=tcti)
    created = await running.create_identity(name)
    token = tmp_path / f"{name}.token"
    token.write_text(created["token"] + "\n")
    identity = await enroll_async(token, tmp_path / f"{name}-state", settings)
    assert identity.key_backend == "tpm"
    return StateDir(tmp_path / f"{name}-state"), settings


def supervisor_for(state: StateDir, keystore) -> TunnelSupervisor:  # type: ignore[no-untyped-def]
    identity = state.load()
    credentials = TunnelCredentials(uri=identity.uri, chain_pem=[identity.cert_pem], ca_pem=identity.ca_pem,
                                    keystore=keystore)
    return TunnelSupervisor(identity.relays, credentials, TunnelOptions(), backoff=Backoff(initial=0.2, cap=1.0))


async def until(predicate, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + STEP_TIMEOUT
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {STEP_TIMEOUT} s")
        await asyncio.sleep(0.05)


def test_the_keeper_of_a_running_agent_renews_with_the_tpm_key_and_the_next_tunnel_presents_the_new_certificate(
        counted_swtpm, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "c") as running:
            state, settings = await tpm_gateway(running, tmp_path, counted_swtpm.tcti, "gw-keeper")
            enrolled = state.load().certificate()
            keystore = open_keystore(state.path, settings)
            supervisor = supervisor_for(state, keystore)
            keeper = keeper_for_tunnel(state, keystore, supervisor.credentials, supervisor.stats,
                                       clock=lambda: time.time() + (0.0 if keeper.renewals else AHEAD))
            agent = asyncio.ensure_future(serve_agent(supervisor, [], keeper))
            try:
                await until(lambda: keeper.renewals == 1 and supervisor.current_session() is not None,
                            "a renewal and a tunnel")
                cert = state.load().certificate()
                assert cert.serial_number != enrolled.serial_number
                assert supervisor.credentials.chain_pem == [state.load().cert_pem]
                assert supervisor.stats.cert_not_after == RenewalSchedule.for_certificate(cert).not_after
                # Issued by the pinned CA, for the key that is in the TPM.
                ca = state.load().ca_certificate()
                ca.public_key().verify(cert.signature, cert.tbs_certificate_bytes,
                                       ec.ECDSA(cert.signature_hash_algorithm))
                assert cert.public_key().public_bytes(serialization.Encoding.DER, SPKI) == \
                    keystore.public_key().public_bytes(serialization.Encoding.DER, SPKI)
                cert.public_key().verify(keystore.sign(b"possession"), b"possession", ec.ECDSA(hashes.SHA256()))
                # The next tunnel logs in (a TPM signature over a new challenge) with the new certificate.
                signs = counted_swtpm.commands().count(CC_SIGN)
                await supervisor.current_session().close()
                await until(lambda: supervisor.stats.reconnects >= 1 and supervisor.current_session() is not None,
                            "a new tunnel after renewal")
                assert counted_swtpm.commands().count(CC_SIGN) == signs + 1
                assert supervisor.current_session().credentials.chain_pem == [cert.public_bytes(
                    serialization.Encoding.PEM).decode()]
            finally:
                supervisor.stop()
                await asyncio.wait_for(agent, STEP_TIMEOUT)
            files = sorted(p.name for p in state.path.iterdir())
            assert "key.tpm.json" in files and "key.pem" not in files
            for path in state.path.iterdir():
                for loader in (serialization.load_pem_private_key, serialization.load_der_private_key):
                    with pytest.raises((ValueError, TypeError)):
                        loader(path.read_bytes(), password=None)

    run(scenario())


def test_a_key_lost_before_a_renewal_stops_the_running_agent_with_the_lost_key_and_asks_the_tpm_once(
        counted_swtpm, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "c") as running:
            state, settings = await tpm_gateway(running, tmp_path, counted_swtpm.tcti, "gw-lost")
            keystore = open_keystore(state.path, settings)
            supervisor = supervisor_for(state, keystore)
            # The keeper's first renewal point (fixed by its seeded jitter), RENEWAL_DUE_AFTER from now.
            due = RenewalSchedule.for_certificate(state.load().certificate()).first_attempt(random.Random(7))
            offset = due - time.time() - RENEWAL_DUE_AFTER
            keeper = CertificateKeeper(state, keystore, clock=lambda: time.time() + offset, rng=random.Random(7))
            started = time.monotonic()
            agent = asyncio.ensure_future(serve_agent(supervisor, [], keeper))
            await until(lambda: supervisor.current_session() is not None, "the tunnel")
            assert time.monotonic() - started < RENEWAL_DUE_AFTER - CLEAR_MARGIN, \
                "the tunnel came up too late for this test"
            counted_swtpm.clear()
            mark = len(counted_swtpm.commands())
            with pytest.raises(DeviceKeyLost) as caught:
                await asyncio.wait_for(agent, RENEWAL_DUE_AFTER + STEP_TIMEOUT)
            assert str(caught.value) == LOST_SENTENCE
            asked = counted_swtpm.commands()[mark:]
            assert asked.count(CC_CREATE_PRIMARY) == 1, [hex(c) for c in asked]
            assert CC_LOAD not in asked and CC_SIGN not in asked
            assert keeper.renewals == 0
            assert supervisor.current_session() is None
            assert supervisor.stats.state == "stopped" and supervisor.stats.last_error == LOST_SENTENCE

    run(scenario())
