"""TLS with a wrong local clock, handled deliberately: OpenSSL verifies the chain,
signatures and host name; the dates are judged by trusted time afterwards
(agent.identity.pinned_tls, for tunnels, enrollment and renewal alike).

Against the real in-process controller and relay; the gateway's clock is a
callable set to 1970 or a year ahead (tests/e2e/test_clock_faketime.py runs
whole agent processes under libfaketime, where OpenSSL sees that clock too).
"""

from __future__ import annotations

import datetime
import time
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509

from agent.clock.settings import ClockSettings
from agent.clock.trusted import TrustedClock
from agent.enrollment.enroll import enroll_async
from agent.errors import ClockError, TrustError
from agent.identity.pinned_tls import FixedTime, PinnedTLS
from agent.identity.select import KeyStoreSettings, open_keystore
from agent.identity.state import StateDir
from agent.identity.tls_trust import check_dates, pinned_ssl_context, served_ssl_object
from agent.tunnel.client import TunnelCredentials, TunnelOptions, open_tunnel
from tests.agent.clock.clock_helpers import BOOTED_IN_1970, YEAR, local_clock_at, local_clock_shifted
from tests.controller.harness import run, running_controller

SOFTWARE = KeyStoreSettings(backend="software")
WRONG_CLOCKS = {"1970": local_clock_at(BOOTED_IN_1970), "year-ahead": local_clock_shifted(YEAR + 86400)}


def write_token(tmp_path: Path, token: str) -> Path:
    path = tmp_path / "gw.token"
    path.write_text(token)
    return path


@pytest.mark.parametrize("which", sorted(WRONG_CLOCKS))
def test_a_gateway_with_a_wrong_clock_enrolls_and_tunnels_on_the_controllers_time(tmp_path: Path, which: str) -> None:
    local = WRONG_CLOCKS[which]

    async def scenario():
        async with running_controller(tmp_path / "ctl") as ctl:
            created = await ctl.create_identity("gw-clock")
            clock = TrustedClock(ClockSettings(), local=local)
            identity = await enroll_async(write_token(tmp_path, created["token"]), tmp_path / "state", SOFTWARE,
                                          clock=clock)
            keystore = open_keystore(tmp_path / "state", SOFTWARE)
            credentials = TunnelCredentials(identity.uri, [identity.cert_pem], identity.ca_pem, keystore)
            async with aiohttp.ClientSession() as http:
                session, task = await open_tunnel(http, identity.relays[0], credentials,
                                                  pinned_ssl_context(identity.ca_pem), TunnelOptions(clock=clock))
                authenticated = session.authenticated.is_set()
                await session.close()
                await task
            keystore.close()
            return clock, identity, authenticated

    clock, identity, authenticated = run(scenario())
    assert authenticated
    assert clock.source == "controller" and abs(clock.now() - time.time()) < 1.0
    assert abs(identity.enrolled_at - time.time()) < 60, "enrollment is stamped with trusted time"
    assert StateDir(tmp_path / "state").is_enrolled()
    assert "the clock is off by " in clock.report() and "using the controller's time" in clock.report()


def test_an_unchecked_1970_clock_gets_a_plain_sentence_not_a_tls_error(tmp_path: Path) -> None:
    local = local_clock_at(BOOTED_IN_1970)

    async def scenario():
        async with running_controller(tmp_path / "ctl") as ctl:
            created = await ctl.create_identity("gw-clock")
            identity = await enroll_async(write_token(tmp_path, created["token"]), tmp_path / "state", SOFTWARE,
                                          clock=TrustedClock())
            keystore = open_keystore(tmp_path / "state", SOFTWARE)
            credentials = TunnelCredentials(identity.uri, [identity.cert_pem], identity.ca_pem, keystore)
            unmeasured = TrustedClock(local=local)  # nothing could be asked: the local clock alone
            try:
                async with aiohttp.ClientSession() as http:
                    await open_tunnel(http, identity.relays[0], credentials, pinned_ssl_context(identity.ca_pem),
                                      TunnelOptions(clock=unmeasured))
            finally:
                keystore.close()

    with pytest.raises(ClockError) as error:
        run(scenario())
    sentence = str(error.value)
    assert sentence.startswith("the relay at wss://127.0.0.1:")
    assert "but this gateway's clock reads 1970-01-02 00:00 UTC; the clock is probably wrong" in sentence
    assert "set the clock or allow NTP (UDP port 123)" in sentence


