"""``outpost-agent enroll`` from the command line, against the controller double on loopback."""

from __future__ import annotations

from pathlib import Path

from agent.identity.state import StateDir
from tests.agent.cli_helpers import one_line_error, run_cli
from tests.agent.enrollment.fake_controller import unused_loopback_port


def test_enroll_prints_who_until_when_and_where_the_key_is(controller, state_dir, token_file):
    token = token_file(controller.token(sub="pump-9"))
    token_before = token.read_bytes()

    result = run_cli("enroll", "--token", token, "--state", state_dir, "--keystore", "software")

    assert result.returncode == 0, result.stderr
    identity = StateDir(state_dir).load()
    expiry = identity.not_after().strftime("%Y-%m-%d %H:%M UTC")
    assert result.stdout == (
        f"enrolled as spiffe://outpost.test/default/pump-9; certificate valid until {expiry}; key in software\n"
    )
    assert token.read_bytes() == token_before, "the technician's token file is left alone"


def test_enroll_takes_state_dir_and_key_store_from_the_config(controller, tmp_path, token_file):
    config = tmp_path / "agent.toml"
    config.write_text(f'state_dir = "{tmp_path / "from-config"}"\n[keystore]\nbackend = "software"\n')

    result = run_cli("enroll", "--token", token_file(controller.token()), "--config", config)

    assert result.returncode == 0, result.stderr
    assert StateDir(tmp_path / "from-config").is_enrolled()


def test_a_wrong_ca_fingerprint_is_one_line_with_exit_65(controller, other_ca, state_dir, token_file):
    controller.behaviour.served_ca = other_ca

    result = run_cli("enroll", "--token", token_file(controller.token()), "--state", state_dir, "--keystore", "software")

    assert result.returncode == 65
    assert one_line_error(result).startswith("outpost-agent: wrong CA fingerprint: ")
    assert not state_dir.exists()


def test_a_controller_that_is_down_is_one_line_with_exit_69(ca, state_dir, token_file):
    url = f"https://127.0.0.1:{unused_loopback_port()}"

    result = run_cli("enroll", "--token", token_file(ca.token(url)), "--state", state_dir, "--keystore", "software")

    assert result.returncode == 69
    assert f"could not reach the controller at {url}/v1/ca" in one_line_error(result)


def test_an_expired_token_is_one_line_with_exit_65(controller, state_dir, token_file):
    result = run_cli("enroll", "--token", token_file(controller.token(ttl=-60)), "--state", state_dir,
                     "--keystore", "software")

    assert result.returncode == 65
    assert "this token expired on" in one_line_error(result)
    assert controller.enroll_requests == 0


def test_a_token_expired_only_by_a_clock_nobody_could_check_is_a_clock_problem_with_exit_75(
        controller, state_dir, token_file):
    controller.behaviour.serves_time = False  # and no NTP server configured: nothing can check the clock

    result = run_cli("enroll", "--token", token_file(controller.token(ttl=-60)), "--state", state_dir,
                     "--keystore", "software")

    assert result.returncode == 75, "retryable: a clock a year ahead looks exactly like this"
    line = one_line_error(result)
    assert "this token expired on" in line and "by this gateway's clock, which could not be checked" in line
    assert line.endswith("set the clock or allow NTP (UDP port 123), otherwise ask central ops for a new token")
    assert controller.enroll_requests == 0
    assert not state_dir.exists()


def test_a_second_enroll_is_refused_with_exit_1_and_changes_nothing(controller, state_dir, token_file):
    assert run_cli("enroll", "--token", token_file(controller.token()), "--state", state_dir,
                   "--keystore", "software").returncode == 0
    before = {p.name: p.read_bytes() for p in state_dir.iterdir()}

    result = run_cli("enroll", "--token", token_file(controller.token(), "t2"), "--state", state_dir,
                     "--keystore", "software")

    assert result.returncode == 1
    assert "already enrolled as spiffe://outpost.test/default/pump-1" in one_line_error(result)
    assert {p.name: p.read_bytes() for p in state_dir.iterdir()} == before


def test_a_missing_token_file_is_one_line(tmp_path: Path):
    result = run_cli("enroll", "--token", tmp_path / "nope", "--state", tmp_path / "state")

    assert result.returncode == 65
    assert one_line_error(result) == f"outpost-agent: the token file {tmp_path / 'nope'} does not exist; check the path"
