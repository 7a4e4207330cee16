"""``outpost-agent doctor`` against a real controller on 127.0.0.1: each check's sentence and the exit code."""

from __future__ import annotations

import asyncio
import json
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.config import AgentConfig
from agent.doctor.checks import (
    CERT_WARN_FRACTION,
    DEFAULT_RECOVERY_GRACE_DAYS,
    check_certificate,
    check_enrollment,
    check_state_dir,
)
from agent.doctor.network import (
    CLOCK_FAIL_SECONDS,
    CLOCK_WARN_SECONDS,
    Endpoint,
    check_dns,
    check_tls,
    clock_verdict,
    endpoints,
)
from agent.doctor.result import FAIL, OK, SKIP, WARN
from agent.enrollment.enroll import enroll_async
from agent.enrollment.field import REFUSED_NOTE, find_token, save_refusal
from agent.identity.select import KeyStoreSettings
from agent.identity.state import EnrolledIdentity
from shared.trust import cert_not_after, cert_not_before
from shared.utc import format_utc
from tests.agent.cli_helpers import doctor_lines, run_cli
from tests.agent.clock.ntp_responder import NtpResponder
from tests.e2e.harness import Controller


@pytest.fixture(scope="module")
def controller(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Controller]:
    running = Controller(tmp_path_factory.mktemp("doctor-controller"))
    try:
        yield running
    finally:
        running.process.stop()


def enrolled_gateway(controller: Controller, folder: Path, name: str) -> tuple[Path, EnrolledIdentity]:
    """A config file and the gateway it names, enrolled with a software key."""
    token = folder / f"{name}.token"
    controller.ctl("identity", "create", name, "--token-out", str(token))
    identity = asyncio.run(enroll_async(token, folder / "state", KeyStoreSettings(backend="software")))
    config = folder / "agent.toml"
    config.write_text(f'state_dir = "{folder / "state"}"\n[keystore]\nbackend = "software"\n')
    return config, identity


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/")[0])


def test_an_enrolled_gateway_that_reaches_its_controller_passes_every_check(controller: Controller, tmp_path: Path) -> None:
    config, identity = enrolled_gateway(controller, tmp_path, "doc-1")
    port = port_of(controller.url)

    result = run_cli("doctor", "--config", config)

    assert result.returncode == 0, result.stdout + result.stderr
    found = doctor_lines(result.stdout)
    assert found["config"] == (OK, f"{config} is valid")
    assert found["state"] == (OK, f"the state directory {tmp_path / 'state'} is writable")
    assert found["enrollment"] == (OK, f"enrolled as {identity.uri}")
    assert found["key store"] == (OK, "the device key is kept in software (as enrolled)")
    assert found["certificate"][0] == OK and found["certificate"][1].startswith("the certificate is valid until ")
    assert re.search(r" UTC \(in (23 h \d+ min|24 h)\)$", found["certificate"][1]), found["certificate"][1]
    assert found["dns 127.0.0.1"] == (OK, "127.0.0.1 is an IP address; no DNS needed")
    assert found[f"127.0.0.1:{port}"] == (
        OK, f"outbound TCP and TLS to the controller and relay at 127.0.0.1:{port} work, "
            "and its certificate chains to the pinned CA")
    assert found["clock"][0] == OK
    assert re.fullmatch(r"this gateway's clock is \d+(\.\d)? s (behind|ahead of) the controller's", found["clock"][1])


def test_json_output_carries_the_same_checks(controller: Controller, tmp_path: Path) -> None:
    config, _ = enrolled_gateway(controller, tmp_path, "doc-2")
    result = run_cli("doctor", "--config", config, "--json")
    report = json.loads(result.stdout)
    assert result.returncode == 0 and report["ok"] is True
    assert [c["name"] for c in report["checks"]][:5] == ["config", "state", "enrollment", "key store", "certificate"]
    assert all(c["status"] == OK for c in report["checks"])


#: The gateways enrolled with the controller that is stopped before the module's tests dial it (one per test).
STOPPED_GATEWAYS = ("doc-3", "doc-ntp-0", "doc-ntp-400", "doc-ntp-silent")


@pytest.fixture(scope="module")
def stopped_controller(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, int]]:
    """A folder of gateways (STOPPED_GATEWAYS) enrolled with a controller since stopped, and its closed port.

    One controller's start serves every test that needs one out of reach (a start is seconds, more under
    emulation). Its port stays bound, never listened on, for the module: a dial is refused, and no other
    process can take the port between the tests.
    """
    folder = tmp_path_factory.mktemp("gone")
    gone = Controller(folder / "controller")
    try:
        for name in STOPPED_GATEWAYS:
            (folder / name).mkdir()
            enrolled_gateway(gone, folder / name, name)
    finally:
        gone.process.stop()
    port = port_of(gone.url)
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("127.0.0.1", port))
        yield folder, port


