"""The ARM lane: Outpost's agent tests, quickstart and .deb on emulated arm64 and armhf Debian 12.

Run by scripts/test-arm (and so by scripts/test and CI). Steps run in the
order that fails fastest, each printing how long it took; the first failure
stops the lane. Where this machine cannot run foreign binaries, the lane says
so in one sentence and counts every step as skipped, never as passed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import rootfs  # noqa: E402
from boot_harness import DEBS_IN_CONTAINER, HarnessError, install_debs  # noqa: E402

REPO = rootfs.REPO
RUN_PARENT = Path("/var/tmp")
# The whole lane's share of CI's hour (the rest of scripts/test takes about 32 minutes with two workers).
BUDGET_SECONDS = 30 * 60
# The agent's quick suite takes about 10 minutes under emulation on a slow
# 2-core machine, each architecture's beside the other's; a hung test must
# not eat the rest of CI's 90 minutes.
SUITE_TIMEOUT_SECONDS = 25 * 60
# A side-by-side suite's output is kept in its log; the lane prints its tail:
# enough lines for pytest's slowest-10 list and summary when it passed, and
# enough characters for the failures and their tracebacks when it did not.
TAIL_LINES = 30
TAIL_ON_FAILURE_CHARS = 30_000
# quickstart --once takes 5 to 15 s emulated; the traps a few seconds.
QUICKSTART_TIMEOUT_SECONDS = 300
# Starting outpost-agent and outpostctl once each under emulation.
DEB_CHECK_TIMEOUT_SECONDS = 300
# Two boots of about 20 s each, plus the harness's own bounds (240 s per boot).
BOOT_TIMEOUT_SECONDS = 15 * 60
# dpkg-buildpackage of two pure-Python packages takes seconds.
BUILD_DEBS_TIMEOUT_SECONDS = 300
CHECKOUT_IN_ROOTFS = "/root/outpost"
# A run directory without a live owner's pid is stale once older than this.
STARTING_GRACE_SECONDS = 60
# A dependency no archive has: the lane checks that such a .deb fails naming it.
MISSING_PROBE_PACKAGE = "python3-outpost-no-such-dependency"
# Every pytest inside: Debian's python3 with bytecode in the throwaway overlay.
PYTEST = "python3 -m pytest -p no:cacheprovider -q -ra --durations=10"
# The TPM stress test is a speed test (3,000 signatures within 180 s): the
# emulated swtpm and Python manage about 16 a second, so it would take the
# whole 180 s and fail. Every functional TPM test runs; this one runs on x86.
SPEED_TESTS = ("tests/agent/identity/test_tpm_stress.py::"
               "test_thousands_of_signatures_without_a_resource_manager_all_verify_and_leak_nothing",)
# The agent runs the shared package (protocol core, tunnel glue, fsutil), so its tests run too.
_QUICK_SUITE = 'tests/agent tests/shared -m "not slow" ' + " ".join(f"--deselect {t}" for t in SPEED_TESTS)
# The agent's quick suite per architecture. armhf runs it whole too unless a
# subset is named here (with the reason in the README's architecture table).
SUITE_ARGS = {"arm64": _QUICK_SUITE, "armhf": _QUICK_SUITE}
# Skips that emulation explains: ptrace does not work under qemu-user, so the
# root filesystem has no strace. Any other skip in the quick suite fails the step.
EXPECTED_SKIPS = ("strace is not installed",)
# The 32-bit traps (and their 64-bit control) on every architecture.
TRAPS_ARGS = "tests/arm/test_wordsize_traps.py"


class StepFailed(Exception):
    """A step's check failed; the message says what and where."""


@dataclass
class Lane:
    run_dir: Path
    arches: list[rootfs.Arch]
    layers: dict[str, rootfs.Layers] = field(default_factory=dict)
    work: dict[str, Path] = field(default_factory=dict)  # a mounted test overlay per arch
    installed: dict[str, Path] = field(default_factory=dict)  # upper dir with the .debs installed
    debs: list[Path] = field(default_factory=list)
    prebuilds: dict[str, Beside] = field(default_factory=dict)  # an architecture's layers, built beside the steps
    installs: dict[str, Beside] = field(default_factory=dict)  # apt installing the .debs, one thread per arch
    suites: dict[str, Beside] = field(default_factory=dict)  # the agent's quick suite, one thread per arch
    stack: ExitStack = field(default_factory=ExitStack)


