"""Fixtures of the ARM lane's tests: the emulated root filesystem scripts/test-arm built, if any.

The lane (tests/arm/lane.py) builds an arm64 root filesystem with the .debs
installed and runs tests/arm/test_arm_boot.py against it, naming it in
OUTPOST_ARM_INSTALLED and OUTPOST_ARM_BASE. Outside the lane those tests skip
saying so; the lane itself fails a step whose tests skipped.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "packaging"))
sys.path.insert(0, str(HERE))

import boot_harness  # noqa: E402
import rootfs  # noqa: E402

# Inside the lane's run directory, so a killed run's overlays are cleaned with it.
SCRATCH_DIR = Path(os.environ.get("OUTPOST_ARM_SCRATCH", "/var/tmp"))


def _lane_tree() -> tuple[Path, Path, str]:
    installed, base = os.environ.get("OUTPOST_ARM_INSTALLED"), os.environ.get("OUTPOST_ARM_BASE")
    if not installed or not base:
        pytest.skip("run by scripts/test-arm, which builds the emulated root filesystem (OUTPOST_ARM_INSTALLED unset)")
    return Path(installed), Path(base), os.environ.get("OUTPOST_ARM_ARCH", "arm64")


@pytest.fixture(autouse=True)
def _arm_machine_names(monkeypatch: pytest.MonkeyPatch) -> None:
    """Booted ARM machines have names of their own, apart from the x86 boot tests'."""
    monkeypatch.setattr(boot_harness, "MACHINE_PREFIX", f"outpost-arm-{os.environ.get('OUTPOST_ARM_ARCH', 'lane')}")


@contextmanager
def _lane_view(prefix: str) -> Iterator[Path]:
    """A throwaway writable overlay of the lane's installed root filesystem."""
    installed, base, arch = _lane_tree()
    holder = Path(tempfile.mkdtemp(prefix=prefix, dir=SCRATCH_DIR))
    try:
        with rootfs.overlay([installed, base], holder) as merged:
            machine = rootfs.machine_inside(merged)
            assert machine == rootfs.ARCHES[arch].machine, f"the lane's tree runs as {machine}, not {arch}"
            yield merged
    finally:
        rootfs.remove_tree(holder)


@pytest.fixture(scope="session")
def installed_rootfs() -> Iterator[Path]:
    """The lane's root filesystem with the .debs installed by apt (read through a throwaway overlay)."""
    with _lane_view("outpost-arm-installed-") as merged:
        yield merged


@pytest.fixture
def gateway_rootfs() -> Iterator[Path]:
    """A throwaway writable view of the installed root filesystem for one boot."""
    with _lane_view("outpost-arm-boot-") as merged:
        yield merged
