"""Fixtures for the end-to-end tests; the machinery is in harness.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.agent.identity.swtpm_harness import Swtpm, running_swtpm
from tests.e2e.harness import Controller, EchoServer


@pytest.fixture
def controller(tmp_path: Path) -> Iterator[Controller]:
    ctl = Controller(tmp_path / "controller")
    try:
        yield ctl
    finally:
        ctl.process.stop()


@pytest.fixture
def echo_server() -> Iterator[EchoServer]:
    server = EchoServer()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def tpm(tmp_path: Path) -> Iterator[Swtpm]:
    """A fresh swtpm (socket mode, no resource manager), stopped after the test."""
    with running_swtpm(tmp_path / "swtpm") as chip:
        yield chip
