"""What a real process asks of the file system, in order, as strace records it.

A crash test with SIGKILL cannot show that data reaches the disk (the page
cache survives a killed process, not a power cut). What can be shown is the
order of the calls that make it durable: the new file flushed before it is
renamed into place, the directory flushed after the rename and before the
next step, a new directory flushed into its parent before anything is put in
it. ``durability_faults`` checks exactly that on a recorded trace.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

STRACE = shutil.which("strace")
RENAMES = frozenset({"rename", "renameat", "renameat2"})
MKDIRS = frozenset({"mkdir", "mkdirat"})
FLUSHES = frozenset({"fsync", "fdatasync"})
UNLINKS = frozenset({"unlink", "unlinkat"})
#: Every call the checks look at; nothing else is recorded, so a trace stays small.
TRACED = ",".join(sorted(RENAMES | MKDIRS | FLUSHES | UNLINKS))

# `fsync(3</a/b>) = 0`, `renameat2(AT_FDCWD</cwd>, "/a", AT_FDCWD</cwd>, "/b", 0) = 0`
_LINE = re.compile(r"^(?P<name>\w+)\((?P<args>.*)\)\s+=\s+(?P<result>-?\d+)")
_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')
_FD_PATH = re.compile(r"^\d+<(?P<path>[^>]*)>")


@dataclass(frozen=True)
class Call:
    """One successful call: its name and the paths it named (fd paths for fsync)."""

    thread: int
    name: str
    paths: tuple[str, ...]


def require_strace() -> str:
    if STRACE is None:
        pytest.skip("strace is not installed (Debian package: strace; scripts/setup installs it)")
    return STRACE


def traced_run(argv: Sequence[str], *, env: dict | None = None, timeout: float = 60.0,
               cwd: Path | None = None) -> tuple[subprocess.CompletedProcess, list[Call]]:
    """Run ``argv`` under strace (all threads and children); its result and its calls in order per thread."""
    strace = require_strace()
    with tempfile.TemporaryDirectory(prefix="outpost-strace-") as scratch:
        prefix = Path(scratch) / "trace"
        # -ff: one file per thread, so no call is split into "unfinished ... resumed" halves.
        # -y: a descriptor is printed with the path it refers to.
        result = subprocess.run(
            [strace, "-f", "-ff", "-y", "-qq", "-e", f"trace={TRACED}", "-o", str(prefix), *argv],
            capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd,
        )
        calls: list[Call] = []
        for part in sorted(Path(scratch).glob("trace.*")):
            thread = int(part.suffix[1:])
            calls.extend(_parse(part.read_text(errors="replace"), thread, cwd or Path.cwd()))
    return result, calls


def _parse(text: str, thread: int, cwd: Path) -> list[Call]:
    calls = []
    for line in text.splitlines():
        match = _LINE.match(line)
        if match is None or int(match["result"]) < 0:
            continue
        name, args = match["name"], match["args"]
        if name in FLUSHES:
            fd = _FD_PATH.match(args)
            paths: tuple[str, ...] = (fd["path"],) if fd else ()
        else:
            paths = tuple(os.path.normpath(cwd / _unescape(quoted)) for quoted in _QUOTED.findall(args))
        calls.append(Call(thread, name, paths))
    return calls


def _unescape(quoted: str) -> str:
    return quoted.encode().decode("unicode_escape")


def renamed_into(calls: Sequence[Call], directory: Path) -> list[str]:
    """Names of the files renamed into ``directory``, in order."""
    directory = Path(os.path.normpath(directory))
    return [Path(c.paths[-1]).name for c in calls if c.name in RENAMES and Path(c.paths[-1]).parent == directory]


def durability_faults(calls: Sequence[Call], under: Path) -> list[str]:
    """One sentence for every rename or mkdir at or below ``under`` that was not made durable in order.

    A rename must follow an fsync of the file renamed, and be followed by an
    fsync of its directory before the next rename or mkdir in that thread; a
    new directory must be flushed into its parent before anything is renamed
    into it.
    """
    root = os.path.normpath(under)
    faults = []
    by_thread: dict[int, list[Call]] = {}
    for call in calls:
        by_thread.setdefault(call.thread, []).append(call)
    for thread_calls in by_thread.values():
        for index, call in enumerate(thread_calls):
            if not call.paths or not _below(call.paths[-1], root):
                continue
            before, after = thread_calls[:index], thread_calls[index + 1:]
            if call.name in RENAMES:
                source, target = call.paths[0], call.paths[-1]
                if not any(c.name in FLUSHES and c.paths == (source,) for c in before):
                    faults.append(f"{target} was renamed into place from {source} without flushing it first")
                if not _flushed_before_next_step(after, os.path.dirname(target)):
                    faults.append(f"the rename to {target} was not followed by a flush of its directory")
            elif call.name in MKDIRS:
                if not _flushed_before_next_step(after, os.path.dirname(call.paths[-1])):
                    faults.append(f"the new directory {call.paths[-1]} was not flushed into its parent")
    return faults


def _flushed_before_next_step(after: Sequence[Call], directory: str) -> bool:
    for call in after:
        if call.name in FLUSHES and call.paths == (directory,):
            return True
        if call.name in RENAMES | MKDIRS:
            return False
    return False


def _below(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")
