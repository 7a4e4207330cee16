"""Enrollment against a controller on loopback: what gets stored, and what never does."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from agent.enrollment.enroll import enroll
from agent.errors import ControllerUnreachable, EnrollmentError, TokenError, TrustError
from agent.identity.select import KeyStoreSettings
from agent.identity.software import SoftwareKeyStore
from agent.identity.state import StateDir
from shared.trust import cert_not_after, verify_leaf_issued_by
from tests.agent.enrollment.fake_controller import unused_loopback_port

SOFTWARE = KeyStoreSettings(backend="software")


def snapshot(directory: Path) -> dict[str, bytes]:
    if not directory.exists():
        return {}
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def spki(key) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def test_enrollment_stores_identity_certificate_and_pinned_ca(controller, ca, state_dir, token_file):
    identity = enroll(token_file(controller.token(sub="pump-7", tnt="plant-a")), state_dir, SOFTWARE)

    assert identity.uri == "spiffe://outpost.test/plant-a/pump-7"
    assert (identity.name, identity.tenant, identity.key_backend) == ("pump-7", "plant-a", "software")
    assert identity.controller_url == controller.url
    assert identity.relays == [f"wss://127.0.0.1:{controller.port}/v1/tunnel"]
    loaded = StateDir(state_dir).load()
    assert loaded == identity
    assert loaded.ca_pem == ca.pem
    cert = loaded.certificate()
    assert verify_leaf_issued_by(cert, ca.cert)
    assert spki(cert.public_key()) == spki(SoftwareKeyStore(state_dir).public_key())
    assert cert_not_after(cert).timestamp() > time.time()
    assert os.stat(state_dir / "key.pem").st_mode & 0o777 == 0o600
    assert json.loads((state_dir / "identity.json").read_text())["uri"] == identity.uri


def test_enrolling_an_enrolled_gateway_is_refused_and_changes_nothing(controller, state_dir, token_file):
    first = enroll(token_file(controller.token()), state_dir, SOFTWARE)
    before = snapshot(state_dir)

    with pytest.raises(EnrollmentError, match=f"already enrolled as {first.uri}; .*remove the state directory"):
        enroll(token_file(controller.token(sub="other"), "second.txt"), state_dir, SOFTWARE)

    assert snapshot(state_dir) == before
    assert controller.enroll_requests == 1


def test_retry_after_a_crash_redeems_the_same_token_with_the_same_key(controller, state_dir, token_file):
    token = token_file(controller.token())
    first = enroll(token, state_dir, SOFTWARE)
    # The controller consumed the token, then the gateway lost power before committing.
    for name in ("identity.json", "cert.pem", "ca.pem"):
        (state_dir / name).unlink()

    second = enroll(token, state_dir, SOFTWARE)

    assert spki(second.certificate().public_key()) == spki(first.certificate().public_key())
    assert StateDir(state_dir).is_enrolled()


def test_a_consumed_token_with_a_new_key_gives_the_controllers_sentence_and_no_identity(controller, tmp_path, token_file):
    token = token_file(controller.token())
    enroll(token, tmp_path / "first", SOFTWARE)

    with pytest.raises(TokenError, match="^This enrollment token was already used; ask central ops for a new one.$"):
        enroll(token, tmp_path / "second", SOFTWARE)

    assert not StateDir(tmp_path / "second").is_enrolled()
    assert (tmp_path / "second" / "key.pem").exists(), "the key stays for a retry"


def test_a_controller_refusal_is_reported_in_its_own_words_and_keeps_the_key(controller, state_dir, token_file):
    controller.behaviour.refusal = (403, {"error": "identity_revoked", "message": "This identity was revoked; ask central ops."})

    with pytest.raises(EnrollmentError, match="^This identity was revoked; ask central ops.$") as caught:
        enroll(token_file(controller.token()), state_dir, SOFTWARE)

    assert not isinstance(caught.value, TokenError)
    assert set(snapshot(state_dir)) == {"key.pem"}
    key_before = (state_dir / "key.pem").read_bytes()
    controller.behaviour.refusal = None
    enroll(token_file(controller.token(), "again.txt"), state_dir, SOFTWARE)
    assert (state_dir / "key.pem").read_bytes() == key_before


def test_a_server_error_without_json_is_retryable(controller, state_dir, token_file):
    controller.behaviour.refusal = (503, {})

    with pytest.raises(ControllerUnreachable, match="failed \\(HTTP 503\\); try again later") as caught:
        enroll(token_file(controller.token()), state_dir, SOFTWARE)

    assert caught.value.retryable
    assert not StateDir(state_dir).is_enrolled()


def test_a_controller_serving_another_ca_fails_on_the_fingerprint_before_anything_is_stored(
    controller, other_ca, state_dir, token_file
):
    controller.behaviour.served_ca = other_ca

    with pytest.raises(TrustError, match=f"^wrong CA fingerprint: the controller at {controller.url} serves a CA with {other_ca.fingerprint}"):
        enroll(token_file(controller.token()), state_dir, SOFTWARE)

    assert snapshot(state_dir) == {}
    assert controller.enroll_requests == 0


def test_a_tls_certificate_from_another_ca_is_refused_in_plain_words_and_the_token_is_never_sent(
    impostor, state_dir, token_file
):
    with pytest.raises(TrustError) as caught:
        enroll(token_file(impostor.token()), state_dir, SOFTWARE)

    assert str(caught.value) == (
        f"the controller at {impostor.url} presented a certificate not issued by the CA pinned from "
        "your token; check the token or the address"
    )
    assert impostor.enroll_requests == 0
    assert not StateDir(state_dir).is_enrolled()


def test_an_expired_token_is_refused_with_its_date_before_it_is_sent(controller, state_dir, token_file):
    token = controller.token(exp=1777636800, iat=1777000000)  # 2026-05-01 12:00 UTC

    with pytest.raises(TokenError, match="^this token expired on 2026-05-01 12:00 UTC; ask central ops for a new one"):
        enroll(token_file(token), state_dir, SOFTWARE, now=1777636800 + 60)

    assert controller.enroll_requests == 0
    assert snapshot(state_dir) == {}


def test_expiry_is_judged_by_the_trusted_time_passed_in(controller, state_dir, token_file):
    token = controller.token(ttl=3600)

    with pytest.raises(TokenError, match="expired"):
        enroll(token_file(token), state_dir, SOFTWARE, now=time.time() + 7200)


def test_a_controller_that_is_down_is_retryable_and_named(ca, state_dir, token_file):
    url = f"https://127.0.0.1:{unused_loopback_port()}"

    with pytest.raises(ControllerUnreachable, match=f"^could not reach the controller at {url}/v1/ca ") as caught:
        enroll(token_file(ca.token(url)), state_dir, SOFTWARE)

    assert caught.value.retryable and caught.value.exit_code == 69
    assert snapshot(state_dir) == {}


def test_a_certificate_for_another_key_is_not_stored(controller, state_dir, token_file):
    controller.behaviour.certify_other_key = True

    with pytest.raises(EnrollmentError, match="certificate for another key"):
        enroll(token_file(controller.token()), state_dir, SOFTWARE)

    assert not StateDir(state_dir).is_enrolled()


def test_an_oversized_answer_is_refused(controller, state_dir, token_file):
    controller.behaviour.oversized_answer = True

    with pytest.raises(EnrollmentError, match="larger than 65536 bytes"):
        enroll(token_file(controller.token()), state_dir, SOFTWARE)

    assert not StateDir(state_dir).is_enrolled()


def test_a_token_signed_by_another_key_is_refused_before_it_is_sent(controller, other_ca, state_dir, token_file):
    forged = controller.ca.token(controller.url, key=other_ca.key)

    with pytest.raises(TokenError, match="signature does not match the controller's CA key"):
        enroll(token_file(forged), state_dir, SOFTWARE)

    assert controller.enroll_requests == 0


def test_a_corrupt_key_left_by_an_unfinished_enrollment_is_replaced(controller, state_dir, token_file):
    state_dir.mkdir()
    (state_dir / "key.pem").write_text("not a key\n")

    identity = enroll(token_file(controller.token()), state_dir, SOFTWARE)

    assert spki(identity.certificate().public_key()) == spki(SoftwareKeyStore(state_dir).public_key())


def test_a_certificate_for_another_host_name_is_refused_in_plain_words(controller, ca, state_dir, token_file):
    # The double's certificate names 127.0.0.1 only; "localhost" reaches it but is not in it.
    url = f"https://localhost:{controller.port}"

    with pytest.raises(TrustError, match=f"^the controller at {url} presented a certificate for another host name"):
        enroll(token_file(ca.token(url)), state_dir, SOFTWARE)

    assert controller.enroll_requests == 0
    assert not StateDir(state_dir).is_enrolled()