def say(text: str) -> None:
    print(f"arm-lane: {text}", flush=True)


class Beside(threading.Thread):
    """Runs ``work`` on a thread of its own while the lane's steps go on; ``result`` waits for it.

    Emulated package installs use one core each; the machine has two.
    """

    def __init__(self, name: str, work: Callable[[], object]) -> None:
        super().__init__(name=name, daemon=True)
        self.work = work
        self.value: object = None
        self.error: BaseException | None = None
        self.seconds = 0.0

    def run(self) -> None:
        begun = time.monotonic()
        try:
            self.value = self.work()
        except BaseException as error:  # handed to the step that waits for it
            self.error = error
        self.seconds = time.monotonic() - begun

    def result(self) -> object:
        self.join()
        if self.error is not None:
            raise self.error
        return self.value


def side_by_side(lane: Lane, running: dict[str, Beside], arch: rootfs.Arch, *, ready: Mapping[str, object],
                 work: Callable[[Lane, rootfs.Arch], str]) -> str:
    """Starts ``work`` on a thread for every architecture in ``ready`` not yet in ``running``, waits
    for all, and returns ``arch``'s result: another's error is raised at that architecture's own step."""
    for other in lane.arches:
        if other.debian in ready and other.debian not in running:
            running[other.debian] = Beside(f"{work.__name__}-{other.debian}", lambda a=other: work(lane, a))
            running[other.debian].start()
    for thread in running.values():
        thread.join()
    return str(running[arch.debian].result())


def step_rootfs(lane: Lane, arch: rootfs.Arch) -> str:
    prebuild = lane.prebuilds.get(arch.debian)
    layers = prebuild.result() if prebuild else rootfs.ensure_layers(arch, log=say)
    assert isinstance(layers, rootfs.Layers)
    lane.layers[arch.debian] = layers
    work = lane.stack.enter_context(rootfs.overlay(layers.test_lowers, lane.run_dir / f"{arch.debian}-work"))
    rootfs.copy_checkout(work / CHECKOUT_IN_ROOTFS.lstrip("/"))
    lane.work[arch.debian] = work
    found = rootfs.nspawn(work, "uname -m; python3 -c 'import struct, sys; "
                                "print(struct.calcsize(\"P\") * 8, sys.version.split()[0])'",
                          timeout=rootfs.QUICK_TIMEOUT_SECONDS).stdout.split()
    if found[:2] != [arch.machine, str(arch.bits)]:
        raise StepFailed(f"the {arch.debian} root filesystem runs {found}, not {arch.machine} with "
                         f"{arch.bits}-bit pointers: emulation is not what it claims")
    built = f"layers ready after {prebuild.seconds:.0f} s, built beside the steps before" if prebuild else "layers ready"
    return f"{found[0]}, {found[1]}-bit Python {found[2]}; {built} (cache {layers.base.parent})"


def step_build_debs(lane: Lane) -> str:
    out = lane.run_dir / "debs"
    result = subprocess.run([str(REPO / "packaging/build-debs"), "--no-lintian", "--out", str(out)],
                            capture_output=True, text=True, timeout=BUILD_DEBS_TIMEOUT_SECONDS)
    if result.returncode != 0:
        raise StepFailed(f"packaging/build-debs failed:\n{result.stderr[-3000:]}")
    lane.debs = sorted(out.glob("outpost-*.deb"))
    return ", ".join(d.name for d in lane.debs)


def install_or_name_missing(target: Path, debs: list[Path], arch_name: str) -> str:
    """apt installs the .debs; a dependency that does not resolve fails naming the package."""
    try:
        return install_debs(target, debs)
    except HarnessError as error:
        missing = rootfs.unresolved_dependencies(str(error))
        if missing:
            raise StepFailed(f"the .deb's dependencies do not resolve on {arch_name}: "
                             f"{', '.join(missing)} (apt says not installable)") from None
        raise StepFailed(f"apt could not install the .debs on {arch_name}:\n{str(error)[-3000:]}") from None


def step_deb_install(lane: Lane, arch: rootfs.Arch) -> str:
    """Starts apt for every architecture whose root filesystem is ready (about 4 minutes each under
    emulation, no timing in it) and waits for all, so no timed step runs beside an install; this
    architecture's result (an error of another's is raised at its own step)."""
    return side_by_side(lane, lane.installs, arch, ready=lane.layers, work=deb_install)


