"""The state directory: enrollment is committed by identity.json, status is advisory."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from agent.errors import NotEnrolledError
from agent.identity.software import SoftwareKeyStore
from agent.identity.state import EnrolledIdentity, StateDir
from tests.agent.enrollment.fake_controller import TestCA

URI = "spiffe://outpost.test/default/pump-1"


@pytest.fixture(scope="module")
def ca() -> TestCA:
    return TestCA()


def identity_for(ca: TestCA, state_dir: Path) -> EnrolledIdentity:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    store = SoftwareKeyStore(state_dir)
    if not store.exists():
        store.create()
    cert = ca.issue(store.public_key(), "pump-1", [x509.UniformResourceIdentifier(URI)])
    return EnrolledIdentity(
        name="pump-1", tenant="default", uri=URI, controller_url="https://controller.example:8443",
        relays=["wss://relay.example/v1/tunnel"], ca_pem=ca.pem,
        cert_pem=cert.public_bytes(serialization.Encoding.PEM).decode(), key_backend="software",
        enrolled_at=1777636800.0,
    )


def test_a_fresh_directory_is_not_enrolled_and_says_how_to_enroll(tmp_path: Path):
    state = StateDir(tmp_path / "state")

    assert not state.is_enrolled()
    with pytest.raises(NotEnrolledError, match="not enrolled .*outpost-agent enroll --token FILE") as caught:
        state.load()
    assert caught.value.exit_code == 75


def test_a_saved_enrollment_loads_back_identically(tmp_path: Path, ca: TestCA):
    state = StateDir(tmp_path / "state")
    identity = identity_for(ca, state.path)

    state.save_enrollment(identity)

    assert state.is_enrolled()
    assert state.load() == identity
    assert state.load().not_after() == identity.not_after()
    record = json.loads((state.path / "identity.json").read_text())
    assert "BEGIN" not in json.dumps(record), "certificates live in their own files"


def test_without_identity_json_the_rest_does_not_count(tmp_path: Path, ca: TestCA):
    state = StateDir(tmp_path / "state")
    state.save_enrollment(identity_for(ca, state.path))
    (state.path / "identity.json").unlink()

    assert not state.is_enrolled()
    with pytest.raises(NotEnrolledError):
        state.load()


def test_a_damaged_identity_is_reported_not_crashed_on(tmp_path: Path, ca: TestCA):
    state = StateDir(tmp_path / "state")
    state.save_enrollment(identity_for(ca, state.path))
    (state.path / "identity.json").write_text("{not json")

    with pytest.raises(NotEnrolledError, match="is damaged .*enroll again"):
        state.load()


def test_a_replaced_certificate_is_stored_and_a_bad_one_never_replaces_the_old(tmp_path: Path, ca: TestCA):
    state = StateDir(tmp_path / "state")
    state.save_enrollment(identity_for(ca, state.path))
    renewed = identity_for(ca, state.path).cert_pem

    state.replace_certificate(renewed)
    assert state.load().cert_pem == renewed

    with pytest.raises(ValueError):
        state.replace_certificate("not a certificate")
    assert state.load().cert_pem == renewed
    assert [p.name for p in state.path.iterdir() if p.name.startswith(".")] == []


def test_status_round_trips_and_is_absent_until_written(tmp_path: Path):
    state = StateDir(tmp_path / "state")
    assert state.read_status() is None

    state.write_status({"state": "connected", "relay": "wss://relay.example/v1/tunnel", "rtt": 0.042})

    assert state.read_status() == {"state": "connected", "relay": "wss://relay.example/v1/tunnel", "rtt": 0.042}
    assert os.stat(state.path).st_mode & 0o777 == 0o700


def test_an_unreadable_status_is_reported_as_absent(tmp_path: Path):
    state = StateDir(tmp_path)
    (tmp_path / "status.json").write_text("[1, 2")

    assert state.read_status() is None
