"""The systemd units pass systemd-analyze verify and keep their promises.

systemd-analyze verify refuses a unit whose executables are missing, and the
packaged launchers are not installed on a development machine, so the units
are checked inside a throwaway root holding the system units and executable
stand-ins at the packaged paths.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNITS = REPO / "systemd"
SYSTEM_UNITS = Path("/usr/lib/systemd/system")
# verify loads every unit the two reference; a few seconds is plenty.
VERIFY_TIMEOUT_SECONDS = 60

pytestmark = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed (packaging/install-build-deps)"
)


def unit_settings(name: str) -> dict[str, list[str]]:
    """Every Key=value of a unit, in order, keys mapped to all their values."""
    settings: dict[str, list[str]] = {}
    for line in (UNITS / name).read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    return settings


def executables(name: str) -> list[str]:
    paths = []
    for key in ("ExecStartPre", "ExecStart"):
        for value in unit_settings(name).get(key, []):
            paths.append(value.lstrip("-+@!:").split()[0])
    return paths


def verify_root(tmp_path: Path, executables_present: bool = True) -> Path:
    root = tmp_path / "root"
    (root / "etc/systemd/system").mkdir(parents=True)
    (root / "usr/lib/systemd").mkdir(parents=True)
    shutil.copytree(SYSTEM_UNITS, root / "usr/lib/systemd/system", symlinks=True)
    for unit in UNITS.glob("*.service"):
        shutil.copy(unit, root / "etc/systemd/system" / unit.name)
        for path in executables(unit.name) if executables_present else []:
            stand_in = root / path.lstrip("/")
            stand_in.parent.mkdir(parents=True, exist_ok=True)
            stand_in.write_text("#!/bin/sh\n")
            stand_in.chmod(0o755)
    return root


def verify(root: Path, *units: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", "verify", "--man=no", f"--root={root}", *units],
        capture_output=True, text=True, timeout=VERIFY_TIMEOUT_SECONDS,
    )


@pytest.mark.skipif(not SYSTEM_UNITS.is_dir(), reason="no system units at /usr/lib/systemd/system to verify against")
@pytest.mark.parametrize("unit", ["outpost-agent.service", "outpost-controller.service"])
def test_unit_verifies_without_a_single_complaint(unit: str, tmp_path: Path) -> None:
    result = verify(verify_root(tmp_path), unit)
    assert result.returncode == 0, result.stderr
    # Unknown keys and bad values are only warnings to verify: none allowed.
    assert result.stderr == "" and result.stdout == ""


@pytest.mark.skipif(not SYSTEM_UNITS.is_dir(), reason="no system units at /usr/lib/systemd/system to verify against")
def test_verify_does_catch_a_missing_executable(tmp_path: Path) -> None:
    result = verify(verify_root(tmp_path, executables_present=False), "outpost-agent.service")
    assert result.returncode != 0
    assert "/usr/bin/outpost-agent" in result.stderr


@pytest.mark.parametrize("unit", ["outpost-agent.service", "outpost-controller.service"])
def test_unit_is_notify_with_a_watchdog_and_never_restarts_on_fatal_exits(unit: str) -> None:
    settings = unit_settings(unit)
    assert settings["Type"] == ["notify"]
    assert settings["NotifyAccess"] == ["main"]
    assert settings["WatchdogSec"][0].endswith("s")
    assert settings["Restart"] == ["on-failure"]
    assert set(settings["RestartPreventExitStatus"][0].split()) >= {"64", "65", "78"}


def test_restart_prevention_matches_the_agents_exit_codes() -> None:
    from agent import errors

    prevented = set(unit_settings("outpost-agent.service")["RestartPreventExitStatus"][0].split())
    assert prevented == {str(code) for code in errors.NOT_RESTARTED_EXIT_CODES}
    # A revoked identity ends the agent with 77 (tests/e2e/test_lifecycle_refused.py): it must stay stopped.
    assert str(errors.EXIT_IDENTITY_REFUSED) in prevented
    # A retryable failure must stay restartable.
    assert str(errors.EXIT_UNAVAILABLE) not in prevented and str(errors.EXIT_TEMPFAIL) not in prevented


def test_agent_runs_unprivileged_and_reaches_only_the_tpm_device() -> None:
    settings = unit_settings("outpost-agent.service")
    assert settings["User"] == ["outpost-agent"]
    assert settings["CapabilityBoundingSet"] == [""]
    assert settings["DevicePolicy"] == ["closed"]
    assert settings["DeviceAllow"] == ["/dev/tpmrm0 rw"]
    assert settings["SupplementaryGroups"] == ["tss"]
    assert "PrivateDevices" not in settings
    assert settings["ProtectSystem"] == ["strict"]
    # The privileged steps that take a token file are the only "+" commands.
    assert [v for v in settings["ExecStartPre"] if "+" in v.split()[0]] == [
        "-+/usr/lib/outpost-agent/take-boot-token /etc/outpost/enroll.token /var/lib/outpost-agent",
        "-+/usr/lib/outpost-agent/take-boot-token /boot/firmware/outpost-enroll.token /var/lib/outpost-agent",
    ]
    # Always active, waiting for enrollment or connected: no start conditions.
    assert not any(key.startswith("Condition") for key in settings)
    assert "ReadWritePaths" not in settings


def test_agent_keeps_one_malloc_arena_and_the_benchmarks_run_it_so() -> None:
    """A second glibc arena for the worker thread costs the idle agent 0.2-0.3 MiB (README, "Performance")."""
    from tests.bench.bench_setup import agent_env

    assert unit_settings("outpost-agent.service")["Environment"] == ["MALLOC_ARENA_MAX=1"]
    assert agent_env()["MALLOC_ARENA_MAX"] == "1"


def test_controller_holds_only_the_bind_capability() -> None:
    settings = unit_settings("outpost-controller.service")
    assert settings["User"] == ["outpost-controller"]
    assert settings["AmbientCapabilities"] == ["CAP_NET_BIND_SERVICE"]
    assert settings["CapabilityBoundingSet"] == ["CAP_NET_BIND_SERVICE"]


# The bands systemd-analyze security names at or below "OK" (exposure 4.9 and under).
ACCEPTED_BANDS = ("PERFECT", "SAFE", "OK")
README = REPO / "README.md"


def stated_exposure(unit: str) -> float:
    """The exposure the README states for ``unit``, in its table row ``| unit | 1.5 OK |``."""
    match = re.search(rf"^\| `?{re.escape(unit)}`? \| (\d+\.\d) (\w+) \|", README.read_text(), re.MULTILINE)
    assert match is not None, f"README.md states no systemd-analyze security score for {unit}"
    assert match.group(2) in ACCEPTED_BANDS
    return float(match.group(1))


def security(path: Path) -> tuple[float, str, int]:
    """Overall exposure and band of a unit file by ``systemd-analyze security --offline``, and
    the exit status with ``--threshold`` at the README's figure for it."""
    threshold = round(stated_exposure(path.name) * 10) if path.parent == UNITS else 0
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", f"--threshold={threshold}", "--no-pager", str(path)],
        capture_output=True, text=True, timeout=VERIFY_TIMEOUT_SECONDS,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d) (\w+)", result.stdout)
    assert match is not None, result.stdout + result.stderr
    return float(match.group(1)), match.group(2), result.returncode


@pytest.mark.parametrize("unit", ["outpost-agent.service", "outpost-controller.service"])
def test_unit_scores_no_worse_than_the_readme_states_and_in_the_ok_band(unit: str) -> None:
    exposure, band, status = security(UNITS / unit)
    assert band in ACCEPTED_BANDS, f"{unit}: exposure {exposure} {band}"
    assert exposure <= stated_exposure(unit), f"{unit}: exposure {exposure}, README states {stated_exposure(unit)}"
    assert status == 0


def test_the_security_score_does_catch_a_weakened_unit(tmp_path: Path) -> None:
    weakened = tmp_path / "weakened.service"
    kept = [line for line in (UNITS / "outpost-agent.service").read_text().splitlines()
            if not line.startswith(("ProtectSystem=", "ProtectHome=", "PrivateTmp=", "NoNewPrivileges=",
                                    "CapabilityBoundingSet=", "SystemCallFilter="))]
    weakened.write_text("\n".join(kept) + "\n")
    exposure, band, _ = security(weakened)
    assert exposure > stated_exposure("outpost-agent.service")
    assert band not in ACCEPTED_BANDS
