"""The controller's time over TLS pinned to its CA, against the real in-process controller.

The gateway's own clock is a callable here, set to 1970 or a year ahead; the
TLS handshake does not read it (dates are judged by trusted time afterwards).
"""

from __future__ import annotations

import datetime
import json
import time
from pathlib import Path

import pytest

from agent.clock.controller_time import check_reported_time, fetch_controller_time
from agent.clock.measure import refresh_clock
from agent.clock.settings import ClockSettings
from agent.clock.trusted import TrustedClock
from agent.errors import ClockError, TrustError
from shared.trust import cert_not_after, cert_not_before
from tests.agent.clock.clock_helpers import BOOTED_IN_1970, YEAR, local_clock_at, local_clock_shifted, time_server
from tests.agent.clock.ntp_responder import NtpResponder, silent_port
from tests.controller.harness import run, running_controller

#: One request on loopback; the measured offset is uncertain by half of it. The NTP responder shares
#: this process with the controller's TLS work, so under emulation its answer can wait its turn too.
LOOPBACK_ERROR = 0.5
JAN_2019 = datetime.datetime(2019, 1, 1, tzinfo=datetime.UTC).timestamp()


def test_the_offset_of_a_right_clock_is_near_zero(tmp_path: Path) -> None:
    async def scenario():
        async with running_controller(tmp_path / "ctl") as ctl:
            return await fetch_controller_time(ctl.url, ctl.context.ca.certificate_pem)

    sample = run(scenario())
    assert sample.source == "controller" and abs(sample.offset) < LOOPBACK_ERROR and sample.delay < LOOPBACK_ERROR


@pytest.mark.parametrize("local", [local_clock_at(BOOTED_IN_1970), local_clock_shifted(YEAR)], ids=["1970", "year-ahead"])
def test_a_wrong_local_clock_still_gets_the_controllers_time(tmp_path: Path, local) -> None:
    async def scenario():
        async with running_controller(tmp_path / "ctl") as ctl:
            return await fetch_controller_time(ctl.url, ctl.context.ca.certificate_pem, local)

    sample = run(scenario())
    assert abs(local() + sample.offset - time.time()) < LOOPBACK_ERROR


def test_a_controller_reporting_a_time_before_its_ca_existed_is_refused(tmp_path: Path) -> None:
    async def scenario():
        async with running_controller(tmp_path / "ctl") as ctl:
            async with time_server(tmp_path / "ctl", json.dumps({"time": JAN_2019}).encode()) as url:
                return await fetch_controller_time(url, ctl.context.ca.certificate_pem)

    with pytest.raises(ClockError) as error:
        run(scenario())
    assert "reports 2019-01-01 00:00 UTC, before its own CA was created" in str(error.value)
    assert str(error.value).endswith("refusing to trust that time — check the controller's clock")


def test_a_time_outside_the_served_certificate_is_refused(tmp_path: Path) -> None:
    two_years_ahead = time.time() + 2 * YEAR  # the CA lives ten years, the TLS certificate one

    async def scenario():
        async with running_controller(tmp_path / "ctl") as ctl:
            async with time_server(tmp_path / "ctl", json.dumps({"time": two_years_ahead}).encode()) as url:
                return await fetch_controller_time(url, ctl.context.ca.certificate_pem)

    with pytest.raises(ClockError, match="outside the validity of its own TLS certificate"):
        run(scenario())


@pytest.mark.parametrize("body", [b"{}", b'{"time": "soon"}', b'{"time": true}', b"not json", b'{"time": NaN}'])
def test_an_answer_that_is_not_a_time_is_refused(tmp_path: Path, body: bytes) -> None:
    async def scenario():
        async with running_controller(tmp_path / "ctl") as ctl:
            async with time_server(tmp_path / "ctl", body) as url:
                return await fetch_controller_time(url, ctl.context.ca.certificate_pem)

    with pytest.raises(ClockError, match="not a time"):
        run(scenario())