def deb_install(lane: Lane, arch: rootfs.Arch) -> str:
    # The guard first, on the real apt of this architecture: a .deb depending on
    # a package the archive lacks must fail this step naming that package.
    with rootfs.overlay([lane.layers[arch.debian].base_rootfs], lane.run_dir / f"{arch.debian}-guard") as merged:
        probe_folder = lane.run_dir / f"{arch.debian}-probe"
        probe_folder.mkdir()
        probe = rootfs.probe_deb(probe_folder, f"python3, {MISSING_PROBE_PACKAGE}")
        try:
            install_or_name_missing(merged, [probe], arch.debian)
        except StepFailed as refused:
            if MISSING_PROBE_PACKAGE not in str(refused):
                raise StepFailed(f"an unresolvable dependency was not named: {refused}") from None
        else:
            raise StepFailed(f"apt on {arch.debian} installed a .deb depending on {MISSING_PROBE_PACKAGE}")
    holder = lane.run_dir / f"{arch.debian}-installed"
    with rootfs.overlay([lane.layers[arch.debian].base_rootfs], holder) as merged:
        log = install_or_name_missing(merged, lane.debs, arch.debian)
        (holder / "apt-install.log").write_text(log)
        shutil.rmtree(merged / DEBS_IN_CONTAINER.lstrip("/"))
        checks = rootfs.nspawn(merged, """
            dpkg-query -W -f='${Package} ${Architecture} ${Status}\\n' outpost-agent python3-cryptography python3-aiohttp
            outpost-agent --version 2>/dev/null || outpost-agent --help >/dev/null && echo agent-runs
            outpostctl --help >/dev/null && echo outpostctl-runs
            ls /usr/lib/outpost-agent/agent/__pycache__ | grep -c cpython-311
        """, timeout=DEB_CHECK_TIMEOUT_SECONDS).stdout
    lines = checks.splitlines()
    for expected in ("outpost-agent all install ok installed",
                     f"python3-cryptography {arch.debian} install ok installed",
                     f"python3-aiohttp {arch.debian} install ok installed", "agent-runs", "outpostctl-runs"):
        if expected not in lines:
            raise StepFailed(f"after apt install on {arch.debian}, missing {expected!r} in:\n{checks}")
    if not lines[-1].isdigit() or int(lines[-1]) == 0:
        raise StepFailed(f"py3compile did not byte-compile the agent on {arch.debian}:\n{checks}")
    lane.installed[arch.debian] = holder / "upper"
    pulled = sum(1 for line in log.splitlines() if line.startswith("Setting up "))
    return (f"a .deb depending on {MISSING_PROBE_PACKAGE} failed naming it; apt set up {pulled} packages "
            f"({arch.debian} builds of python3-cryptography, -aiohttp, ...)")


def step_quickstart(lane: Lane, arch: rootfs.Arch) -> str:
    out = rootfs.nspawn(lane.work[arch.debian], f"cd {CHECKOUT_IN_ROOTFS} && python3 -c "
                        "'import sys; from outpostctl.cli import main; sys.exit(main([\"quickstart\", \"--once\"]))'",
                        timeout=QUICKSTART_TIMEOUT_SECONDS).stdout
    if "quickstart ok" not in out:
        raise StepFailed(f"quickstart on {arch.debian} did not print 'quickstart ok':\n{out[-3000:]}")
    last = [line.strip() for line in out.splitlines() if line.strip()][-1]
    return last