def gateway_of_a_stopped_controller(stopped: tuple[Path, int], tmp_path: Path, name: str,
                                    clock: str = "") -> tuple[Path, int]:
    """An enrolled gateway's config (with ``clock`` as its [clock] table) and the closed port of its controller."""
    folder, port = stopped
    config = tmp_path / "agent.toml"
    config.write_text((folder / name / "agent.toml").read_text() + (f"[clock]\n{clock}" if clock else ""))
    return config, port


def test_a_controller_that_cannot_be_reached_fails_the_connection_and_without_ntp_skips_the_clock(
    stopped_controller: tuple[Path, int], tmp_path: Path
) -> None:
    config, port = gateway_of_a_stopped_controller(stopped_controller, tmp_path, "doc-3")

    result = run_cli("doctor", "--config", config)

    assert result.returncode == 1
    found = doctor_lines(result.stdout)
    assert found[f"127.0.0.1:{port}"] == (
        FAIL, f"cannot connect to the controller and relay at 127.0.0.1:{port} (connection refused); "
              f"allow outbound TCP port {port} to 127.0.0.1 in the site's firewall")
    assert found["clock"] == (SKIP, "could not ask the controller for the time (see the checks above), and no NTP "
                                    'server is configured; set [clock] ntp_servers (for example ["pool.ntp.org"]) '
                                    "to check the clock without the controller")
    assert found["enrollment"][0] == OK, "the rest is still checked"


@pytest.mark.parametrize(("offset", "status", "sentence"), [
    (0.0, OK, r"this gateway's clock is \d(\.\d)? s (behind|ahead of) NTP \(127\.0\.0\.1:\d+\)"),
    (400.0, FAIL, r"this gateway's clock is 6 min( \d+ s)? behind NTP \(127\.0\.0\.1:\d+\): the agent judges "
                  r"certificates and tokens by the measured time meanwhile, but logs, .*; set the time .*"),
])
def test_with_the_controller_out_of_reach_the_clock_is_checked_against_ntp(
    stopped_controller: tuple[Path, int], tmp_path: Path, offset: float, status: str, sentence: str
) -> None:
    with NtpResponder(offset=offset) as ntp:
        config, _ = gateway_of_a_stopped_controller(stopped_controller, tmp_path, f"doc-ntp-{offset:.0f}",
                                                    f'ntp_servers = ["{ntp.address}"]\nntp_timeout = 2.0\n')
        result = run_cli("doctor", "--config", config)
        asked = ntp.requests
    found = doctor_lines(result.stdout)
    assert found["clock"][0] == status, found["clock"]
    assert re.fullmatch(sentence, found["clock"][1]), found["clock"]
    assert ntp.address in found["clock"][1] and asked == 1


def test_a_silent_ntp_server_leaves_the_clock_unchecked_with_a_warning(
    stopped_controller: tuple[Path, int], tmp_path: Path
) -> None:
    with NtpResponder(silent=True) as ntp:
        config, _ = gateway_of_a_stopped_controller(stopped_controller, tmp_path, "doc-ntp-silent",
                                                    f'ntp_servers = ["{ntp.address}"]\nntp_timeout = 0.5\n')
        result = run_cli("doctor", "--config", config)
    assert doctor_lines(result.stdout)["clock"] == (
        WARN, "could not ask the controller for the time (see the checks above), and no NTP server gave a usable "
              f"answer ({ntp.address}); the clock is unchecked: allow outbound UDP port 123 to them, or reach the controller")


def test_before_enrollment_the_token_file_pins_the_ca_and_the_controller_is_checked(
    controller: Controller, tmp_path: Path
) -> None:
    token = tmp_path / "etc" / "enroll.token"
    token.parent.mkdir()
    controller.ctl("identity", "create", "doc-4", "--token-out", str(token))
    config = tmp_path / "agent.toml"
    (tmp_path / "state").mkdir()
    config.write_text(f'state_dir = "{tmp_path / "state"}"\n[keystore]\nbackend = "software"\n'
                      f'[enrollment]\ntoken_paths = ["{token}"]\n')
    port = port_of(controller.url)

    result = run_cli("doctor", "--config", config)

    assert result.returncode == 0, result.stdout
    found = doctor_lines(result.stdout)
    assert found["enrollment"] == (OK, f"not enrolled yet; token file found at {token} for doc-4, the agent enrolls from it")
    assert found["key store"] == (OK, "the device key is kept in software, as configured")
    assert found["certificate"] == (SKIP, "no certificate until enrolled")
    assert found["pinned CA"][0] == OK and "matches the token's fingerprint sha256:" in found["pinned CA"][1]
    assert found[f"127.0.0.1:{port}"][0] == OK
    assert found["clock"][0] == OK


