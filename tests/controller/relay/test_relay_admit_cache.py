"""Admission remembers certificates and gateway identities, and forgets them at every announcement.

A gateway seen before is admitted on the event loop with no worker job and no
store read; a revoked, disabled or re-keyed gateway reconnecting at once, with
everything about it still cached, is refused all the same.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

import controller.relay.admit as relay_admit
from agent.errors import TunnelRefused
from agent.tunnel.client import TunnelCredentials
from controller.registry import Identity
from controller.relay.admit_cache import AdmissionCache, CertificateFacts
from controller.store import StoreUnavailable
from shared.protocol import ErrorCode
from tests.controller.harness import Running, run, running_controller
from tests.controller.relay.relay_harness import SCENARIO_TIMEOUT, KeyOf, connect, enrolled, redeem

#: The attack: a revoked gateway reconnecting within a second of its revocation.
RECONNECT_WITHIN = 1.0


def gateway(name: str, status: str = "enrolled", key: str | None = "ab" * 32) -> Identity:
    return Identity(name=name, tenant="default", roles=("gateway",), uri=f"spiffe://outpost.local/default/{name}",
                    status=status, created_at=0.0, key_sha256=key)


async def warmed(ctl: Running, name: str) -> TunnelCredentials:
    """A gateway that held a tunnel once, so that the relay's cache holds its certificate and identity."""
    credentials = await enrolled(ctl, name)
    async with connect(ctl, credentials) as (session, task):
        assert session.relay_info["identity"] == credentials.uri
    relay = ctl.server.relay
    assert relay is not None
    assert relay.admission_cache.identity(credentials.uri) is not None
    return credentials


