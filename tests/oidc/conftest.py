"""The test identity provider as a fixture: started on 127.0.0.1, stopped after the test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import EchoServer
from tests.oidc.harness import IdP, node_missing, start_provider


@pytest.fixture
def idp(tmp_path: Path) -> Iterator[IdP]:
    reason = node_missing()
    if reason is not None:
        pytest.skip(reason)
    directory = tmp_path / "idp"
    directory.mkdir()
    provider = start_provider(directory)
    try:
        yield provider
    finally:
        provider.stop()


@pytest.fixture
def echo_server() -> Iterator[EchoServer]:
    server = EchoServer()
    try:
        yield server
    finally:
        server.close()
