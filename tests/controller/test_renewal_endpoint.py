"""POST /v1/renew: a proven enrolled key gets a new certificate; anything else changes nothing."""

from __future__ import annotations

import time
from pathlib import Path

from cryptography import x509

from controller.ca import certificate_sha256, public_key_sha256
from controller.registry import STATUS_ENROLLED, Identity
from controller.renewal import RECOVERY, RENEWAL, RenewalRefused, renewal_decision
from tests.controller.harness import audit_events_added, make_csr, make_key, run, running_controller, store_snapshot

DAY = 86400.0


async def _enrolled(running, name: str = "gw"):
    created = await running.create_identity(name)
    key = make_key()
    status, body = await running.enroll(created["token"], key, name)
    assert status == 200, body
    return key, body


async def _renew(running, key) -> tuple[int, dict]:
    return await running.call("POST", "/v1/renew", {"csr": make_csr(key)}, admin=False)


def _without_audit(snapshot: dict) -> dict:
    return {table: rows for table, rows in snapshot.items() if table != "audit"}


def test_a_valid_certificate_is_renewed_for_the_same_key(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "c") as running:
            key, enrolled = await _enrolled(running)
            status, body = await _renew(running, key)
            assert status == 200, body
            cert = x509.load_pem_x509_certificate(body["certificate"].encode())
            old = x509.load_pem_x509_certificate(enrolled["certificate"].encode())
            assert public_key_sha256(cert.public_key()) == public_key_sha256(key.public_key())
            assert cert.serial_number != old.serial_number
            assert body["identity"] == enrolled["identity"] and body["ca"] == enrolled["ca"]
            event = running.context.audit.recent()[-1]
            assert event["event"] == "renewal"
            assert event["fields"]["identity"] == "default/gw"
            assert event["fields"]["serial"] == format(cert.serial_number, "x")
            assert event["fields"]["correlation"].startswith("r-")  # the renewal request's own id
            row = running.context.store.query_one("SELECT purpose, der_sha256 FROM certificates WHERE serial = ?",
                                                   (format(cert.serial_number, "x"),))
            assert row["purpose"] == "renewal"
            assert row["der_sha256"] == certificate_sha256(cert)  # a relay recognises it by these bytes

    run(scenario())


def test_an_expired_certificate_recovers_within_the_grace_period(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "c") as running:
            key, enrolled = await _enrolled(running)
            # Ten days offline: past the 24 h certificate, well inside 30 days of grace.
            running.context.renewal.clock = lambda: time.time() + 10 * DAY
            status, body = await _renew(running, key)
            assert status == 200, body
            assert running.context.audit.recent()[-1]["event"] == "recovery"
            identity = running.context.registry.get_identity("default", "gw")
            assert identity.cert_not_after == body["not_after"]

    run(scenario())


def test_a_recovery_after_the_grace_period_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "c", recovery_grace=int(5 * DAY)) as running:
            key, _ = await _enrolled(running)
            running.context.renewal.clock = lambda: time.time() + 7 * DAY
            before = store_snapshot(running.context.settings.store_path)
            status, body = await _renew(running, key)
            assert status == 403
            assert body["error"] == "recovery_expired"
            assert "more than 5 days ago" in body["message"] and "new token" in body["message"]
            added = audit_events_added(before, store_snapshot(running.context.settings.store_path))
            assert added == [("renewal_refused", {
                "identity": "default/gw", "key_sha256": public_key_sha256(key.public_key()),
                "reason": "recovery_expired", "remote": "127.0.0.1",
            })]

    run(scenario())


def test_a_renewal_signed_by_an_unknown_key_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "c") as running:
            await _enrolled(running)
            before = store_snapshot(running.context.settings.store_path)
            stranger = make_key()
            status, body = await _renew(running, stranger)
            assert (status, body["error"]) == (403, "renewal_unknown_key")
            assert "re-enroll" in body["message"]
            # Nobody proved to be anybody: one row within the anonymous budget, naming no identity.
            added = audit_events_added(before, store_snapshot(running.context.settings.store_path))
            assert added == [("renewal_refused", {
                "key_sha256": public_key_sha256(stranger.public_key()),
                "reason": "renewal_unknown_key", "remote": "127.0.0.1",
            })]

    run(scenario())


