"""ID-token verification: PyJWT checks signature and claims against the provider's JWKS.

Works on PyJWT 2.6 (Debian 12) and the newest: the key comes from
``jwt.PyJWK``, and the checks newer PyJWT releases added (``iat`` in the
future) are made here for all.
"""

from __future__ import annotations

import time
from typing import Any

import jwt

from controller.signin.errors import ProviderUnavailable, SigninRefused
from controller.signin.provider import ProviderClient

#: Signature algorithms accepted: what providers use. Never ``none``, never
#: HMAC (whose key would be the client secret a provider also hands others).
ALLOWED_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512")
#: Clocks of the provider and the controller may differ by this much (NTP-synced machines differ by far less).
CLOCK_LEEWAY = 60
#: An ID token is read once, at sign-in, seconds after it was issued; one
#: issued longer ago than this was kept somewhere and is not accepted.
MAX_ID_TOKEN_AGE = 15 * 60
#: ID tokens are a few KiB; a larger one is not parsed at all.
MAX_ID_TOKEN_SIZE = 16 * 1024


def refused(code: str, message: str) -> SigninRefused:
    return SigninRefused(code, message)


def verify_id_token(client: ProviderClient, token: object, *, nonce: str | None = None,
                    now: float | None = None) -> dict[str, Any]:
    """The verified claims of ``token`` from ``client``'s provider, or SigninRefused saying why."""
    provider = client.provider
    if not isinstance(token, str) or not token or len(token) > MAX_ID_TOKEN_SIZE:
        raise refused("id_token_malformed", "The ID token is missing or too large; sign in again.")
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        raise refused("id_token_malformed", "The ID token is not a JWT; sign in again.") from None
    alg = header.get("alg")
    if alg not in ALLOWED_ALGORITHMS:
        raise refused("id_token_algorithm",
                      f"The ID token is signed with {alg!r}, which is not accepted; the provider must sign with "
                      f"one of {', '.join(ALLOWED_ALGORITHMS)}.")
    kid = header.get("kid")
    if not isinstance(kid, str):
        raise refused("id_token_unknown_key", "The ID token names no signing key (kid); sign in again.")
    try:
        jwk = client.key(kid)
    except ProviderUnavailable:
        raise
    if jwk is None:
        raise refused("id_token_unknown_key",
                      f"The ID token is signed with a key ({kid[:40]!r}) that {provider.name}'s JWKS does not "
                      "list; sign in again, or check that the issuer is the right one.")
    if jwk.get("alg", alg) != alg:
        raise refused("id_token_algorithm",
                      f"The ID token says {alg}, but {provider.name}'s key {kid[:40]!r} is for {jwk.get('alg')}; "
                      "sign in again.")
    try:
        key = jwt.PyJWK(jwk, algorithm=alg).key
    except (jwt.PyJWTError, ValueError, KeyError, TypeError):
        raise refused("id_token_unknown_key",
                      f"{provider.name}'s key {kid[:40]!r} does not fit the algorithm {alg}; check the provider.") \
            from None
    now = time.time() if now is None else now
    try:
        claims: dict[str, Any] = jwt.decode(
            token, key, algorithms=[alg], audience=provider.client_id, issuer=provider.issuer, leeway=CLOCK_LEEWAY,
            options={"require": ["exp", "iat", "iss", "aud", "sub"]},
        )
    except jwt.ExpiredSignatureError:
        raise refused("id_token_expired", "The ID token has expired; sign in again.") from None
    except jwt.InvalidAudienceError:
        raise refused("id_token_audience",
                      f"The ID token was issued to another client, not {provider.client_id}; sign in through Outpost.") \
            from None
    except jwt.InvalidIssuerError:
        raise refused("id_token_issuer",
                      f"The ID token was issued by someone other than {provider.issuer}; sign in with that provider.") \
            from None
    except jwt.InvalidSignatureError:
        raise refused("id_token_signature", "The ID token's signature does not verify; sign in again.") from None
    except jwt.MissingRequiredClaimError as error:
        raise refused("id_token_malformed", f"The ID token lacks the {error.claim} claim; sign in again.") from None
    except jwt.PyJWTError:
        raise refused("id_token_malformed", "The ID token is not valid; sign in again.") from None
    iat = claims["iat"]
    if not isinstance(iat, int | float) or iat > now + CLOCK_LEEWAY:
        raise refused("id_token_future", "The ID token was issued in the future; check the provider's clock.")
    if iat < now - MAX_ID_TOKEN_AGE:
        raise refused("id_token_stale", "The ID token was issued too long ago to sign in with; sign in again.")
    aud = claims["aud"]
    if isinstance(aud, list) and len(aud) > 1 and claims.get("azp") != provider.client_id:
        raise refused("id_token_audience", f"The ID token was issued to another client, not {provider.client_id}; "
                      "sign in through Outpost.")
    if nonce is not None and claims.get("nonce") != nonce:
        raise refused("id_token_nonce", "The ID token does not carry this sign-in's nonce; sign in again.")
    return claims
