"""A controller killed during its very first start leaves no CA key behind once it starts again.

The first start builds the data directory in a hidden staging directory
beside it and renames it into place. A SIGKILL before the rename leaves the
staging directory, private (0700, keys 0600) but holding a CA key and the
admin credential; the next start removes it. A staging directory another
start is still building is never touched: that start holds the lock, and the
next one waits for it and then uses what it built.

The kills come from inside the process at the chosen moment (``STOP_AT``),
where a signal from outside could only land by luck, and from outside at
random moments of real first starts.
"""

from __future__ import annotations

import os
import random
import re
import signal
import stat
import sys
import time
from pathlib import Path

import pytest

from controller.bootstrap import staging_pattern
from tests.e2e.crash_harness import crash_seed, run_and_kill
from tests.e2e.harness import START_TIMEOUT, Controller, Process, controller_argv

#: ``python -c STOP_AT POINT SIGNAL serve ARGS...``: `outpost-controller serve`, sending itself SIGNAL
#: during the first start, at POINT: "store" (the CA key and the admin token's hash are written, the store is
#: not) or "rename" (the staging directory is complete and about to be renamed into place). The hooks
#: only pick the moment; everything else is the real controller.
STOP_AT = r"""
import os, sys
import controller.bootstrap as bootstrap
from controller.cli import main

point, signum = sys.argv[1], int(sys.argv[2])


class OsStoppingAtRename:
    def __getattr__(self, name):
        return getattr(os, name)

    def rename(self, source, target):
        os.kill(os.getpid(), signum)
        os.rename(source, target)


def store_stopping_first(path, real_store=bootstrap.Store):
    os.kill(os.getpid(), signum)
    return real_store(path)


if point == "rename":
    bootstrap.os = OsStoppingAtRename()
else:
    bootstrap.Store = store_stopping_first
sys.exit(main(sys.argv[3:]))
"""
#: Kills of real first starts at random moments in the quick suite.
RANDOM_KILLS = 5
#: Files of a data directory that anyone may read: certificates, nothing secret.
PUBLIC_FILES = {"ca.pem", "server.pem"}


def stopping_start(data: Path, point: str, signum: int) -> Process:
    return Process([sys.executable, "-c", STOP_AT, point, str(int(signum)), *controller_argv(data)[3:]])


def staging_dirs(data: Path) -> list[Path]:
    pattern = staging_pattern(data)
    return sorted(path for path in data.parent.iterdir() if pattern.fullmatch(path.name))


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def written_name(name: str) -> str:
    """The file a name stands for: a write cut short leaves ``.NAME.<12 hex>.tmp``,
    which carries its target's mode (a certificate's temporary is as public as the certificate)."""
    cut_short = re.fullmatch(r"\.(.+)\.[0-9a-f]{12}\.tmp", name)
    return cut_short.group(1) if cut_short else name


def assert_private(directory: Path) -> None:
    """Every directory 0700, every file 0600 but the certificates (under 0700 directories anyway)."""
    assert mode(directory) == 0o700, oct(mode(directory))
    for path in directory.rglob("*"):
        if path.is_dir():
            assert mode(path) == 0o700, (path, oct(mode(path)))
        elif written_name(path.name) not in PUBLIC_FILES:
            assert mode(path) == 0o600, (path, oct(mode(path)))


def secrets_in(directory: Path) -> dict[str, bytes]:
    """The private files of a staging directory, by name."""
    return {path.name: path.read_bytes() for path in directory.rglob("*")
            if path.is_file() and path.name in ("ca.key", "admin.hash", "server.key")}


def files_holding(root: Path, secret: bytes) -> list[Path]:
    return [path for path in root.rglob("*") if path.is_file() and secret in path.read_bytes()]


def process_state(pid: int) -> str:
    """The one-letter state of /proc/PID/stat ("T" for stopped)."""
    stat_line = Path(f"/proc/{pid}/stat").read_text()
    return stat_line.rsplit(")", 1)[1].split()[0]


def ca_fingerprint_in(ready_line: str) -> str:
    return ready_line.split("(CA ", 1)[1].split(";")[0]


def start_and_check_nothing_is_left(data: Path, left: dict[str, bytes]) -> None:
    """A start is ready, no staging directory is left, and none of ``left``'s secrets is on disk."""
    controller = Controller(data)
    try:
        assert staging_dirs(data) == []
        assert "left by a first start that was interrupted" in controller.process.output or not left
    finally:
        controller.process.stop()
    for name, secret in left.items():
        assert files_holding(data.parent, secret) == [], f"the interrupted start's {name} is still on disk"


@pytest.mark.parametrize("point", ["store", "rename"])
def test_a_first_start_killed_before_its_rename_leaves_a_private_staging_directory_the_next_start_removes(
        tmp_path: Path, point: str) -> None:
    data = tmp_path / "data"
    killed = stopping_start(data, point, signal.SIGKILL)
    killed.proc.wait(START_TIMEOUT)
    killed.stop()
    assert killed.proc.returncode == -signal.SIGKILL, killed.output
    assert not data.exists()
    [left] = staging_dirs(data)
    assert_private(left)
    secrets_left = secrets_in(left)
    assert {"ca.key", "admin.hash"} <= set(secrets_left)

    start_and_check_nothing_is_left(data, secrets_left)
    assert (data / "ca" / "ca.key").read_bytes() != secrets_left["ca.key"]


def test_a_staging_directory_another_start_is_building_is_left_alone_and_then_used(tmp_path: Path) -> None:
    data = tmp_path / "data"
    builder = stopping_start(data, "rename", signal.SIGSTOP)
    waiter: Process | None = None
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while process_state(builder.proc.pid) != "T":
            assert time.monotonic() < deadline and builder.proc.poll() is None, builder.output
            time.sleep(0.02)
        [building] = staging_dirs(data)
        waiter = Process(controller_argv(data))
        waiter.wait_for_line("waiting for another process creating a data directory")
        assert staging_dirs(data) == [building] and not data.exists()

        os.kill(builder.proc.pid, signal.SIGCONT)
        built = builder.wait_for_line("ready on https://")
        used = waiter.wait_for_line("ready on https://")
        assert ca_fingerprint_in(used) == ca_fingerprint_in(built), "the waiting start made a CA of its own"
        assert staging_dirs(data) == []
        assert "left by a first start" not in waiter.output
    finally:
        if builder.proc.poll() is None:
            os.kill(builder.proc.pid, signal.SIGCONT)
        builder.stop()
        if waiter is not None:
            waiter.stop()


def test_first_starts_killed_at_random_moments_leave_no_staging_directory_after_the_next_start(
        tmp_path: Path) -> None:
    rng = random.Random(crash_seed())
    started = time.monotonic()
    Controller(tmp_path / "measured").process.stop()
    first_start = time.monotonic() - started
    caught = 0
    for kill in range(RANDOM_KILLS):
        data = tmp_path / f"data-{kill}"
        outcome = run_and_kill(controller_argv(data), rng.uniform(0.0, first_start))
        assert outcome.killed or outcome.returncode == 0, outcome
        left = {}
        for staging in staging_dirs(data):
            assert_private(staging)
            left.update({f"{staging.name}/{name}": secret for name, secret in secrets_in(staging).items()})
        caught += bool(left)
        start_and_check_nothing_is_left(data, left)
    print(f"random first-start kills: {RANDOM_KILLS}, leaving a staging directory with secrets: {caught}; "
          f"first start {first_start:.2f} s")