def test_a_csr_whose_signature_does_not_verify_is_refused(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "c") as running:
            key, _ = await _enrolled(running)
            pem = make_csr(key)
            # Flip one byte of the signature inside the DER, keep valid PEM.
            import base64

            lines = pem.strip().splitlines()
            der = bytearray(base64.b64decode("".join(lines[1:-1])))
            der[-5] ^= 0x01
            body64 = base64.b64encode(bytes(der)).decode()
            broken = "\n".join([lines[0], *[body64[i:i + 64] for i in range(0, len(body64), 64)], lines[-1]]) + "\n"
            before = store_snapshot(running.context.settings.store_path)
            status, body = await running.call("POST", "/v1/renew", {"csr": broken}, admin=False)
            assert (status, body["error"]) == (400, "csr_invalid")
            added = audit_events_added(before, store_snapshot(running.context.settings.store_path))
            assert added == [("renewal_refused", {"reason": "csr_invalid", "remote": "127.0.0.1"})]

    run(scenario())


def test_revoked_and_disabled_identities_get_no_certificate(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "c") as running:
            key, _ = await _enrolled(running, "gw-a")
            status, _ = await running.call("POST", "/api/v1/identities/gw-a/disable")
            assert status == 200
            before = _without_audit(store_snapshot(running.context.settings.store_path))
            status, body = await _renew(running, key)
            assert (status, body["error"]) == (403, "identity_disabled")
            # Recovery is refused just the same.
            running.context.renewal.clock = lambda: time.time() + 3 * DAY
            status, body = await _renew(running, key)
            assert (status, body["error"]) == (403, "identity_disabled")
            assert _without_audit(store_snapshot(running.context.settings.store_path)) == before
            status, body = await running.call("POST", "/api/v1/identities/gw-a/enable")
            assert (status, body["status"]) == (200, "enrolled")
            status, body = await _renew(running, key)
            assert status == 200 and running.context.audit.recent()[-1]["event"] == "recovery"
            running.context.renewal.clock = time.time

            key_b, _ = await _enrolled(running, "gw-b")
            assert (await running.call("POST", "/api/v1/identities/gw-b/revoke"))[0] == 200
            status, body = await _renew(running, key_b)
            assert (status, body["error"]) == (403, "identity_revoked")
            events = [e["event"] for e in running.context.audit.recent()]
            assert events[-1] == "renewal_refused"

    run(scenario())


def test_enable_works_only_from_disabled_and_never_undoes_a_revocation(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "c") as running:
            await _enrolled(running, "gw")
            status, body = await running.call("POST", "/api/v1/identities/gw/enable")
            assert (status, body["status"]) == (200, "enrolled")
            assert (await running.call("POST", "/api/v1/identities/gw/disable"))[1]["status"] == "disabled"
            assert (await running.call("POST", "/api/v1/identities/gw/disable"))[1]["status"] == "disabled"
            assert (await running.call("POST", "/api/v1/identities/gw/revoke"))[1]["status"] == "revoked"
            before = store_snapshot(running.context.settings.store_path)
            for action in ("enable", "disable"):
                status, body = await running.call("POST", f"/api/v1/identities/gw/{action}")
                assert (status, body["error"]) == (409, "identity_revoked")
                assert "final" in body["message"]
            assert store_snapshot(running.context.settings.store_path) == before
            events = [e["event"] for e in running.context.audit.recent()]
            # One event per real change, none for the no-ops.
            assert events.count("identity_disabled") == 1 and events.count("identity_revoked") == 1
            assert "identity_enabled" not in events
            # A created (never enrolled) identity goes back to created.
            await running.create_identity("fresh")
            await running.call("POST", "/api/v1/identities/fresh/disable")
            status, body = await running.call("POST", "/api/v1/identities/fresh/enable")
            assert body["status"] == "created"
            status, body = await running.call("POST", "/api/v1/identities/nobody/disable")
            assert (status, body["error"]) == (404, "identity_unknown")

    run(scenario())


def test_a_disabled_identity_gets_no_session_and_no_token(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "c") as running:
            await _enrolled(running, "gw")
            await running.call("POST", "/api/v1/identities/gw/disable")
            status, body = await running.call("POST", "/api/v1/identities/gw/session", {"csr": make_csr(make_key())})
            assert (status, body["error"]) == (403, "identity_disabled")
            status, body = await running.call("POST", "/api/v1/identities/gw/token", {})
            assert (status, body["error"]) == (403, "identity_disabled")

    run(scenario())


