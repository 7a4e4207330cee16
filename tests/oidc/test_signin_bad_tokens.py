"""ID tokens the controller must refuse: each with one sentence, nothing changed, one audit row.

The tokens are shaped by the test and signed with the provider's own key
(or deliberately not), then offered with a nonce the controller issued, as
the authorization code flow would.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from controller.signin.service import PROVIDER_CALLS_PER_MINUTE
from tests.controller.harness import audit_events_added, run, running_controller, store_snapshot
from tests.oidc.harness import IdP
from tests.oidc.signin_harness import PROVIDER_NAME, call, signin_settings

OTHER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)

#: name -> (claims over the good ones, token options, the refusal code, the sentence)
CASES: dict[str, tuple[dict[str, Any], dict[str, Any], str, str]] = {
    "wrong aud": ({"aud": "someone-else"}, {}, "id_token_audience",
                  "The ID token was issued to another client, not outpost; sign in through Outpost."),
    "wrong iss": ({"iss": "https://evil.example"}, {}, "id_token_issuer",
                  "The ID token was issued by someone other than {issuer}; sign in with that provider."),
    "expired": ({"exp": int(time.time()) - 3600, "iat": int(time.time()) - 7200}, {}, "id_token_expired",
                "The ID token has expired; sign in again."),
    "unknown kid": ({}, {"kid": "no-such-key"}, "id_token_unknown_key",
                    "The ID token is signed with a key ('no-such-key') that test's JWKS does not list; sign in again, "
                    "or check that the issuer is the right one."),
    "bad signature": ({}, {"key": OTHER_KEY}, "id_token_signature",
                      "The ID token's signature does not verify; sign in again."),
    "HMAC": ({}, {"key": "outpost", "alg": "HS256"}, "id_token_algorithm",
             "The ID token is signed with 'HS256', which is not accepted; the provider must sign with one of "
             "RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, ES512."),
    "algorithm not the key's": ({}, {"alg": "PS256"}, "id_token_algorithm",
                                "The ID token says PS256, but test's key 'test-key-1' is for RS256; sign in again."),
    "wrong nonce": ({"nonce": "1.2.3"}, {}, "id_token_nonce",
                    "The ID token does not carry this sign-in's nonce; sign in again."),
}


def unsigned(claims: dict[str, Any]) -> str:
    """``alg: none``: a JWT with an empty signature, as an attacker would write it."""
    return jwt.encode(claims, None, algorithm="none")  # type: ignore[arg-type]


async def nonce_of(running: Any) -> str:
    status, answer = await call(running, "POST", "/api/v1/signin/nonce")
    assert status == 200
    return str(answer["nonce"])


def _refused(idp: IdP, tmp_path: Path, token_of: Any, code: str, sentence: str) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl", signin=signin_settings(idp)) as running:
            nonce = await nonce_of(running)
            token = token_of(nonce)
            before = store_snapshot(running.context.settings.store_path)
            status, refused = await call(running, "POST", "/api/v1/signin/id-token",
                                         {"provider": PROVIDER_NAME, "id_token": token, "nonce": nonce})
            assert (status, refused["error"]) == (401, code), refused
            assert refused["message"] == sentence.format(issuer=idp.issuer)
            added = audit_events_added(before, store_snapshot(running.context.settings.store_path))
            assert [(e, f["reason"]) for e, f in added] == [("signin_refused", code)]
            assert token not in repr(added)

    run(scenario())


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_bad_id_token_is_refused(idp: IdP, tmp_path: Path, case: str) -> None:
    claims, options, code, sentence = CASES[case]

    def token_of(nonce: str) -> str:
        return idp.sign({"nonce": nonce, **claims}, **options)

    _refused(idp, tmp_path, token_of, code, sentence)


def test_alg_none_is_refused(idp: IdP, tmp_path: Path) -> None:
    def token_of(nonce: str) -> str:
        now = int(time.time())
        return unsigned({"iss": idp.issuer, "aud": idp.client_id, "sub": "alice", "iat": now, "exp": now + 600,
                         "nonce": nonce, "preferred_username": "alice", "groups": ["ops-admins"]})

    _refused(idp, tmp_path, token_of, "id_token_algorithm",
             "The ID token is signed with 'none', which is not accepted; the provider must sign with one of "
             "RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, ES512.")


def test_a_good_id_token_signs_in_once_and_its_replay_and_its_nonce_are_refused(idp: IdP, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl", signin=signin_settings(idp)) as running:
            nonce = await nonce_of(running)
            token = idp.sign({"nonce": nonce, "preferred_username": "alice"})
            body = {"provider": PROVIDER_NAME, "id_token": token, "nonce": nonce}
            status, answer = await call(running, "POST", "/api/v1/signin/id-token", body)
            assert (status, answer["identity"]) == (201, "default/alice"), answer
            for offered, code in ((token, "id_token_replayed"),
                                  (idp.sign({"nonce": nonce, "preferred_username": "alice", "jti": "x"}),
                                   "nonce_replayed")):
                before = store_snapshot(running.context.settings.store_path)
                status, refused = await call(running, "POST", "/api/v1/signin/id-token",
                                             dict(body, id_token=offered))
                assert (status, refused["error"]) == (401, code), refused
                added = audit_events_added(before, store_snapshot(running.context.settings.store_path))
                assert [(e, f["reason"]) for e, f in added] == [("signin_refused", code)]

    run(scenario())


def test_a_nonce_the_controller_did_not_issue_is_refused(idp: IdP, tmp_path: Path) -> None:
    def token_of(nonce: str) -> str:
        return idp.sign({"nonce": nonce})

    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl", signin=signin_settings(idp)) as running:
            forged = f"{int(time.time()) + 600}.abc.{'0' * 32}"
            before = store_snapshot(running.context.settings.store_path)
            status, refused = await call(running, "POST", "/api/v1/signin/id-token",
                                         {"provider": PROVIDER_NAME, "id_token": token_of(forged), "nonce": forged})
            assert (status, refused["error"]) == (401, "nonce_invalid")
            added = audit_events_added(before, store_snapshot(running.context.settings.store_path))
            assert [e for e, _ in added] == ["signin_refused"]

    run(scenario())


def test_an_unknown_kid_refetches_the_jwks_at_most_once_a_minute(idp: IdP, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl", signin=signin_settings(idp)) as running:
            client = running.context.signin.clients[PROVIDER_NAME]
            for _ in range(5):
                nonce = await nonce_of(running)
                status, _answer = await call(running, "POST", "/api/v1/signin/id-token",
                                             {"provider": PROVIDER_NAME, "nonce": nonce,
                                              "id_token": idp.sign({"nonce": nonce}, kid="made-up")})
                assert status == 401
            assert client.jwks_fetches == 1
            # A known key is served from the cache: no fetch at all.
            nonce = await nonce_of(running)
            status, _answer = await call(running, "POST", "/api/v1/signin/id-token",
                                         {"provider": PROVIDER_NAME, "nonce": nonce,
                                          "id_token": idp.sign({"nonce": nonce, "preferred_username": "alice"})})
            assert status == 201 and client.jwks_fetches == 1

    run(scenario())


def test_a_flood_of_sign_in_starts_costs_the_provider_a_bounded_number_of_requests(idp: IdP, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl", signin=signin_settings(idp)) as running:
            service = running.context.signin
            statuses = []
            # Bounded: twice the budget at most (it refills while the loop runs).
            for _ in range(2 * PROVIDER_CALLS_PER_MINUTE):
                status, answer = await call(running, "POST", "/api/v1/signin/device/poll",
                                            {"provider": PROVIDER_NAME, "device_code": "made-up"})
                statuses.append(status)
                if status == 429:
                    assert answer["message"] == "Too many sign-ins are under way at once; try again in a minute."
                    break
            assert statuses[-1] == 429 and set(statuses[:-1]) == {401}
            assert service is not None

    run(scenario())
