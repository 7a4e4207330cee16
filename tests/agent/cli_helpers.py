"""Runs ``python -m agent.cli`` as a subprocess, the way a technician or systemd does."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
#: A CLI command that talks to loopback only; far above what any of them needs.
CLI_TIMEOUT = 60


def run_cli(*args: str | os.PathLike, stdin: Any = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *map(str, args)],
        capture_output=True, text=True, timeout=CLI_TIMEOUT, cwd=ROOT, env=env, stdin=stdin,
    )


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """The single stderr line of a failed command (asserts there is exactly one)."""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got: {result.stderr!r}"
    assert lines[0].startswith("outpost-agent: "), lines[0]
    assert "Traceback" not in result.stderr
    return lines[0]


def doctor_lines(output: str) -> dict[str, tuple[str, str]]:
    """``outpost-agent doctor``'s text output as name -> (status, sentence)."""
    found = {}
    for line in output.splitlines():
        status, name, message = re.fullmatch(r"(\w+) +(\S+(?: \S+)*)  +(.*)", line).groups()
        found[name] = (status, message)
    return found
