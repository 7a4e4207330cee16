"""packaging/build-debs makes two lintian-clean .debs with the promised contents."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# lintian unpacks and checks both packages: tens of seconds at most.
LINTIAN_TIMEOUT_SECONDS = 300
DEBIAN_DEPENDS = ("python3 (>= 3.11)", "python3-aiohttp (>= 3.8.4)", "python3-cryptography (>= 38)",
                  "python3-jwt (>= 2.6)", "python3-ntplib", "python3-systemd")


def field(deb: Path, name: str) -> str:
    return subprocess.run(["dpkg-deb", "-f", str(deb), name], capture_output=True, text=True, check=True).stdout.strip()


def contents(deb: Path) -> set[str]:
    listing = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True, check=True).stdout
    return {line.split()[-1].lstrip(".") for line in listing.splitlines()}


def test_changelog_version_is_the_projects_version() -> None:
    if shutil.which("dpkg-parsechangelog") is None:
        pytest.skip("dpkg-dev is not installed (packaging/install-build-deps)")
    changelog = subprocess.run(["dpkg-parsechangelog", "-l", str(REPO / "packaging/debian/changelog"), "-S", "Version"],
                               capture_output=True, text=True, check=True).stdout.strip()
    assert f'__version__ = "{changelog}"' in (REPO / "shared/__init__.py").read_text()


def test_both_packages_depend_on_debians_own_python_libraries(built_debs: dict[str, Path]) -> None:
    for deb in built_debs.values():
        assert field(deb, "Architecture") == "all"
        depends = field(deb, "Depends")
        for dependency in DEBIAN_DEPENDS:
            assert dependency in depends, f"{deb.name} lacks {dependency}"
    assert field(built_debs["outpost-agent"], "Recommends") == "python3-tpm2-pytss, python3-uvloop"


def test_agent_package_ships_only_the_agent_and_the_controller_package_is_self_contained(
    built_debs: dict[str, Path],
) -> None:
    agent = contents(built_debs["outpost-agent"])
    controller = contents(built_debs["outpost-controller"])
    assert {"/usr/bin/outpost-agent", "/lib/systemd/system/outpost-agent.service", "/etc/outpost/agent.toml",
            "/usr/lib/outpost-agent/agent/cli.py", "/usr/lib/outpost-agent/shared/protocol/connection.py",
            "/usr/lib/outpost-agent/shared/tunnel/session.py"} <= agent
    assert not any(p.startswith(("/usr/lib/outpost-agent/controller", "/usr/lib/outpost-agent/outpostctl")) for p in agent)
    assert {"/usr/bin/outpost-controller", "/usr/bin/outpostctl", "/lib/systemd/system/outpost-controller.service",
            "/usr/lib/outpost-controller/controller/cli.py", "/usr/lib/outpost-controller/outpostctl/cli.py",
            "/usr/lib/outpost-controller/agent/errors.py", "/usr/lib/outpost-controller/shared/errors.py",
            "/usr/lib/outpost-controller/shared/protocol/connection.py",
            "/usr/lib/outpost-controller/shared/tunnel/session.py"} <= controller
    # Both can be installed on one host: no path in common but shared directories.
    assert not {p for p in agent & controller if not p.endswith("/")} - {"/etc/outpost", "/usr/share/man/man1"}
    assert not any("__pycache__" in p for p in agent | controller)


@pytest.mark.slow
def test_lintian_finds_no_errors_or_warnings(built_debs: dict[str, Path]) -> None:
    if shutil.which("lintian") is None:
        pytest.skip("lintian is not installed (packaging/install-build-deps)")
    result = subprocess.run(["lintian", "--fail-on", "error,warning", *map(str, built_debs.values())],
                            capture_output=True, text=True, timeout=LINTIAN_TIMEOUT_SECONDS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not [line for line in result.stdout.splitlines() if line.startswith(("E:", "W:"))]
