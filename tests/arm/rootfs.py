"""Foreign-architecture Debian 12 root filesystems (arm64, armhf) run under qemu-user.

Two cached layers per architecture, each built once and validated by a marker
file written last, so a tree left by a killed build is never mistaken for a
finished one:

- the *base*: ``debootstrap --foreign --variant=minbase`` plus its second stage
  under qemu, what a booted container needs, and the .debs' dependencies
  downloaded (not installed), so ``apt install ./outpost-agent_*.deb`` still
  has to resolve them as on a gateway;
- the *test layer*: an overlayfs upper directory over the base with Debian's
  arm python3-* packages, pytest and swtpm installed.

Every run works in throwaway overlay mounts over these layers; the cached
trees themselves are never written after their marker.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "packaging"))

from boot_harness import (  # noqa: E402  (the packaging tests' harness lives beside, not in a package)
    PRELOADED_PACKAGES,
    ROOTFS_PACKAGES,
    SUITE,
    HarnessError,
    debian_mirror,
    overlay,
    unmount_below,
)

REPO = Path(__file__).resolve().parents[2]
CACHE_DIR = Path(os.environ.get("OUTPOST_ARM_CACHE", "/var/tmp/outpost-arm-rootfs"))
BINFMT_DIR = Path("/proc/sys/fs/binfmt_misc")
# Bump to throw away every cached tree (the package lists are in the key already).
LAYOUT_VERSION = "1"
MARKER = ".outpost-rootfs-complete"


@dataclass(frozen=True)
class Arch:
    """A Debian architecture and how the host runs its binaries."""

    debian: str
    binfmt: str  # the binfmt-support entry update-binfmts enables
    qemu: str  # the static emulator qemu-user-static installs
    machine: str  # what `uname -m` says inside, proof that emulation runs
    bits: int


ARCHES = {
    "arm64": Arch("arm64", "qemu-aarch64", "qemu-aarch64-static", "aarch64", 64),
    "armhf": Arch("armhf", "qemu-arm", "qemu-arm-static", "armv7l", 32),
}

# Debian's own arm builds of what the agent's quick suite and the quickstart
# import (the controller they start needs prometheus-client; the agent runs
# on uvloop where installed, as its .deb recommends), and the
# software TPM. strace is left out on purpose: ptrace does not work under
# qemu-user, and the tests that need it skip saying strace is missing.
TEST_PACKAGES = (
    "python3-aiohttp", "python3-cryptography", "python3-jwt", "python3-ntplib", "python3-systemd",
    "python3-prometheus-client", "python3-uvloop",
    "python3-tpm2-pytss", "python3-pytest", "python3-hypothesis", "swtpm", "swtpm-tools",
    "faketime", "procps", "iproute2", "adduser", "openssl",
)
# swtpm's seccomp filter cannot be loaded under qemu-user (seccomp_load fails
# with errno 125); the wrapper sits first on PATH so every test's `swtpm`
# is started with the filter off. Only the emulated test layer has it.
SWTPM_WRAPPER = """#!/bin/sh
# qemu-user cannot load swtpm's seccomp filter; turn it off for the emulated tests.
if [ "$1" = socket ] || [ "$1" = chardev ] || [ "$1" = cuse ]; then
    sub=$1; shift
    exec /usr/bin/swtpm "$sub" --seccomp action=none "$@"
