"""Fixtures for the packaging tests: built .debs and an installed, bootable Debian 12."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# dpkg-buildpackage of two pure-Python packages takes seconds.
BUILD_TIMEOUT_SECONDS = 300
# Overlays of the root filesystem (their upper directories: what apt and a boot
# write) live beside the cache, outside the git tree, on a disk rather than a tmpfs.
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


@contextmanager
def _scratch_overlay(lowers: list[Path], prefix: str) -> Iterator[Path]:
    """A throwaway writable overlay of ``lowers`` in the scratch directory, unmounted and removed after."""
    from boot_harness import overlay, unmount_below

    holder = Path(tempfile.mkdtemp(prefix=prefix, dir=SCRATCH_DIR))
    try:
        with overlay(lowers, holder) as merged:
            yield merged
    finally:
        unmount_below(holder)
        shutil.rmtree(holder)


@pytest.fixture(scope="session")
def installed_layers(built_debs: dict[str, Path]) -> Iterator[list[Path]]:
    """Both .debs installed by apt over the cached Debian 12 base: the overlay lowers of a session's boots.

    apt writes into an upper directory of its own, never into the cached base;
    every boot then gets an overlay of its own on top of both, so no boot sees
    another's writes and none copies the tree.
    """
    if os.geteuid() != 0:
        pytest.skip("booting a container with systemd-nspawn needs root")
    _require_tools(*BOOT_TOOLS)
    from boot_harness import cached_base_rootfs, install_debs, overlay, unmount_below

    base = cached_base_rootfs()
    holder = Path(tempfile.mkdtemp(prefix="outpost-installed-", dir=SCRATCH_DIR))
    try:
        with overlay([base], holder) as merged:
            (merged / "root/apt-install.log").write_text(
                install_debs(merged, [built_debs["outpost-agent"], built_debs["outpost-controller"]])
            )
        yield [holder / "upper", base]
    finally:
        unmount_below(holder)
        shutil.rmtree(holder)


@pytest.fixture(scope="session")
def installed_rootfs(installed_layers: list[Path]) -> Iterator[Path]:
    """A Debian 12 root filesystem with both .debs installed by apt (a throwaway view of ``installed_layers``)."""
    with _scratch_overlay(installed_layers, "outpost-installed-view-") as rootfs:
        yield rootfs


@pytest.fixture
def gateway_rootfs(installed_layers: list[Path]) -> Iterator[Path]:
    """A throwaway writable view of the installed root filesystem for one boot."""
    with _scratch_overlay(installed_layers, "outpost-boot-") as rootfs:
        yield rootfs
