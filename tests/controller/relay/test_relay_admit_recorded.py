"""A gateway's first admission after a start is a lookup: its certificate recognised by the bytes the store recorded.

The relay reads the DER digests of the certificates still valid as it starts;
a leaf with exactly those bytes is admitted without our CA's signature being
verified again, without a store read and without a worker job. Everything
else (an unrecorded certificate, a revoked or re-keyed identity, a forged
certificate carrying a recorded serial) is verified or refused as before,
with the cache cold and warm.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

import controller.relay.admit_cache as admit_cache
import shared.trust
from agent.errors import TunnelRefused
from agent.tunnel.client import TunnelCredentials
from controller.ca import CertificateAuthority, certificate_sha256
from controller.registry import Identity
from controller.relay.admit_cache import AdmissionCache
from controller.store import Store
from tests.controller.harness import Running, run, running_controller
from tests.controller.relay.relay_harness import SCENARIO_TIMEOUT, KeyOf, connect, enrolled, redeem
from tests.controller.relay.test_relay_admit_cache import count_store_reads, count_worker_jobs


class NoIdentities:
    def list_identities(self) -> list[Identity]:
        return []


def record(store: Store, cert: x509.Certificate, purpose: str, not_after: float, digest: bool = True) -> None:
    with store.transaction() as db:
        db.execute("INSERT INTO certificates (serial, tenant, name, purpose, issued_at, not_after, key_sha256, "
                   "der_sha256) VALUES (?, 'default', 'gw', ?, ?, ?, 'ab', ?)",
                   (format(cert.serial_number, "x"), purpose, time.time(), not_after,
                    certificate_sha256(cert) if digest else None))


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def test_preload_recognises_the_certificates_still_valid_by_their_bytes_on_either_engine(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    ca = CertificateAuthority.create()
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    current, session, expired, older, later = (ca.issue(key, "gw", "default", 3600) for _ in range(5))
    now = time.time()
    record(store, current, "enrollment", now + 3600)
    record(store, session, "session", now + 600)
    record(store, expired, "renewal", now - 1)
    record(store, older, "enrollment", now + 3600, digest=False)  # issued before the column existed
    cache = AdmissionCache()
    cache.preload(NoIdentities(), store, ca.certificate)  # type: ignore[arg-type]
    assert cache.recorded_count == 2
    assert cache.recorded(der(current), ca.certificate) == admit_cache.RecordedCertificate(session=False)
    assert cache.recorded(der(session), ca.certificate) == admit_cache.RecordedCertificate(session=True)
    assert cache.recorded(der(expired), ca.certificate) is None
    assert cache.recorded(der(older), ca.certificate) is None
    assert cache.recorded(der(current), CertificateAuthority.create().certificate) is None  # another CA's view
    # Bounded: past the bound, the latest to expire are the ones kept.
    record(store, later, "renewal", now + 7200)
    monkeypatch.setattr(admit_cache, "MAX_RECORDED", 1)
    cache.preload(NoIdentities(), store, ca.certificate)  # type: ignore[arg-type]
    assert cache.recorded_count == 1 and cache.recorded(der(later), ca.certificate) is not None


def forged_with_serial_of(genuine_pem: str, ca_subject: x509.Name, key: ec.EllipticCurvePrivateKey) -> str:
    """The genuine certificate's names, serial and dates over ``key``, signed by a key that is not our CA's."""
    genuine = x509.load_pem_x509_certificate(genuine_pem.encode())
    builder = (x509.CertificateBuilder().subject_name(genuine.subject).issuer_name(ca_subject)
               .public_key(key.public_key()).serial_number(genuine.serial_number)
               .not_valid_before(dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5))
               .not_valid_after(dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)))
    for extension in genuine.extensions:
        if not isinstance(extension.value, (x509.AuthorityKeyIdentifier, x509.SubjectKeyIdentifier)):
            builder = builder.add_extension(extension.value, extension.critical)
    forged = builder.sign(ec.generate_private_key(ec.SECP256R1()), hashes.SHA256())
    return forged.public_bytes(serialization.Encoding.PEM).decode()


def restarted(ctl: Running) -> AdmissionCache:
    """The relay's cache as a relay process starting under an enrolled fleet has it: one read of the store."""
    relay = ctl.server.relay
    assert relay is not None
    relay.admission_cache = cache = AdmissionCache()
    cache.preload(ctl.context.registry, ctl.context.store, ctl.context.ca.certificate)
    return cache


