"""Atomic writes: a reader sees the old file or the new one, with the mode asked for."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.fsutil import atomic_write, ensure_private_dir


def test_a_new_file_gets_its_content_and_exact_mode(tmp_path: Path):
    old_umask = os.umask(0o077)
    try:
        atomic_write(tmp_path / "cert.pem", b"public", mode=0o644)
    finally:
        os.umask(old_umask)
    atomic_write(tmp_path / "key.pem", b"secret")

    assert (tmp_path / "cert.pem").read_bytes() == b"public"
    assert os.stat(tmp_path / "cert.pem").st_mode & 0o777 == 0o644
    assert os.stat(tmp_path / "key.pem").st_mode & 0o777 == 0o600


def test_replacing_swaps_the_whole_file_and_leaves_no_temporary(tmp_path: Path):
    target = tmp_path / "identity.json"
    atomic_write(target, b"old" * 1000)

    atomic_write(target, b"new")

    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["identity.json"]


def test_a_failed_write_keeps_the_old_file_and_cleans_up(tmp_path: Path):
    target = tmp_path / "identity.json"
    atomic_write(target, b"old")
    (tmp_path / "identity.json.d").mkdir()

    with pytest.raises(TypeError):
        atomic_write(target, "not bytes")  # type: ignore[arg-type]
    with pytest.raises(OSError):
        atomic_write(tmp_path / "identity.json.d", b"a directory cannot be replaced by a file")

    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["identity.json", "identity.json.d"]


def test_a_symlink_is_replaced_not_written_through(tmp_path: Path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"untouched")
    (tmp_path / "status.json").symlink_to(victim)

    atomic_write(tmp_path / "status.json", b"{}")

    assert victim.read_bytes() == b"untouched"
    assert not (tmp_path / "status.json").is_symlink()


def test_a_private_directory_is_created_owner_only(tmp_path: Path):
    created = ensure_private_dir(tmp_path / "a" / "state")

    assert created.is_dir()
    assert os.stat(created).st_mode & 0o777 == 0o700
