"""Fixtures for the enrollment tests: a throwaway CA and a controller double on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.agent.enrollment.fake_controller import FakeController, TestCA


@pytest.fixture(scope="session")
def ca() -> TestCA:
    return TestCA()


@pytest.fixture(scope="session")
def other_ca() -> TestCA:
    return TestCA("Someone else's CA")


@pytest.fixture
def controller(tmp_path: Path, ca: TestCA) -> Iterator[FakeController]:
    server = FakeController(tmp_path / "controller", ca).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def impostor(tmp_path: Path, ca: TestCA, other_ca: TestCA) -> Iterator[FakeController]:
    """Serves the right CA at /v1/ca but holds a TLS certificate from another CA."""
    server = FakeController(tmp_path / "impostor", ca, tls_ca=other_ca).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def token_file(tmp_path: Path):
    """Writes a token the way ops hand it over: the JWT and a newline."""

    def write(token: str, name: str = "outpost-token.txt") -> Path:
        path = tmp_path / name
        path.write_text(token + "\n")
        return path

    return write
