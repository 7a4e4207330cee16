"""A Debian 12 root filesystem with the built .debs installed, booted under systemd-nspawn.

The host runs no systemd, so systemd inside the container is the one under
test. Results come back through a bind-mounted directory: a oneshot-style
report unit dropped into the root filesystem waits for the boot to finish,
runs the test's probe script, writes what systemd says, and powers off.

The container shares the host's network (no --private-network): a controller
on the host's 127.0.0.1 is the container's 127.0.0.1 too, and a port the
container listens on is reachable from the host.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import secrets
import shutil
import signal
import subprocess
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

SUITE = "bookworm"
ROOTFS_CACHE_DIR = Path("/var/tmp/outpost-rootfs-cache")
# Bump to throw away every cached root filesystem (the package lists below
# are part of the key already).
ROOTFS_LAYOUT_VERSION = "1"
# What the container needs to boot and to install .debs. python3 is
# installed up front because apt 2.6 fails installing a local .deb in the
# same run that first configures python3-minimal.
ROOTFS_PACKAGES = ("systemd", "systemd-sysv", "dbus", "apt", "python3")
# Downloaded into apt's cache but not installed: "apt-get install ./x.deb"
# must still resolve them from the packages' Depends, as on a gateway, but
# needs no network once the cache is warm.
PRELOADED_PACKAGES = (
    "adduser", "python3-aiohttp", "python3-cryptography", "python3-jwt", "python3-ntplib",
    "python3-systemd", "python3-tpm2-pytss",
)
# A cold debootstrap takes about half a minute on a nearby mirror; a slow
# one can take ten.
DEBOOTSTRAP_TIMEOUT_SECONDS = 900
APT_TIMEOUT_SECONDS = 600
# A non-boot command in the container: package queries, file checks.
RUN_TIMEOUT_SECONDS = 120
# A minbase boot reaches multi-user in well under a second here; the rest is
# the probe's own waiting. Past this the container is killed.
BOOT_TIMEOUT_SECONDS = 240
# How long the report unit waits for "systemctl is-system-running --wait".
SYSTEM_RUNNING_WAIT_SECONDS = 90
# The probe's own bound inside the container, below BOOT_TIMEOUT_SECONDS.
PROBE_TIMEOUT_SECONDS = 150
# After SIGTERM (orderly poweroff), how long before SIGKILL.
KILL_GRACE_SECONDS = 20

# Names the booted machines; another lane booting at the same time (the ARM
# lane) sets its own, so no two runs ever share a machine name.
MACHINE_PREFIX = "outpost-test"
SHARED_IN_CONTAINER = "/run/outpost-test"
DEBS_IN_CONTAINER = "/root/outpost-debs"
REPORT_UNIT = "outpost-test-report.service"
REPORT_SCRIPT = "/usr/local/lib/outpost-test/report"
UNITS_REPORTED = ("outpost-agent", "outpost-controller")
SHOW_PROPERTIES = "ActiveState,SubState,Result,ExecMainStatus,ConditionResult,NRestarts,StatusText"


class HarnessError(Exception):
    """Building, installing or booting the container failed; the message says where."""


def debian_mirror(apt_dir: Path = Path("/etc/apt")) -> str:
    """The machine's configured Debian mirror for the main archive (not security, not updates)."""
    entries: list[tuple[str, list[str]]] = []
    sources_list = apt_dir / "sources.list"
    one_line_files = [sources_list] if sources_list.exists() else []
    one_line_files += sorted((apt_dir / "sources.list.d").glob("*.list"))
    for path in one_line_files:
        for line in path.read_text().splitlines():
            words = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
            if len(words) >= 3 and words[0] == "deb":
                entries.append((words[1], [words[2]]))
    for path in sorted((apt_dir / "sources.list.d").glob("*.sources")):
        for stanza in re.split(r"\n\s*\n", path.read_text()):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                if ":" in line and not line.lstrip().startswith("#"):
                    key, value = line.split(":", 1)
                    fields[key.strip().lower()] = value.strip()
            if "deb" in fields.get("types", "").split():
                for uri in fields.get("uris", "").split():
                    entries.append((uri, fields.get("suites", "").split()))
    for uri, suites in entries:
        if SUITE in suites and "security" not in uri:
            return uri
    raise HarnessError(f"no Debian mirror serving '{SUITE}' in {apt_dir}/sources.list or sources.list.d")


def rootfs_key() -> str:
    """Names one cached root filesystem: suite, layout and package lists."""
    digest = hashlib.sha256(repr((ROOTFS_PACKAGES, PRELOADED_PACKAGES)).encode()).hexdigest()[:12]
    return f"{SUITE}-minbase-v{ROOTFS_LAYOUT_VERSION}-{digest}"