def serial_of(credentials: TunnelCredentials) -> str:
    return format(x509.load_pem_x509_certificate(credentials.chain_pem[0].encode()).serial_number, "x")


def count_ca_verifications(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Serials of the certificates our CA's signature was verified on (the agent's check of the relay's too)."""
    verified: list[str] = []
    real = shared.trust.Issuer._issued  # every check, from a certificate or from its bytes, comes here

    def issued(self: shared.trust.Issuer, cert: x509.Certificate) -> bool:
        verified.append(format(cert.serial_number, "x"))
        return real(self, cert)

    monkeypatch.setattr(shared.trust.Issuer, "_issued", issued)
    return verified


def test_after_a_start_a_recorded_certificate_is_admitted_with_no_ca_verification_store_read_or_worker_job(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl") as ctl:
            recorded = await enrolled(ctl, "gw-recorded")
            unrecorded = await enrolled(ctl, "gw-unrecorded")
            with ctl.context.store.transaction() as db:  # as a certificate issued before the column existed
                db.execute("UPDATE certificates SET der_sha256 = NULL WHERE name = 'gw-unrecorded'")
            cache = restarted(ctl)
            assert cache.recorded_count == 1
            reads = count_store_reads(ctl, monkeypatch)
            verified = count_ca_verifications(monkeypatch)
            worker_jobs = count_worker_jobs(monkeypatch)
            async with connect(ctl, recorded) as (session, task):
                assert session.relay_info["identity"] == recorded.uri
                await asyncio.sleep(0.1)
                assert not task.done()
            assert serial_of(recorded) not in verified
            assert (reads, worker_jobs) == ([], [])
            async with connect(ctl, unrecorded) as (session, _):  # verified as before
                assert session.relay_info["identity"] == unrecorded.uri
            assert serial_of(unrecorded) in verified
            assert [read.split()[0] for read in reads] == ["purpose"] and worker_jobs

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))


def test_after_a_start_revoked_re_keyed_and_forged_certificates_are_refused_with_the_cache_cold_and_warm(
        tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl") as ctl:
            revoked = await enrolled(ctl, "gw-revoked")
            moved = await enrolled(ctl, "gw-moved")
            genuine = await enrolled(ctl, "gw-genuine")
            status, body = await ctl.call("POST", "/api/v1/identities/gw-moved/token", {})
            assert status == 201, body
            await redeem(ctl, body["token"], "gw-moved")
            ctl.context.registry.revoke("default", "gw-revoked")
            thief_key = ec.generate_private_key(ec.SECP256R1())
            forged = TunnelCredentials(
                uri=genuine.uri, ca_pem=genuine.ca_pem, keystore=KeyOf(thief_key),
                chain_pem=[forged_with_serial_of(genuine.chain_pem[0], ctl.context.ca.certificate.subject, thief_key)])
            for warm in (False, True):
                cache = restarted(ctl)
                assert cache.recorded_count == 4  # revoked, both of gw-moved, genuine: all still valid
                if warm:
                    async with connect(ctl, genuine) as (session, _):
                        assert session.relay_info["identity"] == genuine.uri
                with pytest.raises(TunnelRefused, match="revoked"):
                    async with connect(ctl, revoked):
                        pass
                with pytest.raises(TunnelRefused, match="no longer the key of identity default/gw-moved"):
                    async with connect(ctl, moved):
                        pass
                with pytest.raises(TunnelRefused, match="not issued by this controller's CA"):
                    async with connect(ctl, forged):
                        pass

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))