def test_without_identity_or_token_the_doctor_says_where_to_put_the_token(tmp_path: Path) -> None:
    (tmp_path / "state").mkdir()
    config = tmp_path / "agent.toml"
    config.write_text(f'state_dir = "{tmp_path / "state"}"\n[keystore]\nbackend = "software"\n'
                      f'[enrollment]\ntoken_paths = ["{tmp_path / "none.token"}"]\n')

    result = run_cli("doctor", "--config", config)

    assert result.returncode == 1
    found = doctor_lines(result.stdout)
    assert found["enrollment"] == (
        FAIL, f"not enrolled, and no token file in {tmp_path / 'none.token'}; copy the token file from central ops "
              "to /boot/firmware/outpost-enroll.token or /etc/outpost/enroll.token")
    assert found["network"] == (SKIP, "no controller to check until enrolled or a token file is in place")
    assert found["clock"][0] == SKIP and "no NTP server is configured" in found["clock"][1]


def test_before_enrollment_and_without_a_token_the_clock_is_still_checked_against_ntp(tmp_path: Path) -> None:
    (tmp_path / "state").mkdir()
    config = tmp_path / "agent.toml"
    with NtpResponder(offset=-100.0) as ntp:
        config.write_text(f'state_dir = "{tmp_path / "state"}"\n[keystore]\nbackend = "software"\n'
                          f'[enrollment]\ntoken_paths = ["{tmp_path / "none.token"}"]\n'
                          f'[clock]\nntp_servers = ["{ntp.address}"]\n')
        result = run_cli("doctor", "--config", config)
    status, sentence = doctor_lines(result.stdout)["clock"]
    assert status == WARN and sentence.startswith("this gateway's clock is 10") and " s ahead of NTP (" in sentence