fi
exec /usr/bin/swtpm "$@"
"""
# First stage takes seconds; the second stage unpacks and configures under
# emulation: about 3 minutes on an idle 2-core machine.
DEBOOTSTRAP_TIMEOUT_SECONDS = 1200
# Installing the test packages under emulation (py3compile of each).
APT_TIMEOUT_SECONDS = 1500
QUICK_TIMEOUT_SECONDS = 120
# What a minbase root filesystem lacks and loopback tests need.
ETC_HOSTS = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"


BuildFn = Callable[[Path], None]
LogFn = Callable[[str], None]


class LaneSkip(Exception):
    """This machine cannot run foreign binaries; the message is the one sentence saying why."""


def _which(tool: str) -> str | None:
    return shutil.which(tool, path=os.environ.get("PATH", os.defpath))


def preflight(arch: Arch, binfmt_dir: Path = BINFMT_DIR) -> None:
    """Makes sure foreign binaries of ``arch`` can run here, or raises LaneSkip with the reason."""
    if os.geteuid() != 0:
        raise LaneSkip(f"{arch.debian}: the ARM lane needs root (debootstrap, mounts, systemd-nspawn); run it as root")
    if _which(arch.qemu) is None:
        raise LaneSkip(f"{arch.debian}: qemu is missing ({arch.qemu} is not on PATH); "
                       "install qemu-user-static and binfmt-support (scripts/setup does as root)")
    for tool in ("debootstrap", "systemd-nspawn", "update-binfmts"):
        if _which(tool) is None:
            raise LaneSkip(f"{arch.debian}: {tool} is missing; run scripts/setup as root")
    if not (binfmt_dir / "register").exists():
        mounted = subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(binfmt_dir)],
                                 capture_output=True, text=True, timeout=QUICK_TIMEOUT_SECONDS)
        if mounted.returncode != 0 or not (binfmt_dir / "register").exists():
            why = (mounted.stderr.strip().splitlines() or ["no register file after mounting"])[-1]
            raise LaneSkip(f"{arch.debian}: binfmt_misc cannot be mounted at {binfmt_dir} ({why}), "
                           "so this machine cannot run foreign binaries")
    entry = binfmt_dir / arch.binfmt
    if not _enabled(entry):
        subprocess.run(["update-binfmts", "--enable", arch.binfmt], capture_output=True, text=True,
                       timeout=QUICK_TIMEOUT_SECONDS)
    if not _enabled(entry):
        raise LaneSkip(f"{arch.debian}: `update-binfmts --enable {arch.binfmt}` did not register {entry}, "
                       "so this machine cannot run foreign binaries; is qemu-user-static's binfmt entry installed?")


def _enabled(entry: Path) -> bool:
    try:
        return entry.read_text().splitlines()[0].strip() == "enabled"
    except (OSError, IndexError):
        return False


def _key(*parts: object) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:12]


def base_key(arch: Arch) -> str:
    return f"{arch.debian}-{SUITE}-v{LAYOUT_VERSION}-{_key(arch.debian, SUITE, ROOTFS_PACKAGES, PRELOADED_PACKAGES)}"


def test_layer_key(arch: Arch) -> str:
    return f"{base_key(arch)}-tests-{_key(TEST_PACKAGES, SWTPM_WRAPPER, ETC_HOSTS)}"


def is_complete(tree: Path, key: str) -> bool:
    """A cached tree counts only with its marker, written last, naming this very key."""
    try:
        return (tree / MARKER).read_text().strip() == key
    except OSError:
        return False


def remove_tree(path: Path) -> None:
    if path.exists():
        unmount_below(path)
        shutil.rmtree(path)


@contextmanager
def _locked(cache_dir: Path, arch_name: str) -> Iterator[None]:
    """One builder per architecture at a time; two architectures build side by side."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / f"{arch_name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def cached(cache_dir: Path, key: str, build: BuildFn, log: LogFn = print) -> Path:
    """The tree ``cache_dir/key``: reused when complete, else (re)built by ``build(scratch)``.

    Anything there without a matching marker (an interrupted build, a copy from
    an older layout) is removed first and built again; the scratch directory
    becomes the tree only after its marker is written.
    """
    tree = cache_dir / key
    with _locked(cache_dir, key.split("-", 1)[0]):
        if is_complete(tree, key):
            return tree
        if tree.exists():
            log(f"{tree} has no completion marker (a build was interrupted); removing it and building again")
            remove_tree(tree)
        scratch = cache_dir / f"{key}.partial"
        if scratch.exists():
            log(f"{scratch} was left by an interrupted build; removing it")
            remove_tree(scratch)
        scratch.mkdir()
        try:
            build(scratch)
        except BaseException:
            remove_tree(scratch)
            raise
        (scratch / MARKER).write_text(key + "\n")
        scratch.rename(tree)
        return tree


def prune(cache_dir: Path, arch: Arch, keep: Sequence[str]) -> None:
    """Drops this architecture's trees of other keys (older package lists), so the cache stays one per arch."""
    with _locked(cache_dir, arch.debian):
        for old in cache_dir.glob(f"{arch.debian}-*"):
            if old.name not in keep:
                remove_tree(old)


def _run(command: Sequence[str], timeout: float, what: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(command), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        raise HarnessError(f"{what} failed (exit {result.returncode}):\n{(result.stdout + result.stderr)[-3000:]}")
    return result


def nspawn(rootfs: Path, script: str, *, timeout: float, binds: Sequence[str] = (), env: Sequence[str] = (),
           capture: bool = True) -> subprocess.CompletedProcess[str]:
    """A shell script inside ``rootfs`` (not booted), sharing the host's network; a non-zero exit raises."""
    # A machine name of our own: nspawn keeps per-name state under /run, and
    # the x86 tests' trees are all called "rootfs".
    command = [
        "systemd-nspawn", "--quiet", "--pipe", "--register=no", "--keep-unit", f"--directory={rootfs}",
        f"--machine=outpost-arm-{secrets.token_hex(4)}",
        *[f"--bind={b}" for b in binds], *[f"--setenv={e}" for e in env], "--", "/bin/sh", "-c",
        # nspawn hands its payload a NOTIFY_SOCKET; the agent would take that
        # for systemd and log to the journal instead of the stderr tests read.
        f"unset NOTIFY_SOCKET; {script}",
    ]
    result = subprocess.run(command, capture_output=capture, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        output = (result.stdout or "") + (result.stderr or "") if capture else "(output above)"
        raise HarnessError(f"in {rootfs}: `{script.strip()[:200]}` exited {result.returncode}:\n{output[-4000:]}")
    return result


def machine_inside(rootfs: Path) -> str:
    """`uname -m` as the emulated userland sees it."""
    return _run(["chroot", str(rootfs), "/bin/uname", "-m"], QUICK_TIMEOUT_SECONDS, "uname in the root filesystem") \
        .stdout.strip()


def build_base(arch: Arch, scratch: Path) -> None:
    """debootstrap's two stages, /etc/hosts, and the .debs' dependencies in apt's cache."""
    rootfs = scratch / "rootfs"
    _run(["debootstrap", f"--arch={arch.debian}", "--foreign", "--variant=minbase",
          f"--include={','.join(ROOTFS_PACKAGES)}", SUITE, str(rootfs), debian_mirror()],
         DEBOOTSTRAP_TIMEOUT_SECONDS, f"debootstrap --foreign ({arch.debian})")
    try:
        _run(["chroot", str(rootfs), "/debootstrap/debootstrap", "--second-stage"],
             DEBOOTSTRAP_TIMEOUT_SECONDS, f"debootstrap --second-stage under {arch.qemu}")
    finally:
        unmount_below(rootfs)
    (rootfs / "etc/hosts").write_text(ETC_HOSTS)
    got = machine_inside(rootfs)
    if got != arch.machine:
        raise HarnessError(f"the {arch.debian} root filesystem runs as {got!r}, not {arch.machine!r}")
    nspawn(rootfs, "export DEBIAN_FRONTEND=noninteractive; apt-get update -qq && "
                   f"apt-get install -y -qq --download-only {' '.join(sorted(set(PRELOADED_PACKAGES + TEST_PACKAGES)))}",
           timeout=APT_TIMEOUT_SECONDS)


def build_test_layer(arch: Arch, base: Path, scratch: Path) -> None:
    """Debian's arm python3-* packages, pytest and swtpm installed over the base, kept as an overlay upper dir."""
    with overlay([base / "rootfs"], scratch) as merged:
        nspawn(merged, f"export DEBIAN_FRONTEND=noninteractive; apt-get install -y -qq {' '.join(TEST_PACKAGES)}",
               timeout=APT_TIMEOUT_SECONDS)
        wrapper = merged / "usr/local/bin/swtpm"
        wrapper.parent.mkdir(parents=True, exist_ok=True)
        wrapper.write_text(SWTPM_WRAPPER)
        wrapper.chmod(0o755)
    shutil.rmtree(scratch / "work")
    shutil.rmtree(scratch / "merged")


@dataclass(frozen=True)
class Layers:
    base: Path  # holds rootfs/
    tests: Path  # holds upper/

    @property
    def base_rootfs(self) -> Path:
        return self.base / "rootfs"

    @property
    def test_lowers(self) -> list[Path]:
        return [self.tests / "upper", self.base_rootfs]


def ensure_layers(arch: Arch, cache_dir: Path = CACHE_DIR, log: LogFn = print) -> Layers:
    base = cached(cache_dir, base_key(arch), lambda s: build_base(arch, s), log)
    tests = cached(cache_dir, test_layer_key(arch), lambda s: build_test_layer(arch, base, s), log)
    prune(cache_dir, arch, keep=[base.name, tests.name])
    return Layers(base, tests)


def copy_checkout(destination: Path) -> None:
    """The project's files (not .git, .venv or bytecode) for running its tests inside the root filesystem."""
    destination.mkdir(parents=True, exist_ok=True)
    listed = _run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                  QUICK_TIMEOUT_SECONDS, "listing the checkout").stdout
    for name in filter(None, listed.split("\0")):
        source = REPO / name
        if source.is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


UNRESOLVED = re.compile(r"^\s*(?:(\S+) :)?\s*Depends: (\S+)(?: \([^)]*\))? but (?:it is not installable|"
                        r"it is not going to be installed|[^\n]* is to be installed)", re.M)


def unresolved_dependencies(apt_output: str) -> list[str]:
    """The packages apt says it cannot get, from its 'Depends: X but it is not installable' lines."""
    return sorted({m.group(2) for m in UNRESOLVED.finditer(apt_output)})


def probe_deb(folder: Path, depends: str) -> Path:
    """A tiny .deb with the given Depends line, to see what apt says of it."""
    package = folder / "outpost-probe"
    (package / "DEBIAN").mkdir(parents=True)
    (package / "DEBIAN/control").write_text(
        "Package: outpost-probe\nVersion: 1.0\nArchitecture: all\nMaintainer: Outpost <outpost@example.org>\n"
        f"Depends: {depends}\nDescription: dependency probe\n probe\n")
    deb = folder / "outpost-probe_1.0_all.deb"
    _run(["dpkg-deb", "--build", str(package), str(deb)], QUICK_TIMEOUT_SECONDS, "dpkg-deb --build")
    shutil.rmtree(package)
    return deb


def elapsed(start: float) -> str:
    return f"{time.monotonic() - start:.0f} s"
