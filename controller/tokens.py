"""One-time enrollment tokens: ES256 JWTs signed with the CA key.

Only ES256 is ever accepted. The header is checked before any verification,
so ``alg: none`` and HMAC tokens keyed with the CA's public key (the classic
algorithm-confusion attack) are refused without being interpreted. The
store's own record of the token has the last word: it must be known, carry
the ``iss`` this controller minted it under, and be neither superseded nor
expired by the store's own ``expires_at``.

One identity, one key: creating a token for an identity supersedes every
older token of it that was not redeemed, and redeeming one supersedes every
other token of it, redeemed or not. A superseded token enrolls nothing, so
only the newest token can (re-)enroll, and the idempotent retry of a
redeemed token lasts only until another token of the identity is redeemed.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Any

import jwt

from controller.audit import AuditLog
from controller.ca import CertificateAuthority
from controller.errors import ControllerError, bad_request
from controller.registry import Identity
from controller.store import Row, Transaction

ALGORITHM = "ES256"
AUDIENCE = "outpost-enroll"
#: Gateway clocks without an RTC drift; a minute of grace on ``exp`` spares a
#: technician a new token over a few seconds without making old tokens live.
EXPIRY_LEEWAY_SECONDS = 60
#: Shorter than this and a token expires while it is being copied to a device.
MIN_TOKEN_TTL = 60
#: A token is a bearer secret lying on a boot partition; 90 days is the most
#: any rollout needs, and shorter is better.
MAX_TOKEN_TTL = 90 * 24 * 3600
#: The token id: 128 random bits, unguessable and collision-free.
JTI_BYTES = 16
REQUIRED_CLAIMS = ["iss", "aud", "sub", "tnt", "jti", "iat", "exp", "ca"]


@dataclass(frozen=True)
class TokenClaims:
    """The verified claims of a token this controller issued."""

    jti: str
    name: str
    tenant: str
    expires_at: float
    issuer: str


def token_error(code: str, message: str) -> ControllerError:
    # 403 for a token that is well-formed but not (or no longer) ours to honour,
    # 400 for one that cannot even be read.
    status = 400 if code == "token_malformed" else 409 if code == "token_used" else 403
    return ControllerError(code, message, status)


def supersede_in(db: Transaction, tenant: str, name: str, by_jti: str, *, redeemed_too: bool) -> int:
    """Mark the identity's other live tokens superseded by ``by_jti``; returns how many.

    At creation only the unredeemed ones (``redeemed_too`` False): the device
    that redeemed the last token may still retry it until the new token is
    used. At redemption all of them: from then on the new key is the one.
    """
    only_unredeemed = "" if redeemed_too else " AND used_at IS NULL"
    cursor = db.execute(
        "UPDATE tokens SET superseded_at = ?, superseded_by = ? "
        "WHERE tenant = ? AND name = ? AND jti != ? AND superseded_at IS NULL" + only_unredeemed,
        (time.time(), by_jti, tenant, name, by_jti),
    )
    return int(cursor.rowcount)


def token_row_in(db: Transaction, claims: TokenClaims, label: str, now: float, issuer_url: str) -> Row:
    """The store's record of a verified token, or why it enrolls nothing: unknown, another issuer, superseded, expired.

    The ``iss`` must be the URL the token was minted under, recorded with it
    (``issuer_url``, this process's own, for a token recorded before the
    store kept it). Not simply this process's URL: a token minted by another
    process on the shared store, or before the URL changed, is this
    controller's as long as its record says so.

    A token that was redeemed and then superseded is the caller's to judge
    (``token_used``): it says more than "a newer token exists".
    """
    row = db.query_one("SELECT * FROM tokens WHERE jti = ?", (claims.jti,))
    if row is None or row["tenant"] != claims.tenant or row["name"] != claims.name:
        raise token_error(
            "token_unknown", "This controller has no record of the enrollment token; ask central ops for a new one."
        )
    minted_under = row["issuer"] or issuer_url
    if claims.issuer != minted_under:
        # Signed with our CA key, yet not as we minted it: a copy of the key is signing elsewhere.
        raise token_error(
            "token_issuer",
            f"The enrollment token names the controller at {claims.issuer}, but this controller issued it "
            f"as {minted_under}; ask central ops for a new token.",
        )
    if row["superseded_at"] is not None and row["used_at"] is None:
        raise token_error(
            "token_superseded",
            f"This enrollment token for {label} no longer works: a newer token was issued for this identity; "
            "use that one.",
        )
    # The store's expiry, not only the token's own exp claim: what the controller recorded is what holds.
    if now > row["expires_at"] + EXPIRY_LEEWAY_SECONDS:
        raise token_error("token_expired", "The enrollment token has expired; ask central ops for a new one.")
    return row


def check_ttl(value: object, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not MIN_TOKEN_TTL <= value <= MAX_TOKEN_TTL:
        raise bad_request(
            "invalid_ttl",
            f"The token lifetime must be a whole number of seconds between {MIN_TOKEN_TTL} and {MAX_TOKEN_TTL}.",
        )
    return value


class TokenAuthority:
    """Issues tokens into the store and verifies tokens presented for enrollment."""

    def __init__(self, ca: CertificateAuthority, audit: AuditLog, issuer_url: str) -> None:
        self._ca = ca
        self._audit = audit
        self.issuer_url = issuer_url

    def create_in(self, db: Transaction, identity: Identity, ttl: int) -> tuple[str, int]:
        """Record and sign a new one-time token for ``identity``; returns (jwt, expires unix).

        Every older unredeemed token of the identity stops working; the
        ``token_created`` event says how many (``superseded``).
        """
        now = int(time.time())
        expires = now + ttl
        jti = secrets.token_hex(JTI_BYTES)
        claims: dict[str, Any] = {
            "iss": self.issuer_url,
            "aud": AUDIENCE,
            "sub": identity.name,
            "tnt": identity.tenant,
            "jti": jti,
            "iat": now,
            "exp": expires,
            "ca": self._ca.fingerprint,
        }
        token = jwt.encode(
            claims, self._ca.signing_key, algorithm=ALGORITHM, headers={"kid": self._ca.fingerprint, "typ": "JWT"}
        )
        if isinstance(token, bytes):  # PyJWT 1.x returned bytes; keep text everywhere
            token = token.decode("ascii")
        superseded = supersede_in(db, identity.tenant, identity.name, jti, redeemed_too=False)
        db.execute(
            "INSERT INTO tokens (jti, tenant, name, created_at, expires_at, issuer) VALUES (?, ?, ?, ?, ?, ?)",
            (jti, identity.tenant, identity.name, now, expires, self.issuer_url),
        )
        self._audit.record_in(
            db, "token_created", identity=identity.label, jti=jti, expires=expires, superseded=superseded
        )
        return token, expires

    def verify(self, token: object) -> TokenClaims:
        """Verify signature, algorithm, audience, expiry and CA; raise a ``token_*`` error otherwise.

        Whether the token is known, unused, not superseded, issued under its
        ``iss`` and unexpired by the store's record is the store's to say,
        inside the enrollment transaction (``token_row_in``).
        """
        if not isinstance(token, str) or not token.strip():
            raise token_error("token_malformed", "The enrollment token is missing; pass the token file's content.")
        token = token.strip()
        try:
            header = jwt.get_unverified_header(token)
        except jwt.DecodeError:
            raise token_error(
                "token_malformed", "The enrollment token is not a valid token; copy the whole token file again."
            ) from None
        if header.get("alg") != ALGORITHM:
            raise token_error(
                "token_signature",
                f"The enrollment token is not signed with {ALGORITHM}, so this controller did not issue it; "
                "ask central ops for a new one.",
            )
        if header.get("kid") != self._ca.fingerprint:
            raise token_error(
                "token_signature",
                "The enrollment token was issued by another controller's CA; use a token from this controller.",
            )
        try:
            claims = jwt.decode(
                token,
                self._ca.signing_key.public_key(),
                algorithms=[ALGORITHM],
                audience=AUDIENCE,
                leeway=EXPIRY_LEEWAY_SECONDS,
                options={"require": REQUIRED_CLAIMS},
            )
        except jwt.ExpiredSignatureError:
            raise token_error(
                "token_expired", "The enrollment token has expired; ask central ops for a new one."
            ) from None
        except jwt.InvalidSignatureError:
            raise token_error(
                "token_signature",
                "The enrollment token's signature does not verify; it was altered or not issued here. "
                "Ask central ops for a new one.",
            ) from None
        except jwt.InvalidTokenError:
            raise token_error(
                "token_malformed", "The enrollment token is not a valid enrollment token; copy the whole token file again."
            ) from None
        if claims.get("ca") != self._ca.fingerprint:
            raise token_error(
                "token_signature", "The enrollment token names another CA; use a token from this controller."
            )
        fields = (claims.get("jti"), claims.get("sub"), claims.get("tnt"), claims.get("iss"))
        if not all(isinstance(value, str) for value in fields):
            raise token_error("token_malformed", "The enrollment token's claims are incomplete; ask for a new one.")
        return TokenClaims(
            jti=claims["jti"],
            name=claims["sub"],
            tenant=claims["tnt"],
            expires_at=float(claims["exp"]),
            issuer=claims["iss"],
        )
