"""The README's first command: the whole product on loopback, once."""

from __future__ import annotations

import subprocess
import sys

from tests.e2e.harness import ROOT, python_env


def test_quickstart_once_round_trips_bytes_and_says_so(tmp_path) -> None:
    result = subprocess.run([sys.executable, "-m", "outpostctl", "quickstart", "--once", "--dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=120, env=python_env(), cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[-1].startswith("quickstart ok"), result.stdout
    assert any("agent enrolled from demo-gateway.token as spiffe://" in line and "token retired" in line for line in lines)
    assert (tmp_path / "agent" / "identity.json").exists()
    assert not (tmp_path / "demo-gateway.token").exists()


def test_the_readme_quickstart_command_works_as_written() -> None:
    result = subprocess.run(["scripts/quickstart", "--once"], capture_output=True, text=True, timeout=600,
                            cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().splitlines()[-1].startswith("quickstart ok")