def cached_base_rootfs(cache_dir: Path = ROOTFS_CACHE_DIR) -> Path:
    """The base root filesystem, built once with debootstrap and reused after.

    Built in a scratch directory and renamed into place when complete, under
    a lock, so an interrupted or concurrent build never leaves half a tree.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    rootfs = cache_dir / rootfs_key()
    with open(cache_dir / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if rootfs.is_dir():
            return rootfs
        for stale in cache_dir.glob("*.partial"):
            shutil.rmtree(stale)
        scratch = cache_dir / f"{rootfs.name}.partial"
        _check(
            ["debootstrap", "--variant=minbase", f"--include={','.join(ROOTFS_PACKAGES)}",
             SUITE, str(scratch), debian_mirror()],
            DEBOOTSTRAP_TIMEOUT_SECONDS, "debootstrap",
        )
        run_in_rootfs(
            scratch,
            "export DEBIAN_FRONTEND=noninteractive; apt-get update -qq && "
            f"apt-get install -y -qq --download-only {' '.join(PRELOADED_PACKAGES)}",
            timeout=APT_TIMEOUT_SECONDS, check=True,
        )
        scratch.rename(rootfs)
        return rootfs


@contextmanager
def overlay(lowers: Sequence[Path], holder: Path) -> Iterator[Path]:
    """A writable view of ``lowers`` (first on top) for one install or boot; writes land in ``holder/upper``.

    Mounting takes no time where a copy of the few hundred megabytes of a root
    filesystem took seconds per boot (and as long again to delete); the lower
    trees are never written, so the cached base stays pristine.
    """
    upper, work, merged = holder / "upper", holder / "work", holder / "merged"
    for folder in (upper, work, merged):
        folder.mkdir(parents=True, exist_ok=True)
    lowerdir = ":".join(str(p) for p in lowers)
    _check(["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={lowerdir},upperdir={upper},workdir={work}",
            str(merged)], RUN_TIMEOUT_SECONDS, "mounting an overlay of the root filesystem")
    try:
        yield merged
    finally:
        unmount_below(merged)


def unmount_below(path: Path) -> None:
    """Lazily unmounts ``path`` and whatever is mounted under it (deepest first)."""
    prefix = str(path.resolve())
    with open("/proc/self/mounts") as mounts:
        points = [line.split()[1].replace("\\040", " ") for line in mounts]
    for point in sorted((p for p in points if p == prefix or p.startswith(prefix + "/")), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, timeout=RUN_TIMEOUT_SECONDS)


def run_in_rootfs(
    rootfs: Path, script: str, *, timeout: float = RUN_TIMEOUT_SECONDS, check: bool = False,
    binds: Sequence[str] = (),
) -> subprocess.CompletedProcess[str]:
    """Runs a shell script in the root filesystem without booting it (systemd-nspawn --pipe)."""
    command = [
        "systemd-nspawn", "--quiet", "--pipe", "--register=no", "--keep-unit",
        # A name of its own: nspawn keeps per-name state under /run, and two installs may run at once.
        f"--machine=outpost-{secrets.token_hex(4)}", f"--directory={rootfs}", *[f"--bind={b}" for b in binds], "--", "/bin/sh", "-c", script,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if check and result.returncode != 0:
        raise HarnessError(f"in {rootfs}: `{script}` exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def install_debs(rootfs: Path, debs: Iterable[Path]) -> str:
    """apt-get install the .debs as a person would: Debian's python3-* come in as dependencies."""
    target = rootfs / DEBS_IN_CONTAINER.lstrip("/")
    target.mkdir(parents=True, exist_ok=True)
    names = []
    for deb in debs:
        shutil.copy(deb, target / deb.name)
        names.append(f"./{deb.name}")
    result = run_in_rootfs(
        rootfs,
        f"export DEBIAN_FRONTEND=noninteractive; cd {DEBS_IN_CONTAINER} && apt-get install -y {' '.join(names)}",
        timeout=APT_TIMEOUT_SECONDS, check=True,
    )
    return result.stdout


def add_dropin(rootfs: Path, unit: str, name: str, text: str) -> None:
    """A drop-in ``/etc/systemd/system/UNIT.d/NAME.conf``: the packaged unit with a few settings changed."""
    folder = rootfs / "etc/systemd/system" / f"{unit}.d"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.conf").write_text(text)


BOOT_TOKEN_IN_CONTAINER = "boot/firmware/outpost-enroll.token"


def place_boot_token(rootfs: Path, text: str) -> Path:
    """A token file where a technician puts it: the Raspberry Pi boot partition."""
    token = rootfs / BOOT_TOKEN_IN_CONTAINER
    token.parent.mkdir(parents=True, exist_ok=True)
    token.write_text(text)
    return token


def wait_for_agent_status(prefix: str, seconds: int) -> str:
    """Shell lines for a probe: wait (at most ``seconds``) until the agent's status line starts with ``prefix``."""
    return (f"i=0; until systemctl show -P StatusText outpost-agent | grep -q '^{prefix}' || [ $i -ge {seconds} ]; "
            "do sleep 1; i=$((i + 1)); done")


def controller_listens_on(rootfs: Path, port: int) -> None:
    """The packaged controller's arguments: loopback only, since the container shares the host's network."""
    (rootfs / "etc/default/outpost-controller").write_text(f'OUTPOST_CONTROLLER_ARGS="--listen 127.0.0.1:{port}"\n')


