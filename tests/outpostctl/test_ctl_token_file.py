"""Enrollment token files: owner-only, whole, and never silently replaced."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from outpostctl.errors import TokenFileError
from outpostctl.tokenfile import check_token_target, write_token_file

TOKEN = "eyJhbGciOiJFUzI1NiJ9.e30.c2ln"


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_token_file_is_written_0600_with_a_trailing_newline(tmp_path: Path) -> None:
    old_umask = os.umask(0)
    try:
        path = write_token_file(tmp_path / "gw.token", TOKEN, force=False)
    finally:
        os.umask(old_umask)
    assert path.read_text() == TOKEN + "\n"
    assert mode_of(path) == 0o600


def test_existing_file_is_kept_byte_for_byte_without_force(tmp_path: Path) -> None:
    path = tmp_path / "gw.token"
    path.write_text("the token promised to a technician\n")
    os.chmod(path, 0o640)
    with pytest.raises(TokenFileError, match="already exists; choose another --token-out or pass --force"):
        write_token_file(path, TOKEN, force=False)
    assert path.read_text() == "the token promised to a technician\n"
    assert mode_of(path) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gw.token"], "no temporary file left behind"


def test_force_replaces_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "gw.token"
    path.write_text("old\n")
    write_token_file(path, TOKEN, force=True)
    assert path.read_text() == TOKEN + "\n"
    assert mode_of(path) == 0o600


def test_a_symlink_is_replaced_never_written_through(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep me\n")
    link = tmp_path / "gw.token"
    link.symlink_to(victim)
    with pytest.raises(TokenFileError, match="already exists"):
        write_token_file(link, TOKEN, force=False)
    write_token_file(link, TOKEN, force=True)
    assert victim.read_text() == "keep me\n"
    assert not link.is_symlink()
    assert link.read_text() == TOKEN + "\n"


def test_a_missing_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(TokenFileError, match=r"the folder .*nowhere does not exist"):
        check_token_target(tmp_path / "nowhere" / "gw.token", force=False)
    assert not (tmp_path / "nowhere").exists()


def test_a_directory_is_not_a_token_file(tmp_path: Path) -> None:
    with pytest.raises(TokenFileError, match="is a directory"):
        check_token_target(tmp_path, force=True)
