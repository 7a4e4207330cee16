"""Atomic writes: a reader sees the old file or the new one, with the mode asked for;
the new file and every new directory reach the disk before the next step."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from shared.fsutil import UNFINISHED_WRITE_AGE, atomic_write, discard_unfinished_writes, ensure_private_dir
from tests.e2e.harness import python_env
from tests.syscall_trace import durability_faults, renamed_into, traced_run


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


def test_a_private_directory_over_a_file_is_refused(tmp_path: Path):
    (tmp_path / "state").write_bytes(b"a file")

    with pytest.raises(OSError):
        ensure_private_dir(tmp_path / "state")

    assert (tmp_path / "state").read_bytes() == b"a file"


def _traced_python(code: str, tmp_path: Path):
    """Run ``code`` in a new interpreter under strace; its calls (real syscalls, no interposition)."""
    result, calls = traced_run([sys.executable, "-c", code], env=python_env(), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    return calls


def test_a_write_flushes_the_new_file_before_the_rename_and_the_directory_after(tmp_path: Path):
    state = tmp_path / "state"
    state.mkdir()
    calls = _traced_python(
        f"from shared.fsutil import atomic_write\n"
        f"atomic_write({str(state / 'cert.pem')!r}, b'old')\n"
        f"atomic_write({str(state / 'cert.pem')!r}, b'new')\n",
        tmp_path,
    )

    assert renamed_into(calls, state) == ["cert.pem", "cert.pem"]
    assert durability_faults(calls, state) == []


def test_new_state_directories_are_flushed_into_their_parents(tmp_path: Path):
    state = tmp_path / "var" / "lib" / "outpost-agent"
    calls = _traced_python(
        f"from shared.fsutil import atomic_write, ensure_private_dir\n"
        f"atomic_write(ensure_private_dir({str(state)!r}) / 'key.pem', b'key')\n",
        tmp_path,
    )

    made = [call.paths[-1] for call in calls if call.name in ("mkdir", "mkdirat")]
    assert made == [str(tmp_path / "var"), str(tmp_path / "var" / "lib"), str(state)]
    assert durability_faults(calls, tmp_path) == []
    assert os.stat(state).st_mode & 0o777 == 0o700


def test_the_durability_check_sees_a_rename_without_flushes(tmp_path: Path):
    # The check itself must be able to fail: a plain write-and-rename is caught.
    calls = _traced_python(
        "import os\n"
        "open('.cert.pem.tmp', 'wb').write(b'new')\n"
        "os.makedirs('fresh')\n"
        "os.replace('.cert.pem.tmp', 'fresh/cert.pem')\n",
        tmp_path,
    )

    faults = durability_faults(calls, tmp_path)
    assert any("without flushing it first" in fault for fault in faults)
    assert any("not followed by a flush of its directory" in fault for fault in faults)
    assert any("not flushed into its parent" in fault for fault in faults)


def test_leftovers_of_cut_short_writes_are_discarded_once_they_are_old(tmp_path: Path):
    atomic_write(tmp_path / "key.pem", b"key")
    old = tmp_path / ".key.pem.0123456789ab.tmp"
    young = tmp_path / ".cert.pem.ba9876543210.tmp"
    unrelated = tmp_path / ".notes.tmp"
    for leftover in (old, young, unrelated):
        leftover.write_bytes(b"half")
    long_ago = time.time() - UNFINISHED_WRITE_AGE - 1
    os.utime(old, (long_ago, long_ago))
    os.utime(unrelated, (long_ago, long_ago))

    assert discard_unfinished_writes(tmp_path) == [old.name]

    # A young one may be another process's write in progress; other files are not ours.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([young.name, unrelated.name, "key.pem"])
    assert (tmp_path / "key.pem").read_bytes() == b"key"
    assert discard_unfinished_writes(tmp_path / "absent") == []
