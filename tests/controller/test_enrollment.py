"""Enrollment: a token is redeemed once, for one key; every bad token changes nothing."""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import hmac
import json
import secrets
import threading
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from controller.audit import AnonymousBudget
from controller.bootstrap import open_data_dir
from controller.ca import NOT_BEFORE_BACKDATE, CertificateAuthority, not_after_of, not_before_of
from controller.errors import ControllerError
from controller.settings import Settings
from controller.tokens import AUDIENCE
from tests.controller.harness import (
    Running,
    audit_events_added,
    b64url,
    b64url_json,
    make_csr,
    make_key,
    run,
    running_controller,
    store_snapshot,
    token_parts,
)


def signed_claims(running: Running, **changes: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {
        "iss": running.url, "aud": AUDIENCE, "sub": "gw", "tnt": "default", "jti": secrets.token_hex(16),
        "iat": now, "exp": now + 3600, "ca": running.context.ca.fingerprint,
    }
    claims.update(changes)
    return claims


def sign_with(ca: CertificateAuthority, claims: dict[str, Any], kid: str) -> str:
    return jwt.encode(claims, ca.private_key, algorithm="ES256", headers={"kid": kid})


def expired_token(running: Running, token: str) -> str:
    _, claims, _ = token_parts(token)
    past = int(time.time()) - 3600
    claims.update(iat=past - 60, exp=past)
    return sign_with(running.context.ca, claims, running.context.ca.fingerprint)


def tampered_token(running: Running, token: str) -> str:
    header, claims, signature = token.split(".")
    _, decoded, _ = token_parts(token)
    decoded["sub"] = "another-gateway"
    return f"{header}.{b64url_json(decoded)}.{signature}"


def other_ca_token(running: Running, token: str) -> str:
    _, claims, _ = token_parts(token)
    other = CertificateAuthority.create()
    return sign_with(other, claims, running.context.ca.fingerprint)


def other_ca_own_kid_token(running: Running, token: str) -> str:
    _, claims, _ = token_parts(token)
    other = CertificateAuthority.create()
    return sign_with(other, {**claims, "ca": other.fingerprint}, other.fingerprint)


def alg_none_token(running: Running, token: str) -> str:
    _, claims, _ = token_parts(token)
    return f"{b64url_json({'alg': 'none', 'typ': 'JWT'})}.{b64url_json(claims)}."


def hs256_with_public_key_token(running: Running, token: str) -> str:
    _, claims, _ = token_parts(token)
    secret = running.context.ca.private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = {"alg": "HS256", "typ": "JWT", "kid": running.context.ca.fingerprint}
    signing_input = f"{b64url_json(header)}.{b64url_json(claims)}"
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(mac)}"


def unknown_jti_token(running: Running, token: str) -> str:
    return sign_with(running.context.ca, signed_claims(running), running.context.ca.fingerprint)


def wrong_audience_token(running: Running, token: str) -> str:
    return sign_with(running.context.ca, signed_claims(running, aud="something-else"), running.context.ca.fingerprint)


#: case -> (forge, error code, phrase of the message, whether the signature verified so the audit names the identity)
BAD_TOKENS = {
    "expired": (expired_token, "token_expired", "expired", False),
    "tampered_payload": (tampered_token, "token_signature", "signature", False),
    "signed_by_another_ca": (other_ca_token, "token_signature", "signature", False),
    "another_controllers_token": (other_ca_own_kid_token, "token_signature", "another controller", False),
    "alg_none": (alg_none_token, "token_signature", "ES256", False),
    "hs256_keyed_with_ca_public_key": (hs256_with_public_key_token, "token_signature", "ES256", False),
    "malformed": (lambda running, token: "not.a-token", "token_malformed", "not a valid", False),
    "empty": (lambda running, token: "", "token_malformed", "missing", False),
    "unknown_jti": (unknown_jti_token, "token_unknown", "no record", True),
    "wrong_audience": (wrong_audience_token, "token_malformed", "enrollment token", False),
}


def refusal(code: str, identity: str | None = None) -> tuple[str, dict]:
    """The one audit event a refused enrollment from this test's client leaves."""
    fields = {"reason": code, "remote": "127.0.0.1"}
    if identity is not None:
        fields["identity"] = identity
    return ("enrollment_refused", fields)


def assert_no_secret_in(events: list[tuple[str, dict]], *secrets_: str) -> None:
    text = json.dumps(events)
    for secret in secrets_:
        assert secret and secret not in text


@pytest.mark.parametrize("case", sorted(BAD_TOKENS))
def test_every_bad_token_is_refused_with_its_code_and_changes_nothing_but_one_audit_event(
    data_dir: Path, case: str
) -> None:
    forge, code, phrase, verified = BAD_TOKENS[case]

    async def scenario() -> None:
        async with running_controller(data_dir) as running:
            created = await running.create_identity("gw")
            forged = forge(running, created["token"])
            before = store_snapshot(running.context.settings.store_path)
            status, body = await running.enroll(forged, make_key())
            after = store_snapshot(running.context.settings.store_path)
            assert status in (400, 403), body
            assert body["error"] == code
            assert phrase in body["message"]
            assert body["message"].endswith(".")
            added = audit_events_added(before, after)
            assert added == [refusal(code, "default/gw" if verified else None)]
            assert_no_secret_in(added, created["token"], token_parts(created["token"])[1]["jti"],
                                *([forged] if forged else []))
            assert running.context.registry.get_identity("default", "gw").status == "created"

    run(scenario())