def pytest_inside(lane: Lane, arch: rootfs.Arch, args: str, timeout: float, *, stream: bool = True) -> str:
    """pytest on Debian's arm python3-* packages; its output streamed to this lane's output, or
    (``stream=False``, for suites run side by side) kept in the log and its tail printed at the end."""
    log = lane.run_dir / f"{arch.debian}-pytest.log"
    work = lane.work[arch.debian]
    keep = "| tee /root/pytest.log" if stream else "> /root/pytest.log"
    (work / "root/run-pytest").write_text(
        f"set -o pipefail\ncd {CHECKOUT_IN_ROOTFS}\n{PYTEST} {args} 2>&1 {keep}\n")
    failed = False
    try:
        rootfs.nspawn(work, "exec bash /root/run-pytest", timeout=timeout, capture=not stream,
                      env=["PYTHONPATH=" + CHECKOUT_IN_ROOTFS])
    except HarnessError as error:
        failed = True
        if not stream:
            sys.stdout.write(f"arm-lane: [{arch.debian}] {str(error)[-2000:]}\n")
    finally:
        saved = lane.work[arch.debian] / "root/pytest.log"
        if saved.exists():
            shutil.copy(saved, log)
    text = log.read_text() if log.exists() else ""
    if not stream:
        # The failures section when it failed; the slowest tests and the summary when it passed.
        tail = text[-TAIL_ON_FAILURE_CHARS:] if failed else "\n".join(text.splitlines()[-TAIL_LINES:])
        sys.stdout.write(f"arm-lane: [{arch.debian}] pytest output (whole in {log.name}):\n{tail}\n")
        sys.stdout.flush()
    if failed:
        raise StepFailed(f"pytest {args} failed on {arch.debian} (output above)")
    summary = [line for line in text.splitlines() if " passed" in line or " failed" in line]
    return summary[-1].strip("= ") if summary else "(no summary)"


def step_traps(lane: Lane, arch: rootfs.Arch) -> str:
    return pytest_inside(lane, arch, TRAPS_ARGS, QUICKSTART_TIMEOUT_SECONDS)


def step_suite(lane: Lane, arch: rootfs.Arch) -> str:
    """Starts every architecture's quick suite side by side (each is one emulated Python on one core,
    and the machine has two) and waits for all; this architecture's result (an error of another's is
    raised at its own step)."""
    return side_by_side(lane, lane.suites, arch, ready=lane.work, work=suite)


def suite(lane: Lane, arch: rootfs.Arch) -> str:
    summary = pytest_inside(lane, arch, SUITE_ARGS[arch.debian], SUITE_TIMEOUT_SECONDS, stream=False)
    unexpected = unexpected_skips((lane.run_dir / f"{arch.debian}-pytest.log").read_text())
    if unexpected:
        raise StepFailed(f"tests skipped on {arch.debian} that must run there (the TPM tests need swtpm):\n"
                         + "\n".join(unexpected))
    return summary


def unexpected_skips(pytest_output: str) -> list[str]:
    """pytest's -ra skip lines other than the ones emulation explains (EXPECTED_SKIPS)."""
    return [line for line in pytest_output.splitlines()
            if line.startswith("SKIPPED") and not any(reason in line for reason in EXPECTED_SKIPS)]


def step_boot(lane: Lane, arch: rootfs.Arch) -> str:
    """The packaged end-to-end boot test (tests/arm/test_arm_boot.py) on the host, against this arch's tree."""
    env = dict(os.environ, OUTPOST_ARM_INSTALLED=str(lane.installed[arch.debian]),
               OUTPOST_ARM_BASE=str(lane.layers[arch.debian].base_rootfs), OUTPOST_ARM_ARCH=arch.debian, OUTPOST_ARM_SCRATCH=str(lane.run_dir))
    python = REPO / ".venv/bin/python"
    result = subprocess.run([str(python if python.exists() else sys.executable), "-m", "pytest", "-p",
                             "no:cacheprovider", "-q", "-ra", "tests/arm/test_arm_boot.py"],
                            cwd=REPO, env=env, timeout=BOOT_TIMEOUT_SECONDS, capture_output=True, text=True)
    sys.stdout.write(result.stdout[-6000:])
    if result.returncode != 0 or " passed" not in result.stdout or "skipped" in result.stdout.splitlines()[-1]:
        raise StepFailed(f"the {arch.debian} boot test did not pass:\n{result.stderr[-2000:]}")
    return result.stdout.strip().splitlines()[-1].strip("= ")


@dataclass
class Step:
    name: str
    run: Callable[[], str]
    arch: str = ""


