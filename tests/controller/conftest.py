"""Fixtures for the controller's tests; helpers live in harness.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.store import Store

# The PostgreSQL fixtures live beside the server they start; imported here for every controller test.
from tests.controller.postgres_harness import postgres, postgres_url  # noqa: F401


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "controller"


@pytest.fixture(params=["asyncio", "uvloop"])
def loop_name(request: pytest.FixtureRequest) -> str:
    """Both event loops the controller runs on; uvloop only where it is installed."""
    if request.param == "uvloop":
        pytest.importorskip("uvloop", reason="uvloop is not installed (python3-uvloop)")
    return request.param


@pytest.fixture(params=["sqlite", "postgresql"])
def store_location(request: pytest.FixtureRequest, tmp_path: Path) -> str | Path:
    """Where a test's store lives, once on each engine: an SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return tmp_path / "store.sqlite3"
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest) -> str | None:
    """``Settings.store_url`` once per engine: None (the data directory's SQLite file) or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return None
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture
def store(store_location: str | Path) -> Iterator[Store]:
    """An open store at ``store_location`` (each engine in turn), closed after the test."""
    store = Store(store_location)
    yield store
    store.close()