def test_a_controller_of_another_ca_is_not_trusted_even_with_dates_unchecked(tmp_path: Path) -> None:
    async def scenario():
        async with running_controller(tmp_path / "a") as a, running_controller(tmp_path / "b") as b:
            return await fetch_controller_time(b.url, a.context.ca.certificate_pem)

    with pytest.raises(TrustError, match="not issued by the CA pinned"):
        run(scenario())


def test_the_reported_time_must_lie_within_both_certificates(tmp_path: Path) -> None:
    async def scenario():
        async with running_controller(tmp_path / "ctl") as ctl:
            return ctl.context.ca.certificate, ctl.context.ca.certificate_pem

    ca_cert, _ = run(scenario())
    from cryptography import x509
    served = x509.load_pem_x509_certificate((tmp_path / "ctl" / "tls" / "server.pem").read_bytes())
    start, end = cert_not_before(served).timestamp(), cert_not_after(served).timestamp()
    check_reported_time(start, served, ca_cert, "https://ctl")
    check_reported_time(end, served, ca_cert, "https://ctl")
    for wrong in (start - 1, end + 1, cert_not_before(ca_cert).timestamp() - 1):
        with pytest.raises(ClockError):
            check_reported_time(wrong, served, ca_cert, "https://ctl")


def test_an_ntp_server_a_year_off_loses_to_the_pinned_controller(tmp_path: Path) -> None:
    async def scenario():
        async with running_controller(tmp_path / "ctl") as ctl:
            with NtpResponder(offset=YEAR) as ntp:
                clock = TrustedClock(ClockSettings(ntp_servers=(ntp.address,), ntp_timeout=1.0))
                await refresh_clock(clock, ctl.url, ctl.context.ca.certificate_pem)
                return clock

    clock = run(scenario())
    assert clock.source == "controller" and abs(clock.offset) < LOOPBACK_ERROR
    assert "NTP (127.0.0.1:" in clock.report() and "disagree by 365 days" in clock.report()


def test_ntp_wins_when_it_agrees_with_the_controller(tmp_path: Path) -> None:
    async def scenario():
        async with running_controller(tmp_path / "ctl") as ctl:
            with NtpResponder(offset=1.5) as ntp:
                clock = TrustedClock(ClockSettings(ntp_servers=(ntp.address,), ntp_timeout=1.0))
                await refresh_clock(clock, ctl.url, ctl.context.ca.certificate_pem)
                return clock

    clock = run(scenario())
    assert clock.source == "ntp" and clock.offset == pytest.approx(1.5, abs=LOOPBACK_ERROR)


def test_a_controller_with_a_wrong_clock_and_no_ntp_leaves_nothing_to_trust(tmp_path: Path) -> None:
    local = local_clock_at(BOOTED_IN_1970)

    async def scenario():
        async with running_controller(tmp_path / "ctl") as ctl:
            async with time_server(tmp_path / "ctl", json.dumps({"time": JAN_2019}).encode()) as url:
                clock = TrustedClock(ClockSettings(ntp_servers=(silent_port(),), ntp_timeout=0.3), local=local)
                try:
                    await refresh_clock(clock, url, ctl.context.ca.certificate_pem)
                finally:
                    assert clock.source == "local" and abs(clock.now() - local()) < 0.1

    with pytest.raises(ClockError, match="before its own CA was created"):
        run(scenario())


def test_with_ntp_answering_a_wrong_controller_clock_is_noted_not_adopted(tmp_path: Path) -> None:
    async def scenario():
        async with running_controller(tmp_path / "ctl") as ctl:
            async with time_server(tmp_path / "ctl", json.dumps({"time": JAN_2019}).encode()) as url:
                with NtpResponder(offset=0.0) as ntp:
                    clock = TrustedClock(ClockSettings(ntp_servers=(ntp.address,), ntp_timeout=1.0))
                    await refresh_clock(clock, url, ctl.context.ca.certificate_pem)
                    return clock

    clock = run(scenario())
    assert clock.source == "ntp" and abs(clock.offset) < LOOPBACK_ERROR
    assert "before its own CA was created" in clock.report()