def test_an_enrollment_whose_token_expired_by_trusted_time_fails_though_the_local_clock_is_early(tmp_path: Path):
    local = local_clock_at(BOOTED_IN_1970)

    async def scenario():
        async with running_controller(tmp_path / "ctl") as ctl:
            created = await ctl.create_identity("gw-clock")
            token = write_token(tmp_path, created["token"])
            # The controller's clock is right; pretend two days passed by trusted time.
            clock = TrustedClock(local=local)
            return await enroll_async(token, tmp_path / "state", SOFTWARE,
                                      now=created["token_expires"] + 2 * 86400, clock=clock)

    from agent.errors import TokenError
    with pytest.raises(TokenError, match="expired"):
        run(scenario())
    assert not StateDir(tmp_path / "state").is_enrolled()


def cert_valid(days_from: float, days_to: float) -> x509.Certificate:
    import datetime as dt

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "relay")])
    now = dt.datetime(2026, 11, 22, tzinfo=dt.UTC)
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now + dt.timedelta(days=days_from))
            .not_valid_after(now + dt.timedelta(days=days_to)).sign(key, hashes.SHA256()))


NOV_22 = datetime.datetime(2026, 11, 22, tzinfo=datetime.UTC).timestamp()


def test_dates_outside_validity_by_measured_time_are_the_peers_fault() -> None:
    cert = cert_valid(-10, 10)
    check_dates(cert, NOV_22, "the relay presented a certificate", time_measured=True)
    with pytest.raises(TrustError, match="expired at the checked time 2026-12-12"):
        check_dates(cert, NOV_22 + 20 * 86400, "the relay presented a certificate", time_measured=True)
    with pytest.raises(TrustError, match="not yet valid"):
        check_dates(cert, NOV_22 - 20 * 86400, "the relay presented a certificate", time_measured=True)


def test_dates_outside_validity_by_an_unchecked_clock_blame_the_clock() -> None:
    with pytest.raises(ClockError, match="but this gateway's clock reads 1970-01-02 00:00 UTC"):
        check_dates(cert_valid(-10, 10), BOOTED_IN_1970, "the relay presented a certificate", time_measured=False)


@pytest.mark.parametrize("which", sorted(WRONG_CLOCKS))
def test_renewal_judges_the_controllers_certificate_by_trusted_time_not_by_the_local_clock(
        tmp_path: Path, which: str) -> None:
    from agent.clock.measure import refresh_clock
    from agent.identity.renewal import renew_certificate

    local = WRONG_CLOCKS[which]

    async def scenario():
        async with running_controller(tmp_path / "ctl") as ctl:
            created = await ctl.create_identity("gw-renew")
            await enroll_async(write_token(tmp_path, created["token"]), tmp_path / "state", SOFTWARE,
                               clock=TrustedClock())
            state = StateDir(tmp_path / "state")
            keystore = open_keystore(state.path, SOFTWARE)
            try:
                unchecked = TrustedClock(local=local)  # nothing measured yet: the wrong clock alone
                try:
                    await renew_certificate(state, keystore, unchecked)
                except ClockError as error:
                    refused = str(error)
                else:
                    refused = None
                cert_after_refusal = state.load().cert_pem
                await refresh_clock(unchecked, state.load().controller_url, state.load().ca_pem)
                renewed = await renew_certificate(state, keystore, unchecked)
            finally:
                keystore.close()
            return refused, cert_after_refusal, renewed

    refused, cert_after_refusal, renewed = run(scenario())
    assert refused is not None and refused.startswith("the controller at https://127.0.0.1:")
    assert "but this gateway's clock reads " in refused and "the clock is probably wrong" in refused
    stored = StateDir(tmp_path / "state").load().certificate()
    assert x509.load_pem_x509_certificate(cert_after_refusal.encode()).serial_number != renewed.serial_number, \
        "a refused renewal keeps the old certificate; the measured one replaces it"
    assert stored.serial_number == renewed.serial_number


def test_a_served_leaf_must_be_signed_by_the_pinned_ca_itself(tmp_path: Path) -> None:
    async def scenario():
        async with running_controller(tmp_path / "a") as a, running_controller(tmp_path / "b") as b:
            # A context that trusts both CAs gets past OpenSSL; the check still holds to the one pinned.
            tls = PinnedTLS(a.context.ca.certificate_pem, FixedTime(time.time()))
            context = tls.context()
            context.load_verify_locations(cadata=b.context.ca.certificate_pem)
            async with aiohttp.ClientSession() as http:
                async with http.get(b.url + "/v1/ca", ssl=context) as response:
                    tls.check(served_ssl_object(response), f"the controller at {b.url}")

    with pytest.raises(TrustError, match="presented a certificate not signed by the pinned controller CA"):
        run(scenario())
