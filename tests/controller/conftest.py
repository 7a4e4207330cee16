"""Fixtures for the controller's tests; helpers live in harness.py."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "controller"


@pytest.fixture(params=["asyncio", "uvloop"])
def loop_name(request: pytest.FixtureRequest) -> str:
    """Both event loops the controller runs on; uvloop only where it is installed."""
    if request.param == "uvloop":
        pytest.importorskip("uvloop", reason="uvloop is not installed (python3-uvloop)")
    return request.param