def count_store_reads(ctl: Running, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    reads: list[str] = []
    registry = ctl.context.registry
    real_identity_by_uri = registry.identity_by_uri
    real_is_session_serial = relay_admit.is_session_serial

    def identity_by_uri(uri: str) -> Identity | None:
        reads.append(f"identity {uri}")
        return real_identity_by_uri(uri)

    def is_session_serial(store, serial: str) -> bool:  # type: ignore[no-untyped-def]
        reads.append(f"purpose {serial}")
        return real_is_session_serial(store, serial)

    monkeypatch.setattr(registry, "identity_by_uri", identity_by_uri)
    monkeypatch.setattr(relay_admit, "is_session_serial", is_session_serial)
    return reads


def count_worker_jobs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the functions the relay runs in its worker threads from now on."""
    import controller.relay.session as relay_session

    worker_jobs: list[str] = []
    real_run = relay_session.RELAY_POOL.run

    async def counted_run(function, *args, **kwargs):  # type: ignore[no-untyped-def]
        worker_jobs.append(getattr(function, "__name__", repr(function)))
        return await real_run(function, *args, **kwargs)

    monkeypatch.setattr(relay_session.RELAY_POOL, "run", counted_run)
    return worker_jobs


def test_a_gateway_seen_before_is_admitted_with_no_store_read_and_no_worker_job(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl") as ctl:
            first = await enrolled(ctl, "gw-first")
            reads = count_store_reads(ctl, monkeypatch)
            worker_jobs = count_worker_jobs(monkeypatch)
            async with connect(ctl, first) as (session, task):
                assert session.relay_info["identity"] == first.uri
            assert len(reads) == 2 and worker_jobs  # the first time: read and verified in a worker
            reads.clear()
            worker_jobs.clear()
            async with connect(ctl, first) as (session, task):
                assert session.relay_info["identity"] == first.uri
                await asyncio.sleep(0.1)
                assert not task.done()
            assert reads == [] and worker_jobs == []

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))


def test_a_revoked_gateway_reconnecting_at_once_with_the_cache_warm_is_refused(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl") as ctl:
            credentials = await warmed(ctl, "gw-revoked")
            status, _ = await ctl.call("POST", "/api/v1/identities/gw-revoked/revoke")
            assert status == 200
            started = time.monotonic()
            with pytest.raises(TunnelRefused, match="revoked") as refused:
                async with connect(ctl, credentials):
                    pass
            assert refused.value.code == ErrorCode.REVOKED
            assert time.monotonic() - started < RECONNECT_WITHIN

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))


def test_a_revocation_announced_from_another_thread_empties_the_cache_before_the_next_admission(
        tmp_path: Path) -> None:
    """As the store watcher announces one made by another controller process: from outside the event loop."""
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl") as ctl:
            credentials = await warmed(ctl, "gw-elsewhere")
            done = threading.Event()

            def revoke() -> None:
                ctl.context.registry.revoke("default", "gw-elsewhere")
                done.set()

            threading.Thread(target=revoke).start()
            await asyncio.get_running_loop().run_in_executor(None, done.wait, 5.0)
            with pytest.raises(TunnelRefused, match="revoked"):
                async with connect(ctl, credentials):
                    pass

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))


def test_a_disabled_gateway_is_refused_with_the_cache_warm_and_admitted_again_once_enabled(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl") as ctl:
            credentials = await warmed(ctl, "gw-paused")
            status, _ = await ctl.call("POST", "/api/v1/identities/gw-paused/disable")
            assert status == 200
            with pytest.raises(TunnelRefused, match="disabled"):
                async with connect(ctl, credentials):
                    pass
            status, _ = await ctl.call("POST", "/api/v1/identities/gw-paused/enable")
            assert status == 200
            async with connect(ctl, credentials) as (session, task):
                assert session.relay_info["identity"] == credentials.uri
                await asyncio.sleep(0.1)
                assert not task.done()

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))


def test_the_old_key_of_a_re_enrolled_gateway_is_refused_with_the_cache_warm(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl") as ctl:
            old = await warmed(ctl, "gw-moved")
            status, body = await ctl.call("POST", "/api/v1/identities/gw-moved/token", {})
            assert status == 201, body
            new = await redeem(ctl, body["token"], "gw-moved")
            with pytest.raises(TunnelRefused, match="no longer the key of identity default/gw-moved"):
                async with connect(ctl, old):
                    pass
            async with connect(ctl, new) as (session, _):
                assert session.relay_info["identity"] == new.uri

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))


def test_a_cached_certificate_still_needs_the_challenge_signed_by_its_key(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl") as ctl:
            genuine = await warmed(ctl, "gw-copied")
            thief = TunnelCredentials(uri=genuine.uri, chain_pem=genuine.chain_pem, ca_pem=genuine.ca_pem,
                                      keystore=KeyOf(ec.generate_private_key(ec.SECP256R1())))
            with pytest.raises(TunnelRefused, match="signature does not verify"):
                async with connect(ctl, thief):
                    pass

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))


def test_identities_are_bounded_and_the_least_recently_used_goes_first() -> None:
    cache = AdmissionCache(max_identities=2)
    for name in ("a", "b"):
        assert cache.remember_identity(gateway(name), cache.generation)
    assert cache.identity(gateway("a").uri) is not None  # "b" is now the least recently used
    assert cache.remember_identity(gateway("c"), cache.generation)
    assert cache.identity(gateway("b").uri) is None
    assert cache.identity(gateway("a").uri) is not None and cache.identity(gateway("c").uri) is not None
    assert cache.sizes == (0, 2)


def test_a_row_read_before_an_announcement_is_not_kept() -> None:
    cache = AdmissionCache()
    generation = cache.generation
    cache.forget(gateway("other").uri)  # announced while the row was read
    assert not cache.remember_identity(gateway("a"), generation)
    assert cache.identity(gateway("a").uri) is None


def test_blocked_identities_and_identities_without_a_device_key_are_not_kept() -> None:
    cache = AdmissionCache()
    for identity in (gateway("r", status="revoked"), gateway("d", status="disabled"), gateway("p", key=None)):
        assert not cache.remember_identity(identity, cache.generation)
    assert cache.sizes == (0, 0)


def test_certificates_are_bounded_and_tied_to_the_ca_that_verified_them() -> None:
    ca, other_ca = object(), object()
    cache = AdmissionCache(max_certificates=2)
    now = dt.datetime.now(dt.UTC)

    def facts(verified_by: object) -> CertificateFacts:
        return CertificateFacts(ca=verified_by, not_before=now, not_after=now, client_auth=True,  # type: ignore[arg-type]
                                uri=None, public_key=None, key_sha256="", serial="1", session_certificate=False)

    for key in (b"1", b"2", b"3"):
        cache.remember_certificate(key, facts(ca))
    assert cache.certificate(b"1", ca) is None  # evicted: the bound holds
    assert cache.certificate(b"3", ca) is not None
    assert cache.certificate(b"3", other_ca) is None  # type: ignore[arg-type]
    assert cache.sizes == (2, 0)


def test_after_a_start_the_first_admission_of_an_enrolled_gateway_reads_no_identity_row(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl") as ctl:
            credentials = await enrolled(ctl, "gw-back")
            await ctl.create_identity("gw-never-enrolled", ["gateway"])
            await enrolled(ctl, "gw-gone")
            ctl.context.registry.revoke("default", "gw-gone")
            relay = ctl.server.relay
            assert relay is not None
            # As a relay process starting under an enrolled fleet: one read of every identity.
            relay.admission_cache = AdmissionCache()
            assert relay.admission_cache.preload(ctl.context.registry) == 1  # only the enrolled, unblocked one
            reads = count_store_reads(ctl, monkeypatch)
            async with connect(ctl, credentials) as (session, _):
                assert session.relay_info["identity"] == credentials.uri
            assert [read.split()[0] for read in reads] == ["purpose"]

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))


def test_a_store_that_cannot_be_read_at_start_leaves_the_cache_empty() -> None:
    class Unreadable:
        def list_identities(self) -> list[Identity]:
            raise StoreUnavailable("the store is unavailable")

    cache = AdmissionCache()
    assert cache.preload(Unreadable()) == 0  # type: ignore[arg-type]
    assert cache.sizes == (0, 0)
