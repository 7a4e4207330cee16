"""``outpost-agent enroll`` from the command line, against the controller double on loopback."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.identity.state import StateDir
from tests.agent.cli_helpers import one_line_error, run_cli
from tests.agent.enrollment.fake_controller import unused_loopback_port


def test_enroll_prints_who_until_when_and_where_the_key_is_and_retires_the_token(controller, state_dir, token_file):
    token = token_file(controller.token(sub="pump-9"))

    result = run_cli("enroll", "--token", token, "--state", state_dir, "--keystore", "software")

    assert result.returncode == 0, result.stderr
    identity = StateDir(state_dir).load()
    expiry = identity.not_after().strftime("%Y-%m-%d %H:%M UTC")
    assert result.stdout == (
        f"enrolled as spiffe://outpost.test/default/pump-9; certificate valid until {expiry}; key in software\n"
        f"token file {token} deleted: a token enrolls once\n"
    )
    assert result.stderr == ""
    assert not token.exists(), "the used token is retired, as field enrollment does"


def test_a_token_read_through_a_link_retires_the_file_not_the_link(controller, state_dir, token_file, tmp_path):
    token = token_file(controller.token())
    link = tmp_path / "link.token"
    link.symlink_to(token)

    result = run_cli("enroll", "--token", link, "--state", state_dir, "--keystore", "software")

    assert result.returncode == 0, result.stderr
    assert f"token file {token} deleted" in result.stdout
    assert not token.exists() and link.is_symlink()


def test_a_token_from_a_pipe_enrolls_and_there_is_no_file_to_retire(controller, state_dir):
    read, write = os.pipe()
    os.write(write, (controller.token() + "\n").encode())
    os.close(write)
    try:
        result = run_cli("enroll", "--token", "/dev/stdin", "--state", state_dir, "--keystore", "software", stdin=read)
    finally:
        os.close(read)

    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "the token came from /dev/stdin, which is not a file; nothing to delete"
    assert StateDir(state_dir).is_enrolled() and Path("/dev/stdin").exists()


def test_a_token_that_cannot_be_deleted_is_one_line_and_the_gateway_stays_enrolled(controller, state_dir, tmp_path):
    folder = tmp_path / "locked"
    folder.mkdir()
    token = folder / "outpost-token.txt"
    token.write_text(controller.token() + "\n")
    with locked_directory(folder):
        result = run_cli("enroll", "--token", token, "--state", state_dir, "--keystore", "software")
        assert token.exists()

    assert result.returncode == 0, result.stderr
    assert one_line_error(result) == (
        f"outpost-agent: enrolled, but the used token {token} could not be removed (Operation not permitted); "
        "delete it by hand (until it expires, the controller accepts it again from this gateway's key)"
    )
    assert StateDir(state_dir).is_enrolled()


@contextlib.contextmanager
def locked_directory(folder: Path) -> Iterator[None]:
    """A directory in which nothing can be deleted or renamed, even by root (the immutable attribute)."""
    if os.geteuid() != 0:
        folder.chmod(0o500)
        try:
            yield
        finally:
            folder.chmod(0o700)
        return
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip(f"the file system of {folder} has no immutable attribute (chattr +i)")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


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


def test_a_config_demanding_a_tpm_where_there_is_none_exits_64_in_one_line_and_keeps_the_token(
        controller, state_dir, token_file, tmp_path):
    token = token_file(controller.token())
    config = tmp_path / "agent.toml"
    config.write_text('[keystore]\nbackend = "tpm"\ntcti = "device:/dev/outpost-test-no-such-tpm"\n')

    result = run_cli("enroll", "--token", token, "--state", state_dir, "--config", config)

    assert result.returncode == 64, result.stderr
    assert 'keystore.backend = "software"' in one_line_error(result)
    assert token.exists() and not StateDir(state_dir).is_enrolled()