def plan(lane: Lane) -> list[Step]:
    """Cheap, decisive checks first (the .deb resolves, the quickstart), the long suites last."""
    by = {a.debian: a for a in lane.arches}
    steps: list[Step] = [Step("build the .debs (host)", lambda: step_build_debs(lane))]
    names = [name for name in ("arm64", "armhf") if name in by]
    # Every root filesystem first, so the apt installs (the first of them starts all) run side by side.
    steps += [Step("root filesystem", lambda a=by[name]: step_rootfs(lane, a), name) for name in names]
    for name in names:
        a = by[name]
        steps += [
            Step("apt install the .debs", lambda a=a: step_deb_install(lane, a), name),
            Step("quickstart --once", lambda a=a: step_quickstart(lane, a), name),
            Step("word-size traps", lambda a=a: step_traps(lane, a), name),
        ]
    for name in ("arm64", "armhf"):
        if name in by:
            steps.append(Step("boot the .deb, enroll, dial in", lambda a=by[name]: step_boot(lane, a), name))
    for name in ("arm64", "armhf"):
        if name in by:
            steps.append(Step('agent quick suite (tests/agent tests/shared -m "not slow", less the speed tests)',
                              lambda a=by[name]: step_suite(lane, a), name))
    return steps


@contextmanager
def run_directory() -> Iterator[Path]:
    RUN_PARENT.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix="outpost-arm-run.", dir=RUN_PARENT))
    try:
        yield path
    finally:
        rootfs.remove_tree(path)


def clean_stale_runs(parent: Path = RUN_PARENT) -> None:
    """Run directories of killed lanes (their pid is gone): unmount what they left mounted, and remove."""
    for old in parent.glob("outpost-arm-run.*"):
        try:
            os.kill(int((old / "pid").read_text()), 0)
            continue
        except (OSError, ValueError):
            pass
        try:
            if time.time() - old.stat().st_mtime < STARTING_GRACE_SECONDS:
                continue  # a lane that has not written its pid yet
        except FileNotFoundError:
            continue
        rootfs.remove_tree(old)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/test-arm", description=__doc__)
    parser.add_argument("--arch", action="append", choices=sorted(rootfs.ARCHES),
                        help="only this architecture (repeatable; default: arm64 and armhf)")
    args = parser.parse_args(argv)
    arches = [rootfs.ARCHES[a] for a in (args.arch or ["arm64", "armhf"])]
    started = time.monotonic()
    try:
        for arch in arches:
            rootfs.preflight(arch)
    except rootfs.LaneSkip as skip:
        say(f"SKIPPED, nothing was tested on ARM: {skip}")
        if os.environ.get("OUTPOST_ARM_REQUIRED") == "1":
            say("OUTPOST_ARM_REQUIRED=1, so a skipped lane fails")
            print(f"arm-lane: 0 passed, {len(arches)} failed", flush=True)
            return 1
        print(f"arm-lane: 0 passed, 0 failed, {len(arches)} skipped", flush=True)
        return 0
    clean_stale_runs()
    passed = failed = 0
    with run_directory() as run_dir:
        (run_dir / "pid").write_text(str(os.getpid()))
        lane = Lane(run_dir, arches)
        for arch in arches[1:]:
            lane.prebuilds[arch.debian] = Beside(f"prebuild-{arch.debian}",
                                                 lambda a=arch: rootfs.ensure_layers(a, log=say))
            lane.prebuilds[arch.debian].start()
        with lane.stack:
            steps = plan(lane)
            for index, step in enumerate(steps):
                label = f"[{step.arch}] {step.name}" if step.arch else step.name
                say(f"{label} ...")
                begun = time.monotonic()
                try:
                    note = step.run()
                except (StepFailed, HarnessError, subprocess.TimeoutExpired) as error:
                    failed += 1
                    say(f"{label}: FAILED after {time.monotonic() - begun:.0f} s: {error}")
                    for rest in steps[index + 1:]:
                        say(f"not run: [{rest.arch}] {rest.name}")
                    break
                passed += 1
                say(f"{label}: ok in {time.monotonic() - begun:.0f} s: {note}")
            for name, prebuild in lane.prebuilds.items():
                if prebuild.is_alive():
                    # Its debootstrap and apt must not outlive the lane; the cache keeps what it builds.
                    say(f"waiting for the {name} root filesystem build to finish before leaving")
                    prebuild.join()
            for running in [*lane.installs.values(), *lane.suites.values()]:
                running.join()  # its overlay mounts are in the run directory, removed below
    total = time.monotonic() - started
    over = " (over the lane's budget)" if total > BUDGET_SECONDS else ""
    say(f"whole lane {total:.0f} s of a {BUDGET_SECONDS} s budget{over}")
    print(f"arm-lane: {passed} passed, {failed} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