def test_a_broken_config_fails_and_the_rest_runs_on_defaults(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text("state_dir = \n")
    result = run_cli("doctor", "--config", config)
    assert result.returncode == 1
    status, message = doctor_lines(result.stdout)["config"]
    assert status == FAIL and message.startswith(f"the config file {config} is not valid TOML")
    assert message.endswith("(the checks below use the defaults)")
    assert "state" in doctor_lines(result.stdout)


def test_a_refused_token_is_reported_with_the_reason_it_was_refused(tmp_path: Path) -> None:
    token = tmp_path / "enroll.token"
    token.write_text("anything\n")
    (tmp_path / "state").mkdir()
    config = AgentConfig(state_dir=tmp_path / "state", token_paths=(token,))
    save_refusal(config.state_dir, find_token([token]), "this token expired on 2020-01-01 00:00 UTC; ask central ops for a new one")

    check, identity, parsed = check_enrollment(config)

    assert (check.status, check.message) == (
        FAIL, f"the token file {token} was refused: this token expired on 2020-01-01 00:00 UTC; ask central ops for a new one")
    assert identity is None and parsed is None
    assert (config.state_dir / REFUSED_NOTE).exists() and token.read_text() == "anything\n", "the doctor changes nothing"


def test_a_missing_or_non_directory_state_dir_fails_with_how_to_fix(tmp_path: Path) -> None:
    missing = check_state_dir(tmp_path / "missing")
    assert missing.status == FAIL and missing.message == (
        f"the state directory {tmp_path / 'missing'} does not exist; reinstall outpost-agent, "
        "or create it owned by the agent's user with mode 0700")
    (tmp_path / "a-file").write_text("")
    assert check_state_dir(tmp_path / "a-file").status == FAIL
    assert check_state_dir(tmp_path).status == OK


def test_a_tls_peer_with_another_ca_is_named_as_an_inspecting_proxy(controller: Controller, tmp_path: Path) -> None:
    _, identity = enrolled_gateway(controller, tmp_path, "doc-5")
    other = Controller(tmp_path / "other")
    try:
        port = port_of(other.url)
        check = asyncio.run(check_tls(Endpoint("127.0.0.1", port, "relay"), identity.ca_pem))
    finally:
        other.process.stop()
    assert (check.status, check.message) == (
        FAIL, f"the relay at 127.0.0.1:{port} presents a certificate not issued by the pinned CA; a TLS-inspecting "
              "proxy or firewall is in between: exempt 127.0.0.1 from inspection")


def test_localhost_resolves_through_the_hosts_file() -> None:
    check = asyncio.run(check_dns("localhost"))
    assert check.status == OK and check.message.startswith("localhost resolves to ") and "127.0.0.1" in check.message


def test_clock_offsets_read_in_the_units_people_use() -> None:
    status, message = clock_verdict(-400 * 86400.0)
    assert status == FAIL and message.startswith("this gateway's clock is 400 days ahead of the controller's: ")
    assert clock_verdict(-60.0)[1] == "this gateway's clock is 60 s ahead of the controller's; check that NTP works " \
                                      "(systemd-timesyncd, outbound UDP port 123)"


def test_clock_offsets_are_judged_against_named_bounds() -> None:
    assert clock_verdict(1.25) == (OK, "this gateway's clock is 1.2 s behind the controller's")
    assert clock_verdict(-CLOCK_WARN_SECONDS) == (OK, f"this gateway's clock is {CLOCK_WARN_SECONDS:.0f} s ahead of the controller's")
    status, message = clock_verdict(CLOCK_WARN_SECONDS + 1)
    assert status == WARN and message.endswith("; check that NTP works (systemd-timesyncd, outbound UDP port 123)")
    status, message = clock_verdict(-(CLOCK_FAIL_SECONDS + 1))
    assert status == FAIL and "set the time (timedatectl set-time)" in message


def test_certificate_validity_is_judged_at_the_given_time(controller: Controller, tmp_path: Path) -> None:
    _, identity = enrolled_gateway(controller, tmp_path, "doc-6")
    start = cert_not_before(identity.certificate()).timestamp()
    end = cert_not_after(identity.certificate()).timestamp()
    assert check_certificate(identity, start + 1).status == OK
    assert check_certificate(identity, end - (end - start) * (1 - CERT_WARN_FRACTION) - 1).status == OK
    assert check_certificate(identity, end - (end - start) * CERT_WARN_FRACTION + 1).status == WARN
    early = check_certificate(identity, start - 3600)
    assert early.status == FAIL and early.message.startswith("the certificate is valid only from ")
    assert early.message.endswith("after this gateway's clock (" + format_utc(start - 3600) + "); set the clock "
                                  "and check NTP (see the clock check)")
    assert check_certificate(None, end).status == SKIP


def test_an_expired_certificate_is_recovered_within_the_grace_period_and_needs_a_new_token_past_it(
    controller: Controller, tmp_path: Path
) -> None:
    _, identity = enrolled_gateway(controller, tmp_path, "doc-7")
    end = cert_not_after(identity.certificate()).timestamp()
    grace_end = format_utc(end + DEFAULT_RECOVERY_GRACE_DAYS * 86400)
    new_token = "ask central ops for a new token, stop outpost-agent, remove the state directory and place the token"

    within = check_certificate(identity, end + 3 * 86400, measured=True)
    past = check_certificate(identity, end + (DEFAULT_RECOVERY_GRACE_DAYS + 1) * 86400, measured=True)
    unchecked = check_certificate(identity, end + 3 * 86400)

    assert (within.status, within.message) == (FAIL, (
        f"the certificate expired on {format_utc(end)} (by the controller's time); the agent recovers it with its "
        "enrolled key, no new token needed, at its next start (systemctl restart outpost-agent) or its next renewal "
        f"attempt, within the controller's grace period (30 days after expiry by default, until {grace_end}); past "
        f"that, {new_token}"))
    assert (past.status, past.message) == (FAIL, (
        f"the certificate expired on {format_utc(end)} (by the controller's time), more than 30 days ago: past the "
        "controller's grace period (30 days after expiry by default), so the controller refuses to recover it unless "
        f"it was given a longer --recovery-grace; {new_token}"))
    assert unchecked.status == FAIL and unchecked.message.startswith(
        f"the certificate expired on {format_utc(end)} by this gateway's clock ({format_utc(end + 3 * 86400)}), which "
        "could not be checked against the controller; if the clock is right, the agent recovers it")
    assert unchecked.message.endswith("if the clock is wrong, set it (see the clock check)")


def test_a_controller_issuing_from_the_future_is_named_when_its_time_was_measured(
    controller: Controller, tmp_path: Path
) -> None:
    _, identity = enrolled_gateway(controller, tmp_path, "doc-8")
    start = cert_not_before(identity.certificate()).timestamp()
    early = check_certificate(identity, start - 3600, measured=True)
    assert (early.status, early.message) == (FAIL, (
        f"the certificate is valid only from {format_utc(start)}, after the controller's time "
        f"({format_utc(start - 3600)}): the controller's clock was ahead when it issued it; ask central ops to "
        "check the controller's clock"))


def test_the_controller_and_a_relay_on_the_same_address_are_checked_once() -> None:
    identity = EnrolledIdentity(name="gw", tenant="default", uri="spiffe://x/gw", controller_url="https://ops.example:8443",
                                relays=["wss://ops.example:8443/v1/tunnel", "wss://relay2.example/v1/tunnel"])
    assert endpoints(identity, None) == [
        Endpoint("ops.example", 8443, "controller and relay"),
        Endpoint("relay2.example", 443, "relay"),
    ]
    assert endpoints(None, None) == []