def enroll_in_rootfs(rootfs: Path, token: str) -> str:
    """``outpost-agent enroll`` inside the root filesystem as the agent's user, as a technician would by hand.

    The token goes through /var/tmp: nspawn gives the container a /tmp of its own.
    """
    staged = rootfs / "var/tmp/outpost-enroll.token"
    staged.write_text(token)
    staged.chmod(0o644)
    try:
        result = run_in_rootfs(
            rootfs, "runuser -u outpost-agent -- outpost-agent enroll --token /var/tmp/outpost-enroll.token "
                    "--config /etc/outpost/agent.toml",
            check=True,
        )
    finally:
        staged.unlink()
    return result.stdout


@dataclass
class BootReport:
    """What one boot left in the shared directory, and how the container ended."""

    shared: Path
    returncode: int | None
    timed_out: bool
    console: str

    def text(self, name: str) -> str:
        path = self.shared / name
        return path.read_text() if path.exists() else ""

    def show(self, unit: str) -> dict[str, str]:
        """``systemctl show`` properties of a unit at the end of the boot."""
        return dict(line.split("=", 1) for line in self.text(f"{unit}.show").splitlines() if "=" in line)

    def diagnosis(self) -> str:
        """Everything a person needs when an assertion about this boot fails."""
        return (
            f"nspawn exit {self.returncode}, timed out: {self.timed_out}\n"
            f"--- is-system-running: {self.text('is-system-running')}"
            f"--- failed units:\n{self.text('failed')}"
            f"--- probe (exit {self.text('probe.rc').strip()}):\n{self.text('probe.log')[-4000:]}\n"
            f"--- journal (tail):\n{self.text('journal')[-6000:]}\n"
            f"--- console (tail):\n{self.console[-2000:]}"
        )


def install_report_unit(rootfs: Path) -> None:
    """Drops the unit that reports to the host and powers off once the boot is done."""
    script = rootfs / REPORT_SCRIPT.lstrip("/")
    script.parent.mkdir(parents=True, exist_ok=True)
    shows = "\n".join(
        f"systemctl show {u} -p {SHOW_PROPERTIES} > $out/{u}.show 2>&1" for u in UNITS_REPORTED
    )
    script.write_text(f"""#!/bin/sh
out={SHARED_IN_CONTAINER}
timeout {SYSTEM_RUNNING_WAIT_SECONDS} systemctl is-system-running --wait > $out/is-system-running 2>&1
if [ -f $out/probe.sh ]; then
    timeout {PROBE_TIMEOUT_SECONDS} sh -eu $out/probe.sh > $out/probe.log 2>&1
    echo $? > $out/probe.rc
fi
{shows}
systemctl list-units --failed --no-legend --plain > $out/failed 2>&1
journalctl -b --no-pager -o short-monotonic > $out/journal 2>&1
touch $out/done
systemctl poweroff
""")
    script.chmod(0o755)
    units = rootfs / "etc/systemd/system"
    # Type=simple: "is-system-running --wait" inside would wait for this very
    # unit's start job forever if it were a oneshot.
    (units / REPORT_UNIT).write_text(f"""[Unit]
Description=Report this boot to the test host, then power off

[Service]
Type=simple
ExecStart={REPORT_SCRIPT}

[Install]
WantedBy=multi-user.target
""")
    wants = units / "multi-user.target.wants"
    wants.mkdir(exist_ok=True)
    link = wants / REPORT_UNIT
    if not link.is_symlink():
        link.symlink_to(f"/etc/systemd/system/{REPORT_UNIT}")


def boot(rootfs: Path, shared: Path, probe: str = "", timeout: float = BOOT_TIMEOUT_SECONDS) -> BootReport:
    """Boots the root filesystem with systemd as PID 1 until it powers itself off.

    ``probe`` is a shell script run inside (``sh -eu``) once the boot is done,
    with ``$out`` unset: write results under /run/outpost-test yourself.
    """
    shared.mkdir(parents=True, exist_ok=True)
    if probe:
        (shared / "probe.sh").write_text(probe)
    install_report_unit(rootfs)
    console_path = shared.parent / f"{shared.name}.console"
    command = [
        "systemd-nspawn", "--quiet", "--boot", "--register=no", "--keep-unit", "--console=pipe",
        f"--machine={MACHINE_PREFIX}-{secrets.token_hex(4)}", f"--directory={rootfs}",
        f"--bind={shared}:{SHARED_IN_CONTAINER}",
    ]
    timed_out = False
    with open(console_path, "w") as console:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            returncode: int | None = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            # SIGTERM asks nspawn for an orderly poweroff; SIGKILL ends it, and
            # the container's init dies with it.
            os.killpg(process.pid, signal.SIGTERM)
            try:
                returncode = process.wait(timeout=KILL_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                returncode = process.wait()
    return BootReport(shared, returncode, timed_out, console_path.read_text())


def _check(command: list[str], timeout: float, what: str) -> None:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        raise HarnessError(f"{what} failed (exit {result.returncode}): {result.stderr[-2000:]}")
