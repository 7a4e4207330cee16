"""Fixtures for the outpostctl tests: one real controller per test module.

Starting a controller costs a CA and a TLS key, so a module shares one; tests
use distinct names so they do not see each other's objects. The machinery is
in harness.py.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.outpostctl.harness import Ctl, RunningController, start_controller, stop_process


@pytest.fixture(scope="module")
def controller(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningController]:
    running = start_controller(tmp_path_factory.mktemp("controller") / "data")
    try:
        yield running
    finally:
        stop_process(running.process)


@pytest.fixture
def ctl(controller: RunningController, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> Ctl:
    """Run ``outpostctl`` in this process against the module's controller."""
    monkeypatch.setenv("OUTPOSTCTL_CONFIG", str(controller.config_path))
    return Ctl(capsys)