def test_a_flood_of_refused_enrollments_is_recorded_within_a_budget_and_counted_beyond_it(data_dir: Path) -> None:
    now = [1000.0]
    budget = AnonymousBudget(per_minute=3, clock=lambda: now[0])

    async def scenario() -> None:
        async with running_controller(data_dir) as running:
            running.context.audit.anonymous_budget = budget
            before = store_snapshot(running.context.settings.store_path)
            for _ in range(5):
                status, body = await running.enroll("not.a-token", make_key())
                assert (status, body["error"]) == (400, "token_malformed")
            assert audit_events_added(before, store_snapshot(running.context.settings.store_path)) == [
                refusal("token_malformed")
            ] * 3
            now[0] += 20.0  # a third of a minute: one more event may be recorded
            before = store_snapshot(running.context.settings.store_path)
            await running.enroll("", make_key())
            await running.enroll("", make_key())
            event, fields = refusal("token_malformed")
            assert audit_events_added(before, store_snapshot(running.context.settings.store_path)) == [
                (event, {**fields, "suppressed": 2})
            ]

    run(scenario())


def test_a_used_token_with_another_key_is_refused_and_changes_nothing_but_one_audit_event(data_dir: Path) -> None:
    async def scenario() -> None:
        async with running_controller(data_dir) as running:
            token = (await running.create_identity("gw"))["token"]
            status, _ = await running.enroll(token, make_key())
            assert status == 200
            before = store_snapshot(running.context.settings.store_path)
            status, body = await running.enroll(token, make_key())
            assert (status, body["error"]) == (409, "token_used")
            assert "already used" in body["message"]
            added = audit_events_added(before, store_snapshot(running.context.settings.store_path))
            assert added == [refusal("token_used", "default/gw")]
            assert_no_secret_in(added, token, token_parts(token)[1]["jti"])

    run(scenario())


def csr_with_broken_signature() -> str:
    der = bytearray(x509.load_pem_x509_csr(make_csr(make_key()).encode()).public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01
    return x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM).decode()


def csr_with_p384_key() -> str:
    from cryptography.hazmat.primitives.asymmetric import ec

    return make_csr(ec.generate_private_key(ec.SECP384R1()))


BAD_CSRS = {
    "not_pem": lambda: "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
    "missing": lambda: None,
    "broken_signature": csr_with_broken_signature,
    "not_p256": csr_with_p384_key,
}


@pytest.mark.parametrize("case", sorted(BAD_CSRS))
def test_a_bad_csr_is_refused_and_leaves_the_token_unused(data_dir: Path, case: str) -> None:
    async def scenario() -> None:
        async with running_controller(data_dir) as running:
            token = (await running.create_identity("gw"))["token"]
            before = store_snapshot(running.context.settings.store_path)
            csr = BAD_CSRS[case]()
            status, body = await running.call("POST", "/v1/enroll", {"token": token, "csr": csr}, admin=False)
            assert (status, body["error"]) == (400, "csr_invalid"), body
            added = audit_events_added(before, store_snapshot(running.context.settings.store_path))
            assert added == [refusal("csr_invalid", "default/gw")]
            status, _ = await running.enroll(token, make_key())
            assert status == 200

    run(scenario())


def test_enrollment_returns_certificate_ca_identity_and_relays(data_dir: Path) -> None:
    async def scenario() -> None:
        async with running_controller(data_dir) as running:
            token = (await running.create_identity("gw", roles=["plc"]))["token"]
            key = make_key()
            status, body = await running.enroll(token, key)
            assert status == 200, body
            assert body["identity"] == "spiffe://outpost.local/default/gw"
            assert (body["name"], body["tenant"]) == ("gw", "default")
            assert body["ca"] == running.context.ca.certificate_pem
            assert body["relays"] == [running.url.replace("https://", "wss://") + "/v1/tunnel"]
            cert = x509.load_pem_x509_certificate(body["certificate"].encode())
            assert cert.public_key().public_numbers() == key.public_key().public_numbers()
            assert body["not_after"] == int(not_after_of(cert).timestamp())
            identity = running.context.registry.get_identity("default", "gw")
            assert identity.status == "enrolled" and identity.cert_not_after == pytest.approx(body["not_after"], abs=1)
            events = [e["event"] for e in running.context.audit.recent()]
            assert events[-1] == "enrollment"

    run(scenario())


