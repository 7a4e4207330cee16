"""Fixtures for the key store tests; the software TPM itself is in swtpm_harness.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.agent.identity.swtpm_harness import (
    LOOPBACK,
    Swtpm,
    closed_port,
    counted_swtpm,  # noqa: F401  (a fixture, shared with tests/e2e)
    started_swtpm,
)


@pytest.fixture
def swtpm(tmp_path: Path) -> Iterator[Swtpm]:
    """A fresh, started swtpm with its own state, stopped after the test."""
    tpm = started_swtpm(tmp_path / "swtpm")
    try:
        yield tpm
    finally:
        tpm.stop()


@pytest.fixture
def closed_tcti() -> str:
    """A swtpm TCTI pointing at a loopback port where nothing listens: an absent TPM."""
    return f"swtpm:host={LOOPBACK},port={closed_port()}"


@pytest.fixture
def key_dir(tmp_path: Path) -> Path:
    """An empty state directory for the agent, owner-only like the real one."""
    path = tmp_path / "state"
    path.mkdir(mode=0o700)
    return path
