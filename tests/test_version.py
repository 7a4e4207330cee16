"""``--version`` of every command prints the one version of Outpost (shared/__init__.py) and exits 0."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from shared import __version__

ROOT = Path(__file__).resolve().parents[1]
#: A Python start-up and an argparse run; generous for a loaded machine.
CLI_TIMEOUT_SECONDS = 60.0


@pytest.mark.parametrize("command, module", [
    ("outpost-agent", "agent"),
    ("outpost-controller", "controller.cli"),
    ("outpostctl", "outpostctl"),
])
def test_every_command_prints_the_package_version(command: str, module: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-m", module, "--version"], capture_output=True, text=True,
                          timeout=CLI_TIMEOUT_SECONDS, env=env, cwd=ROOT)
    assert (done.returncode, done.stdout, done.stderr) == (0, f"{command} {__version__}\n", "")


def test_the_version_lives_in_one_place() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and project["project"]["dynamic"] == ["version"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "shared.__version__"}
    assert __version__.count(".") == 2