def test_issued_certificate_names_the_identity_is_backdated_and_is_for_client_auth(data_dir: Path) -> None:
    async def scenario() -> None:
        async with running_controller(data_dir, cert_lifetime=7200) as running:
            token = (await running.create_identity("gw"))["token"]
            started = datetime.datetime.now(datetime.UTC)
            status, body = await running.enroll(token, make_key())
            assert status == 200
            cert = x509.load_pem_x509_certificate(body["certificate"].encode())
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://outpost.local/default/gw"]
            assert cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == "gw"
            backdate = started - not_before_of(cert)
            assert NOT_BEFORE_BACKDATE - datetime.timedelta(seconds=5) <= backdate <= NOT_BEFORE_BACKDATE + datetime.timedelta(seconds=5)
            lifetime = not_after_of(cert) - started
            assert abs(lifetime.total_seconds() - 7200) < 10
            eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
            assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
            assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
            assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature
            assert cert.issuer == running.context.ca.certificate.subject
            cert_serial = format(cert.serial_number, "x")
            rows = running.context.store.query("SELECT * FROM certificates WHERE serial = ?", (cert_serial,))
            assert len(rows) == 1 and rows[0]["name"] == "gw"

    run(scenario())


def test_same_key_retry_of_a_used_token_returns_a_fresh_certificate(data_dir: Path) -> None:
    async def scenario() -> None:
        async with running_controller(data_dir) as running:
            token = (await running.create_identity("gw"))["token"]
            key = make_key()
            first_status, first = await running.enroll(token, key)
            second_status, second = await running.enroll(token, key)
            assert (first_status, second_status) == (200, 200)
            one = x509.load_pem_x509_certificate(first["certificate"].encode())
            two = x509.load_pem_x509_certificate(second["certificate"].encode())
            assert one.serial_number != two.serial_number
            assert two.public_key().public_numbers() == key.public_key().public_numbers()

    run(scenario())


def test_concurrent_redemptions_over_https_let_exactly_one_key_enroll(data_dir: Path, store_url: str | None) -> None:
    async def scenario() -> None:
        async with running_controller(data_dir, store_url=store_url) as running:
            token = (await running.create_identity("gw"))["token"]
            results = await asyncio.gather(*(running.enroll(token, make_key()) for _ in range(20)))
            statuses = sorted(status for status, _ in results)
            assert statuses == [200] + [409] * 19
            assert all(body["error"] == "token_used" for status, body in results if status == 409)
            certificates = running.context.store.query("SELECT * FROM certificates WHERE name = 'gw'")
            assert len(certificates) == 1
            events = [e for e in running.context.audit.recent() if e["event"].startswith("enrollment")]
            assert sorted(e["event"] for e in events) == ["enrollment"] + ["enrollment_refused"] * 19

    run(scenario())


def test_concurrent_redemptions_from_separate_processes_views_of_the_store_let_exactly_one_enroll(
    data_dir: Path, store_url: str | None
) -> None:
    # Separate connections to one store: how several controller processes share it.
    settings = Settings(data_dir=data_dir, listen_port=8443, store_url=store_url)
    first = open_data_dir(settings)
    with first.store.transaction() as db:
        identity = first.registry.create_identity_in(db, "default", "gw", ())
        token, _ = first.tokens.create_in(db, identity, 3600)
    contexts = [first] + [open_data_dir(settings) for _ in range(7)]
    barrier = threading.Barrier(len(contexts))
    outcomes: list[str] = []
    lock = threading.Lock()

    def redeem(context: Any) -> None:
        csr = make_csr(make_key())
        barrier.wait(timeout=10)
        try:
            context.enrollment.enroll(token, csr)
            outcome = "enrolled"
        except ControllerError as error:
            outcome = error.code
        with lock:
            outcomes.append(outcome)

    threads = [threading.Thread(target=redeem, args=(c,)) for c in contexts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    for context in contexts:
        context.close()
    assert sorted(outcomes) == ["enrolled"] + ["token_used"] * 7


def test_a_revoked_identity_cannot_enroll_with_its_old_token(data_dir: Path) -> None:
    async def scenario() -> None:
        async with running_controller(data_dir) as running:
            token = (await running.create_identity("gw"))["token"]
            status, _ = await running.call("POST", "/api/v1/identities/gw/revoke")
            assert status == 200
            before = store_snapshot(running.context.settings.store_path)
            status, body = await running.enroll(token, make_key())
            assert (status, body["error"]) == (403, "identity_revoked")
            added = audit_events_added(before, store_snapshot(running.context.settings.store_path))
            assert added == [refusal("identity_revoked", "default/gw")]

    run(scenario())


def test_ca_and_time_are_served_without_credentials(data_dir: Path) -> None:
    async def scenario() -> None:
        async with running_controller(data_dir) as running:
            async with running.session.get(running.url + "/v1/ca") as response:
                assert response.status == 200
                assert response.content_type == "application/x-pem-file"
                assert await response.text() == running.context.ca.certificate_pem
            status, body = await running.call("GET", "/v1/time", admin=False)
            assert status == 200 and abs(body["time"] - time.time()) < 5

    run(scenario())
