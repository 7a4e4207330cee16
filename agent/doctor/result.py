"""One line of ``outpost-agent doctor``: a name, a status and the sentence (agent.doctor.checks)."""

from __future__ import annotations

from dataclasses import dataclass

OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skip"


@dataclass(frozen=True)
class Check:
    """One result line: ``status`` is ok, warn, fail or skip (not applicable)."""

    name: str
    status: str
    message: str
