"""The ARM lane's own guards: it skips with the reason where foreign binaries cannot run, never passes
falsely, rebuilds what a killed run left half-built, and names a dependency that does not resolve.

Quick: these exercise the guards without building a root filesystem.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import rootfs

REPO = Path(__file__).resolve().parents[2]
LANE_TIMEOUT_SECONDS = 60
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounts and the lane's checks need root")


def _lane(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(REPO / "scripts/test-arm"), *args], capture_output=True, text=True,
                          env=env, timeout=LANE_TIMEOUT_SECONDS, cwd=REPO)


@needs_root
def test_missing_qemu_skips_the_lane_with_one_sentence_and_counts_nothing_as_passed(tmp_path: Path) -> None:
    # A PATH with the lane's tools but no qemu: debootstrap and update-binfmts
    # are in /usr/sbin, the shell comes from a folder of its own.
    shell = tmp_path / "bin"
    shell.mkdir()
    for tool in ("bash", "dirname"):
        (shell / tool).symlink_to(shutil.which(tool) or f"/usr/bin/{tool}")
    env = dict(os.environ, PATH=f"/usr/sbin:/sbin:{shell}", OUTPOST_ARM_CACHE=str(tmp_path / "cache"))
    result = _lane(env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines == [
        "arm-lane: SKIPPED, nothing was tested on ARM: arm64: qemu is missing (qemu-aarch64-static is not on "
        "PATH); install qemu-user-static and binfmt-support (scripts/setup does as root)",
        "arm-lane: 0 passed, 0 failed, 2 skipped",
    ], result.stdout
    assert not (tmp_path / "cache").exists(), "a skipped lane must not start building"

    required = _lane(dict(env, OUTPOST_ARM_REQUIRED="1"), "--arch", "armhf")
    assert required.returncode == 1
    assert "qemu-arm-static is not on PATH" in required.stdout
    assert required.stdout.splitlines()[-1] == "arm-lane: 0 passed, 1 failed"


@needs_root
def test_binfmt_misc_that_cannot_be_mounted_is_a_skip_with_the_reason(tmp_path: Path) -> None:
    arch = rootfs.ARCHES["arm64"]
    if shutil.which(arch.qemu) is None or shutil.which("update-binfmts") is None:
        pytest.skip("qemu-user-static and binfmt-support are not installed; scripts/setup installs them")
    nowhere = tmp_path / "no-such-directory"
    with pytest.raises(rootfs.LaneSkip) as skipped:
        rootfs.preflight(arch, binfmt_dir=nowhere)
    message = str(skipped.value)
    assert message.startswith(f"arm64: binfmt_misc cannot be mounted at {nowhere} (")
    assert message.endswith("so this machine cannot run foreign binaries")
    assert "\n" not in message


def test_a_non_root_user_is_told_the_lane_needs_root(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        # Drop to nobody for this one check.
        if shutil.which("runuser") is None:
            pytest.skip("runuser is not installed")
        readable = subprocess.run(["runuser", "-u", "nobody", "--", "test", "-r", str(REPO / "tests/arm/lane.py")],
                                  timeout=LANE_TIMEOUT_SECONDS)
        if readable.returncode != 0:
            pytest.skip(f"user nobody cannot read {REPO}, so cannot play the non-root user here")
        result = subprocess.run(["runuser", "-u", "nobody", "--", sys.executable, str(REPO / "tests/arm/lane.py")],
                                capture_output=True, text=True, timeout=LANE_TIMEOUT_SECONDS, cwd="/")
    else:
        result = subprocess.run([sys.executable, str(REPO / "tests/arm/lane.py")], capture_output=True, text=True,
                                timeout=LANE_TIMEOUT_SECONDS)
    assert result.returncode == 0, result.stderr
    assert "arm64: the ARM lane needs root" in result.stdout
    assert result.stdout.splitlines()[-1] == "arm-lane: 0 passed, 0 failed, 2 skipped"


def _good_build(scratch: Path) -> None:
    (scratch / "rootfs").mkdir()
    (scratch / "rootfs" / "complete").write_text("yes\n")


@needs_root
def test_a_build_killed_halfway_is_detected_and_built_again(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    # A real lane process killed by SIGKILL in the middle of its build, with a
    # file system still mounted inside (debootstrap's second stage mounts /proc).
    killed = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import os, signal, subprocess, sys
        from pathlib import Path
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import rootfs
        def build(scratch):
            (scratch / "rootfs/proc").mkdir(parents=True)
            (scratch / "rootfs/half-written").write_text("interrupted")
            subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(scratch / "rootfs/proc")], check=True)
            os.kill(os.getpid(), signal.SIGKILL)
        rootfs.cached(Path({str(cache)!r}), "arm64-key", build)
    """)], capture_output=True, text=True, timeout=LANE_TIMEOUT_SECONDS)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    leftover = cache / "arm64-key.partial"
    assert (leftover / "rootfs/half-written").exists()
    assert not rootfs.is_complete(leftover, "arm64-key")

    said: list[str] = []
    tree = rootfs.cached(cache, "arm64-key", _good_build, said.append)
    assert tree == cache / "arm64-key" and rootfs.is_complete(tree, "arm64-key")
    assert (tree / "rootfs/complete").exists() and not (tree / "rootfs/half-written").exists()
    assert not leftover.exists()
    assert said == [f"{leftover} was left by an interrupted build; removing it"]
    with open("/proc/self/mounts") as mounts:
        assert str(cache) not in mounts.read(), "the killed build's mount was left behind"


