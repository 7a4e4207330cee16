"""Enrollment against the real ``outpost-controller serve`` on loopback, end to end.

The double in fake_controller.py plays the hostile and broken controllers;
this checks that the agent and the actual controller agree on docs/api.md.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.identity.state import StateDir
from shared.trust import verify_leaf_issued_by
from tests.agent.cli_helpers import one_line_error, run_cli
from tests.e2e.harness import Controller


@pytest.fixture
def real_controller(tmp_path: Path) -> Iterator[Controller]:
    controller = Controller(tmp_path / "controller")
    try:
        yield controller
    finally:
        controller.process.stop()


def test_a_token_from_outpostctl_enrolls_once_and_only_once(real_controller: Controller, tmp_path: Path):
    token = tmp_path / "pump-1.token"
    real_controller.ctl("identity", "create", "pump-1", "--token-out", str(token))
    kept = tmp_path / "kept-copy.token"  # enroll retires the file; someone kept a copy
    kept.write_bytes(token.read_bytes())

    first = run_cli("enroll", "--token", token, "--state", tmp_path / "gw1", "--keystore", "software")

    assert first.returncode == 0, first.stderr
    identity = StateDir(tmp_path / "gw1").load()
    assert first.stdout.startswith(f"enrolled as {identity.uri}; certificate valid until ")
    assert identity.name == "pump-1" and identity.controller_url == real_controller.url
    assert identity.relays, "the controller names at least one relay"
    assert verify_leaf_issued_by(identity.certificate(), identity.ca_certificate())
    assert (real_controller.data / "ca" / "ca.pem").read_text().strip() == identity.ca_pem.strip()

    assert not token.exists()
    replay = run_cli("enroll", "--token", kept, "--state", tmp_path / "gw2", "--keystore", "software")

    assert replay.returncode == 65
    assert "already used" in one_line_error(replay)
    assert not StateDir(tmp_path / "gw2").is_enrolled()