def _identity(status: str = STATUS_ENROLLED, not_after: float | None = 1000.0) -> Identity:
    return Identity(name="gw", tenant="default", roles=(), uri="spiffe://x/default/gw", status=status,
                    created_at=0.0, cert_not_after=not_after, key_sha256="ab")


def test_the_decision_on_numbers_alone() -> None:
    grace = 100.0
    assert renewal_decision(_identity(), 999.0, grace) == RENEWAL
    assert renewal_decision(_identity(), 1000.0, grace) == RENEWAL
    assert renewal_decision(_identity(), 1000.5, grace) == RECOVERY
    assert renewal_decision(_identity(), 1100.0, grace) == RECOVERY
    expired = renewal_decision(_identity(), 1100.5, grace)
    assert isinstance(expired, RenewalRefused) and expired.error.code == "recovery_expired"
    for status, code in (("revoked", "identity_revoked"), ("disabled", "identity_disabled"),
                         ("created", "renewal_not_enrolled")):
        refused = renewal_decision(_identity(status), 999.0, grace)
        assert isinstance(refused, RenewalRefused) and refused.error.code == code
    # Zero grace: recovery is off, renewal still works up to the last second.
    assert renewal_decision(_identity(), 1000.0, 0.0) == RENEWAL
    assert isinstance(renewal_decision(_identity(), 1000.1, 0.0), RenewalRefused)


async def _re_enrolled(running, name: str = "gw"):
    """Enroll ``name`` with one key, then again with a new token and a new key: (old key, new key)."""
    old_key, _ = await _enrolled(running, name)
    status, body = await running.call("POST", f"/api/v1/identities/{name}/token", {})
    assert status == 201, body
    new_key = make_key()
    status, body = await running.enroll(body["token"], new_key, name)
    assert status == 200, body
    return old_key, new_key


def test_the_replaced_key_neither_renews_nor_recovers_after_re_enrollment(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "c") as running:
            old_key, new_key = await _re_enrolled(running)
            for offset in (0.0, 3 * DAY):  # renewal, then recovery of an expired certificate
                running.context.renewal.clock = lambda offset=offset: time.time() + offset
                before = store_snapshot(running.context.settings.store_path)
                status, body = await _renew(running, old_key)
                assert (status, body["error"]) == (403, "renewal_unknown_key"), body
                assert "enrolled again with a new key" in body["message"] and "default/gw" in body["message"]
                # The old device proved a key this identity once held: the refusal names it.
                added = audit_events_added(before, store_snapshot(running.context.settings.store_path))
                assert added == [("renewal_refused", {
                    "identity": "default/gw", "key_sha256": public_key_sha256(old_key.public_key()),
                    "reason": "renewal_unknown_key", "remote": "127.0.0.1",
                })]
            running.context.renewal.clock = time.time
            status, body = await _renew(running, new_key)
            assert status == 200, body

    run(scenario())


def test_a_renewal_racing_the_re_enrollment_never_leaves_the_old_key_current(tmp_path: Path) -> None:
    async def scenario() -> None:
        import asyncio

        async with running_controller(tmp_path / "c") as running:
            old_key, _ = await _enrolled(running)
            status, body = await running.call("POST", "/api/v1/identities/gw/token", {})
            new_key = make_key()
            results = await asyncio.gather(running.enroll(body["token"], new_key),
                                           *(_renew(running, old_key) for _ in range(8)))
            assert results[0][0] == 200
            assert {status for status, _ in results[1:]} <= {200, 403}
            identity = running.context.registry.get_identity("default", "gw")
            assert identity.key_sha256 == public_key_sha256(new_key.public_key())
            assert (await _renew(running, old_key))[0] == 403

    run(scenario())


def test_a_replaced_device_flooding_renewals_is_recorded_within_the_anonymous_budget(tmp_path: Path) -> None:
    from controller.audit import AnonymousBudget

    async def scenario() -> None:
        async with running_controller(tmp_path / "c") as running:
            old_key, _ = await _re_enrolled(running)
            running.context.audit.anonymous_budget = AnonymousBudget(per_minute=2, clock=lambda: 1000.0)
            before = store_snapshot(running.context.settings.store_path)
            for _ in range(6):
                assert (await _renew(running, old_key))[0] == 403
            added = audit_events_added(before, store_snapshot(running.context.settings.store_path))
            assert [(event, fields["identity"]) for event, fields in added] == [("renewal_refused", "default/gw")] * 2

    run(scenario())
