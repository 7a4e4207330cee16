"""Fixtures for the packaging tests: built .debs and an installed, bootable Debian 12."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# dpkg-buildpackage of two pure-Python packages takes seconds.
BUILD_TIMEOUT_SECONDS = 300
# Root filesystem copies live beside the cache, outside the git tree, on a
# disk rather than a tmpfs: each is a few hundred megabytes.
SCRATCH_DIR = Path("/var/tmp")
BOOT_TOOLS = ("debootstrap", "systemd-nspawn")


def _require_tools(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed; run packaging/install-build-deps as root")


@pytest.fixture(scope="session")
def built_debs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The two .debs built from this checkout by packaging/build-debs, by package name."""
    _require_tools("dpkg-buildpackage", "dh_python3")
    out = tmp_path_factory.mktemp("debs")
    result = subprocess.run(
        [str(REPO / "packaging/build-debs"), "--no-lintian", "--out", str(out)],
        capture_output=True, text=True, timeout=BUILD_TIMEOUT_SECONDS,
    )
    assert result.returncode == 0, f"build-debs failed:\n{result.stderr}"
    debs = {p.name.split("_")[0]: p for p in out.glob("*.deb")}
    assert set(debs) == {"outpost-agent", "outpost-controller"}, f"build-debs made {sorted(debs)}"
    return debs


def _scratch_copy(source: Path, prefix: str) -> Path:
    from boot_harness import copy_rootfs

    holder = Path(tempfile.mkdtemp(prefix=prefix, dir=SCRATCH_DIR))
    return copy_rootfs(source, holder / "rootfs")


@pytest.fixture(scope="session")
def installed_rootfs(built_debs: dict[str, Path]) -> Iterator[Path]:
    """A Debian 12 root filesystem with both .debs installed by apt, shared by a session's boots."""
    if os.geteuid() != 0:
        pytest.skip("booting a container with systemd-nspawn needs root")
    _require_tools(*BOOT_TOOLS)
    from boot_harness import cached_base_rootfs, install_debs

    rootfs = _scratch_copy(cached_base_rootfs(), "outpost-installed-")
    try:
        (rootfs / "root/apt-install.log").write_text(
            install_debs(rootfs, [built_debs["outpost-agent"], built_debs["outpost-controller"]])
        )
        yield rootfs
    finally:
        shutil.rmtree(rootfs.parent)


@pytest.fixture
def gateway_rootfs(installed_rootfs: Path) -> Iterator[Path]:
    """A throwaway copy of the installed root filesystem for one boot."""
    rootfs = _scratch_copy(installed_rootfs, "outpost-boot-")
    try:
        yield rootfs
    finally:
        shutil.rmtree(rootfs.parent)
