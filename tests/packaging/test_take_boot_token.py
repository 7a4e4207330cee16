"""packaging/take-boot-token moves a token off the boot partition into the state directory."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "packaging" / "take-boot-token"
TOKEN_TEXT = "eyJhbGciOiJFUzI1NiJ9.e30.c2ln\n"
# The script's own limit on what can be an enrollment token.
MAX_TOKEN_BYTES = 65536
SCRIPT_TIMEOUT_SECONDS = 30


def take(token: Path, state: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", str(SCRIPT), str(token), str(state)], capture_output=True, text=True,
                          timeout=SCRIPT_TIMEOUT_SECONDS)


@pytest.fixture
def boot_and_state(tmp_path: Path) -> tuple[Path, Path]:
    boot = tmp_path / "boot-firmware"
    state = tmp_path / "state"
    boot.mkdir()
    state.mkdir(mode=0o700)
    return boot / "outpost-enroll.token", state


def test_token_moves_into_the_state_directory_private_and_leaves_the_boot_partition(
    boot_and_state: tuple[Path, Path],
) -> None:
    token, state = boot_and_state
    token.write_text(TOKEN_TEXT)
    result = take(token, state)
    assert result.returncode == 0, result.stderr
    taken = state / "enroll.token"
    assert taken.read_text() == TOKEN_TEXT
    assert taken.stat().st_mode & 0o777 == 0o600
    assert not token.exists()
    assert sorted(p.name for p in state.iterdir()) == ["enroll.token"]


@pytest.mark.skipif(os.geteuid() != 0, reason="giving the file to another user needs root")
def test_taken_token_belongs_to_the_state_directorys_owner(boot_and_state: tuple[Path, Path]) -> None:
    token, state = boot_and_state
    nobody = 65534
    os.chown(state, nobody, nobody)
    token.write_text(TOKEN_TEXT)
    assert take(token, state).returncode == 0
    taken = (state / "enroll.token").stat()
    assert (taken.st_uid, taken.st_gid) == (nobody, nobody)


def test_no_token_is_nothing_to_do(boot_and_state: tuple[Path, Path]) -> None:
    token, state = boot_and_state
    result = take(token, state)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert list(state.iterdir()) == []


def test_a_file_too_large_for_a_token_stays_where_it_is(boot_and_state: tuple[Path, Path]) -> None:
    token, state = boot_and_state
    token.write_bytes(b"x" * (MAX_TOKEN_BYTES + 1))
    result = take(token, state)
    assert result.returncode == 65
    assert "too large for an enrollment token" in result.stderr and result.stderr.count("\n") == 1
    assert token.stat().st_size == MAX_TOKEN_BYTES + 1
    assert list(state.iterdir()) == []


def test_a_symlink_is_refused_and_what_it_points_to_is_untouched(boot_and_state: tuple[Path, Path]) -> None:
    token, state = boot_and_state
    secret = token.parent / "elsewhere"
    secret.write_text("not for the agent\n")
    token.symlink_to(secret)
    result = take(token, state)
    assert result.returncode == 65
    assert "is not a regular file" in result.stderr
    assert token.is_symlink() and secret.read_text() == "not for the agent\n"
    assert list(state.iterdir()) == []


def test_a_token_already_taken_is_replaced_by_the_newer_one(boot_and_state: tuple[Path, Path]) -> None:
    token, state = boot_and_state
    (state / "enroll.token").write_text("old\n")
    token.write_text(TOKEN_TEXT)
    assert take(token, state).returncode == 0
    assert (state / "enroll.token").read_text() == TOKEN_TEXT


def test_on_an_enrolled_gateway_the_token_is_removed_and_not_taken(boot_and_state: tuple[Path, Path]) -> None:
    token, state = boot_and_state
    (state / "identity.json").write_text("{}\n")
    token.write_text(TOKEN_TEXT)
    result = take(token, state)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"outpost-agent: already enrolled; removed {token} (to enroll again, see outpost-agent(1))\n"
    assert not token.exists()
    assert sorted(p.name for p in state.iterdir()) == ["identity.json"]
