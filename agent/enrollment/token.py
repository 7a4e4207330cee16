"""The one-time enrollment token: reading the file, its claims, its signature.

The claims are read unverified only to learn where the controller is (``iss``)
and which CA to pin (``ca``); nothing else is believed until ``verify_token``
has checked the signature with the pinned CA's key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

from cryptography import x509

from agent.errors import TokenError
from shared.trust import ca_fingerprint
from shared.utc import format_utc as _utc

#: A token is about 700 bytes of text; 16 KiB bounds what a wrong file (an
#: image on the boot partition) makes us read.
MAX_TOKEN_FILE = 16 * 1024
AUDIENCE = "outpost-enroll"
#: The controller signs with its CA key (P-256); no other algorithm is accepted.
ALGORITHM = "ES256"
REQUIRED_CLAIMS = ("iss", "aud", "sub", "tnt", "jti", "iat", "exp", "ca")
NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
FINGERPRINT_PATTERN = re.compile(r"sha256:[0-9a-f]{64}")
JTI_PATTERN = re.compile(r"[0-9a-f]{16,128}")
NEW_TOKEN_HINT = "ask central ops for a new one"
_MALFORMED = f"the token file is not an Outpost enrollment token; check the file or {NEW_TOKEN_HINT}"


@dataclass(frozen=True)
class EnrollmentToken:
    """The claims of an enrollment token (unverified until ``verify_token`` says so)."""

    text: str
    iss: str
    sub: str
    tnt: str
    jti: str
    exp: float
    iat: float
    ca: str

    @property
    def controller_url(self) -> str:
        return self.iss.rstrip("/")


def read_token_file(path: Path) -> str:
    """The token text from ``path``, surrounding whitespace removed."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_TOKEN_FILE + 1)
    except FileNotFoundError:
        raise TokenError(f"the token file {path} does not exist; check the path") from None
    except IsADirectoryError:
        raise TokenError(f"the token file {path} is a directory; give the path of the token file") from None
    except OSError as error:
        raise TokenError(
            f"the token file {path} cannot be read ({error.strerror or error}); check its permissions"
        ) from None
    if len(data) > MAX_TOKEN_FILE:
        raise TokenError(f"the token file {path} is larger than {MAX_TOKEN_FILE} bytes; it is not an enrollment token")
    try:
        text = data.decode("ascii").strip()
    except UnicodeDecodeError:
        raise TokenError(f"the token file {path} is not an Outpost enrollment token; check the file") from None
    if not text:
        raise TokenError(f"the token file {path} is empty; copy the token from central ops into it")
    return text


def parse_unverified(text: str) -> EnrollmentToken:
    """The token's claims without checking its signature (TokenError if malformed)."""
    import jwt  # PyJWT (and urllib.request behind it) only while a token is read: never resident in ``run``

    if len(text) > MAX_TOKEN_FILE:
        raise TokenError(_MALFORMED)
    try:
        header = jwt.get_unverified_header(text)
        claims = jwt.decode(text, options={"verify_signature": False})
    except jwt.InvalidTokenError:
        raise TokenError(_MALFORMED) from None
    _refuse_algorithm(header)
    return _token_from_claims(text, claims)