def test_a_tree_without_its_marker_is_rebuilt_and_a_complete_one_reused(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    stale = cache / "armhf-key"
    (stale / "rootfs").mkdir(parents=True)
    (stale / "rootfs/from-a-killed-run").write_text("")
    said: list[str] = []
    tree = rootfs.cached(cache, "armhf-key", _good_build, said.append)
    assert not (tree / "rootfs/from-a-killed-run").exists() and (tree / "rootfs/complete").exists()
    assert said == [f"{stale} has no completion marker (a build was interrupted); removing it and building again"]

    def must_not_build(scratch: Path) -> None:
        raise AssertionError("a complete tree was built again")

    assert rootfs.cached(cache, "armhf-key", must_not_build) == tree
    # A marker naming another key (another package list) does not count.
    (tree / rootfs.MARKER).write_text("armhf-other-key\n")
    assert not rootfs.is_complete(tree, "armhf-key")


def test_a_failed_build_leaves_nothing_that_looks_usable(tmp_path: Path) -> None:
    cache = tmp_path / "cache"

    def failing(scratch: Path) -> None:
        (scratch / "rootfs").mkdir()
        raise rootfs.HarnessError("debootstrap failed (exit 1): the mirror is unreachable")

    with pytest.raises(rootfs.HarnessError, match="mirror is unreachable"):
        rootfs.cached(cache, "arm64-key", failing)
    assert sorted(p.name for p in cache.iterdir()) == ["arm64.lock"]


def test_cache_keys_change_with_the_package_lists_and_differ_per_architecture() -> None:
    arm64, armhf = rootfs.ARCHES["arm64"], rootfs.ARCHES["armhf"]
    assert rootfs.base_key(arm64) != rootfs.base_key(armhf)
    assert rootfs.test_layer_key(arm64).startswith(rootfs.base_key(arm64))
    assert rootfs.base_key(arm64).startswith("arm64-bookworm-")


def test_a_dependency_that_does_not_resolve_is_named(tmp_path: Path) -> None:
    if shutil.which("dpkg-deb") is None or shutil.which("apt-get") is None:
        pytest.skip("dpkg-deb and apt-get are needed (Debian)")
    deb = rootfs.probe_deb(tmp_path, "python3, python3-no-such-outpost-dependency (>= 1)")
    # apt's own answer, simulated (-s): nothing is installed.
    result = subprocess.run(["apt-get", "install", "-s", f"./{deb.name}"], capture_output=True, text=True,
                            cwd=tmp_path, timeout=LANE_TIMEOUT_SECONDS)
    assert result.returncode != 0
    assert rootfs.unresolved_dependencies(result.stdout + result.stderr) == ["python3-no-such-outpost-dependency"]



def test_a_skipped_tpm_test_fails_the_suite_step_while_the_strace_skips_are_expected() -> None:
    from lane import unexpected_skips

    output = ("SKIPPED [3] tests/syscall_trace.py:49: strace is not installed (Debian package: strace; "
              "scripts/setup installs it)\n"
              "SKIPPED [9] tests/agent/identity/swtpm_harness.py:81: swtpm is not installed (Debian package: swtpm)\n"
              "640 passed, 12 skipped in 500.00s\n")
    assert unexpected_skips(output) == [
        "SKIPPED [9] tests/agent/identity/swtpm_harness.py:81: swtpm is not installed (Debian package: swtpm)"]
    assert unexpected_skips(output.splitlines()[0]) == []


@needs_root
def test_a_killed_lanes_run_directory_is_unmounted_and_removed_and_a_live_ones_kept(tmp_path: Path) -> None:
    from lane import STARTING_GRACE_SECONDS, clean_stale_runs

    killed, live = tmp_path / "outpost-arm-run.killed", tmp_path / "outpost-arm-run.live"
    # Above pid_max (at most 2**22 on Linux): no process has it.
    for folder, pid in ((killed, 2**22 + 1), (live, os.getpid())):
        (folder / "armhf-work/merged").mkdir(parents=True)
        (folder / "pid").write_text(str(pid))
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(killed / "armhf-work/merged")], check=True, timeout=30)
    old = killed.stat().st_mtime - STARTING_GRACE_SECONDS - 1
    os.utime(killed, (old, old))
    clean_stale_runs(tmp_path)
    assert not killed.exists() and live.exists()
    with open("/proc/self/mounts") as mounts:
        assert str(killed) not in mounts.read()


def test_both_architectures_run_side_by_side_and_each_step_reports_only_its_own_failure(tmp_path: Path) -> None:
    from lane import Lane, StepFailed, side_by_side

    lane = Lane(tmp_path, [rootfs.ARCHES["arm64"], rootfs.ARCHES["armhf"]])
    armhf_started = threading.Event()

    def work(_: Lane, arch: rootfs.Arch) -> str:
        if arch.debian == "armhf":
            armhf_started.set()
            raise StepFailed("armhf broke")
        # Run one after the other, arm64 would wait here for armhf in vain.
        if not armhf_started.wait(LANE_TIMEOUT_SECONDS):
            raise AssertionError("armhf had not started while arm64 ran")
        return "arm64 fine"

    running: dict[str, object] = {}
    ready = {"arm64": True, "armhf": True}
    assert side_by_side(lane, running, rootfs.ARCHES["arm64"], ready=ready, work=work) == "arm64 fine"
    with pytest.raises(StepFailed, match="armhf broke"):
        side_by_side(lane, running, rootfs.ARCHES["armhf"], ready=ready, work=work)
    assert sorted(running) == ["arm64", "armhf"]  # started once each, not again at the second step
