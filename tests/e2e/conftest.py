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


@pytest.fixture(scope="module")
def module_controller(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Controller]:
    """One controller for a module's tests that only add identities of their own names to it.

    A controller's start (a Python process, its CA and store) is seconds on a
    loaded machine; a test that restarts the controller, counts what is in its
    store or creates a service or policy by a fixed name takes ``controller``.
    """
    ctl = Controller(tmp_path_factory.mktemp("module-controller") / "controller")
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
