"""The token file and its claims: every bad token ends in one sentence that says what to do."""

from __future__ import annotations

import time
from pathlib import Path

import jwt
import pytest

from agent.enrollment.token import (
    MAX_TOKEN_FILE,
    EnrollmentToken,
    parse_unverified,
    read_token_file,
    verify_token,
)
from agent.errors import TokenError
from tests.agent.enrollment.fake_controller import TestCA

ISS = "https://controller.example:8443"
MAY_1_2026_NOON = 1777636800


def claims_of(authority: TestCA, **overrides) -> dict:
    claims = {
        "iss": ISS, "aud": "outpost-enroll", "sub": "pump-1", "tnt": "default",
        "jti": "0123456789abcdef0123456789abcdef", "iat": MAY_1_2026_NOON - 86400,
        "exp": MAY_1_2026_NOON, "ca": authority.fingerprint,
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def test_a_valid_token_verifies_and_yields_its_claims(ca):
    text = jwt.encode(claims_of(ca), ca.key, algorithm="ES256")

    token = verify_token(text, ca.cert, now=MAY_1_2026_NOON - 1)

    assert token == EnrollmentToken(
        text=text, iss=ISS, sub="pump-1", tnt="default", jti="0123456789abcdef0123456789abcdef",
        exp=float(MAY_1_2026_NOON), iat=float(MAY_1_2026_NOON - 86400), ca=ca.fingerprint,
    )
    assert token.controller_url == ISS


def test_expiry_is_judged_against_the_time_given_not_the_local_clock(ca):
    old = jwt.encode(claims_of(ca, iat=1_000_000_000, exp=1_000_086_400), ca.key, algorithm="ES256")

    assert verify_token(old, ca.cert, now=1_000_000_100).sub == "pump-1"
    with pytest.raises(TokenError):
        verify_token(jwt.encode(claims_of(ca, exp=int(time.time()) + 3600), ca.key, algorithm="ES256"),
                     ca.cert, now=time.time() + 7200)


def test_an_expired_token_says_when_and_what_to_do(ca):
    text = jwt.encode(claims_of(ca), ca.key, algorithm="ES256")

    with pytest.raises(TokenError) as caught:
        verify_token(text, ca.cert, now=MAY_1_2026_NOON)

    assert str(caught.value).startswith("this token expired on 2026-05-01 12:00 UTC; ask central ops for a new one")
    assert caught.value.exit_code == 65


def test_a_token_signed_by_another_key_is_refused(ca, other_ca):
    text = jwt.encode(claims_of(ca), other_ca.key, algorithm="ES256")

    with pytest.raises(TokenError, match="signature does not match the controller's CA key"):
        verify_token(text, ca.cert, now=MAY_1_2026_NOON - 1)


def test_an_unsigned_token_is_refused_before_any_network_step(ca):
    text = jwt.encode(claims_of(ca), None, algorithm="none")

    with pytest.raises(TokenError, match=r"unsigned \(alg: none\), which Outpost never accepts"):
        parse_unverified(text)
    with pytest.raises(TokenError, match="alg: none"):
        verify_token(text, ca.cert, now=MAY_1_2026_NOON - 1)


def test_a_shared_secret_token_is_refused(ca):
    text = jwt.encode(claims_of(ca), "s" * 32, algorithm="HS256")

    with pytest.raises(TokenError, match="signed with HS256, a shared-secret algorithm Outpost does not accept"):
        verify_token(text, ca.cert, now=MAY_1_2026_NOON - 1)


def test_a_token_for_another_audience_is_refused(ca):
    text = jwt.encode(claims_of(ca, aud="outpost-admin"), ca.key, algorithm="ES256")

    with pytest.raises(TokenError, match="not an enrollment token"):
        verify_token(text, ca.cert, now=MAY_1_2026_NOON - 1)


@pytest.mark.parametrize("claim", ["iss", "sub", "tnt", "jti", "exp", "iat", "ca", "aud"])
def test_a_token_missing_a_claim_names_it(ca, claim):
    text = jwt.encode(claims_of(ca, **{claim: None}), ca.key, algorithm="ES256")

    with pytest.raises(TokenError, match=f"lacks the '{claim}' claim"):
        parse_unverified(text)


def test_a_token_pinning_another_ca_than_the_verifying_one_is_refused(ca, other_ca):
    text = jwt.encode(claims_of(ca, ca=other_ca.fingerprint), ca.key, algorithm="ES256")

    with pytest.raises(TokenError, match="pins another CA"):
        verify_token(text, ca.cert, now=MAY_1_2026_NOON - 1)


@pytest.mark.parametrize("overrides, sentence", [
    ({"iss": "http://controller.example"}, "is not an https:// URL"),
    ({"sub": "Pump 1"}, "invalid identity or tenant"),
    ({"ca": "md5:abcd"}, "not sha256:<64 hex digits>"),
])
def test_claims_with_bad_values_are_refused(ca, overrides, sentence):
    with pytest.raises(TokenError, match=sentence):
        parse_unverified(jwt.encode(claims_of(ca, **overrides), ca.key, algorithm="ES256"))


@pytest.mark.parametrize("text", ["hello", "a.b.c", "eyJhbGciOiJFUzI1NiJ9.bm90IGpzb24.c2ln", "x" * (MAX_TOKEN_FILE + 1)])
def test_malformed_text_is_not_an_outpost_token(text):
    with pytest.raises(TokenError, match="^the token file is not an Outpost enrollment token"):
        parse_unverified(text)


def test_the_token_file_is_read_without_its_surrounding_whitespace(tmp_path: Path):
    path = tmp_path / "token"
    path.write_text("\n  abc.def.ghi \r\n")

    assert read_token_file(path) == "abc.def.ghi"


@pytest.mark.parametrize("content, sentence", [
    (b"", "is empty"),
    (b" \n\t\n", "is empty"),
    (b"\x89PNG\r\n\x1a\n\xff\xfe", "is not an Outpost enrollment token"),
    (b"a" * (MAX_TOKEN_FILE + 1), f"larger than {MAX_TOKEN_FILE} bytes"),
])
def test_unusable_token_files_are_refused(tmp_path: Path, content: bytes, sentence: str):
    path = tmp_path / "token"
    path.write_bytes(content)

    with pytest.raises(TokenError, match=sentence):
        read_token_file(path)


def test_a_missing_token_file_is_named(tmp_path: Path):
    with pytest.raises(TokenError, match=f"the token file {tmp_path / 'nope'} does not exist"):
        read_token_file(tmp_path / "nope")


def test_a_directory_is_not_a_token_file(tmp_path: Path):
    with pytest.raises(TokenError, match="is a directory"):
        read_token_file(tmp_path)


def test_unverified_parsing_reads_where_to_pin_even_from_a_forged_token(ca, other_ca):
    # It only tells the agent where to fetch the CA; verify_token decides trust.
    forged = jwt.encode(claims_of(ca), other_ca.key, algorithm="ES256", headers={"kid": ca.fingerprint})

    token = parse_unverified(forged)

    assert (token.iss, token.ca, token.sub) == (ISS, ca.fingerprint, "pump-1")
    with pytest.raises(TokenError):
        verify_token(forged, ca.cert, now=MAY_1_2026_NOON - 1)