def verify_token(text: str, ca_cert: x509.Certificate, now: float | None) -> EnrollmentToken:
    """Check the token's signature with the CA's key, its audience, and expiry at ``now``.

    ``now`` is the trusted time in unix seconds; this function never reads the
    local clock, because a gateway without a real-time clock may boot years off.
    ``None`` leaves expiry to the caller (whose clock could not be checked).
    """
    import jwt  # PyJWT (and urllib.request behind it) only while a token is read: never resident in ``run``

    parse_unverified(text)
    try:
        claims = jwt.decode(
            text,
            cast(Any, ca_cert.public_key()),  # an ECDSA key; jwt names fewer key types than x509
            algorithms=[ALGORITHM],
            audience=AUDIENCE,
            # Expiry is judged below against the trusted ``now``, not the local clock.
            options={
                "verify_exp": False,
                "verify_iat": False,
                "verify_nbf": False,
                "require": list(REQUIRED_CLAIMS),
            },
        )
    except jwt.InvalidSignatureError:
        raise TokenError(
            "the token's signature does not match the controller's CA key: it was altered or made by "
            f"another controller; {NEW_TOKEN_HINT}"
        ) from None
    except jwt.InvalidAudienceError:
        raise TokenError(f"this token is not an enrollment token (its audience is not {AUDIENCE!r}); {NEW_TOKEN_HINT}") from None
    except jwt.MissingRequiredClaimError as error:
        raise TokenError(f"the token lacks the {error.claim!r} claim; {NEW_TOKEN_HINT}") from None
    except jwt.InvalidAlgorithmError:
        raise TokenError(f"the token is not signed with {ALGORITHM}, the only algorithm Outpost accepts; {NEW_TOKEN_HINT}") from None
    except jwt.InvalidTokenError:
        raise TokenError(_MALFORMED) from None
    verified = _token_from_claims(text, claims)
    if verified.ca != ca_fingerprint(ca_cert):
        raise TokenError(f"the token pins another CA than the one it was checked with; {NEW_TOKEN_HINT}")
    if now is not None and verified.exp <= now:
        raise TokenError(
            f"this token expired on {_utc(verified.exp)}; {NEW_TOKEN_HINT} "
            f"(if that date is still ahead, this gateway's clock is wrong: it reads {_utc(now)})"
        )
    return verified


def _refuse_algorithm(header: dict[str, Any]) -> None:
    algorithm = header.get("alg")
    if not isinstance(algorithm, str) or algorithm.lower() == "none":
        raise TokenError(f"this token is unsigned (alg: none), which Outpost never accepts; {NEW_TOKEN_HINT}")
    if algorithm.upper().startswith("HS"):
        raise TokenError(
            f"this token is signed with {algorithm}, a shared-secret algorithm Outpost does not accept "
            f"(only {ALGORITHM}); {NEW_TOKEN_HINT}"
        )
    if algorithm != ALGORITHM:
        raise TokenError(f"this token is signed with {algorithm}; Outpost accepts only {ALGORITHM}; {NEW_TOKEN_HINT}")


def _token_from_claims(text: str, claims: Any) -> EnrollmentToken:
    if not isinstance(claims, dict):
        raise TokenError(_MALFORMED)
    missing = [name for name in REQUIRED_CLAIMS if name not in claims]
    if missing:
        raise TokenError(f"the token lacks the {missing[0]!r} claim; {NEW_TOKEN_HINT}")
    iss, sub, tnt, jti, ca = (claims[name] for name in ("iss", "sub", "tnt", "jti", "ca"))
    if not all(isinstance(value, str) for value in (iss, sub, tnt, jti, ca)):
        raise TokenError(_MALFORMED)
    exp, iat = claims["exp"], claims["iat"]
    if not all(isinstance(value, (int, float)) and not isinstance(value, bool) for value in (exp, iat)):
        raise TokenError(_MALFORMED)
    url = urlsplit(iss)
    if url.scheme != "https" or not url.hostname or url.query or url.fragment or url.username:
        raise TokenError(f"the token's controller address {iss!r} is not an https:// URL; {NEW_TOKEN_HINT}")
    if not NAME_PATTERN.fullmatch(sub) or not NAME_PATTERN.fullmatch(tnt):
        raise TokenError(f"the token names an invalid identity or tenant; {NEW_TOKEN_HINT}")
    if not FINGERPRINT_PATTERN.fullmatch(ca):
        raise TokenError(f"the token's CA fingerprint is not sha256:<64 hex digits>; {NEW_TOKEN_HINT}")
    if not JTI_PATTERN.fullmatch(jti):
        raise TokenError(_MALFORMED)
    return EnrollmentToken(text=text, iss=iss, sub=sub, tnt=tnt, jti=jti, exp=float(exp), iat=float(iat), ca=ca)

