"""Sign-in as the management API offers it: the device flow brokered by the controller, ID tokens, nonces.

The controller, not the person's machine, redeems the device code at the
provider: a confidential client's secret stays in the controller's
configuration, and the ID token reaches the controller straight from the
provider over TLS. An ID token a client brings itself (the authorization
code flow) must carry a nonce this controller issued.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any

from controller.audit import AnonymousBudget, AuditLog
from controller.errors import ControllerError, bad_request
from controller.registry import Registry
from controller.signin.config import Grant, Provider, SigninSettings
from controller.signin.errors import SigninRefused
from controller.signin.idtoken import verify_id_token
from controller.signin.people import People, Person
from controller.signin.provider import ProviderClient
from controller.store import Store

#: A nonce is good for this long: a person completes a browser sign-in in minutes.
NONCE_LIFETIME = 10 * 60
#: Device codes and nonces are short strings; anything longer is not a sign-in.
MAX_CODE_LENGTH = 2048
#: Requests to a provider that nobody authenticated may cause, per controller process and minute (and
#: as a burst): sign-ins starting, and polls (one every five seconds per sign-in in progress). A
#: company's morning rush of logins fits many times over; a flood of them costs the provider at
#: most this, not one request per request.
PROVIDER_CALLS_PER_MINUTE = 600
#: RFC 8252 7.3: loopback redirects name the address, not "localhost" (which a resolver could send elsewhere).
LOOPBACK_HOSTS = ("127.0.0.1", "::1")
#: RFC 7636: BASE64URL(SHA256(verifier)) is 43 characters.
PKCE_CHALLENGE = re.compile(r"[A-Za-z0-9_-]{43}")
#: The device flow's poll errors a client keeps polling through (RFC 8628, 3.5).
PENDING_ERRORS = {"authorization_pending", "slow_down"}


@dataclass(frozen=True)
class SignedIn:
    person: Person
    session: str
    message: str

    def to_json(self) -> dict[str, Any]:
        return {"session": self.session, "identity": self.person.label, "name": self.person.name,
                "tenant": self.person.tenant, "grants": [str(g) for g in self.person.grants],
                "expires_at": self.person.session_expires_at, "message": self.message}


class SigninService:
    def __init__(self, settings: SigninSettings, store: Store, registry: Registry, audit: AuditLog) -> None:
        self.settings = settings
        self.people = People(store, registry, audit)
        self.audit = audit
        self._store = store
        self.clients = {p.name: ProviderClient(p) for p in settings.providers}
        self._nonce_key: bytes | None = None
        self._provider_calls = AnonymousBudget(PROVIDER_CALLS_PER_MINUTE)
        self._budget_lock = threading.Lock()
        if settings.providers:
            # Made at start, so that no request (a forged nonce included) is the one that writes it.
            self._key()

    def provider(self, name: object) -> ProviderClient:
        if not self.settings.providers:
            raise ControllerError("signin_off", "This controller trusts no identity provider; its admin adds one "
                                  "as [[signin.provider]] in the controller's configuration.", 400)
        if name is not None and not isinstance(name, str):
            raise bad_request("invalid_provider", "The provider must be a name.")
        found = self.settings.provider(name)
        if found is None:
            names = ", ".join(p.name for p in self.settings.providers)
            raise bad_request("unknown_provider", f"Name one of the identity providers: {names} (--provider NAME).")
        return self.clients[found.name]

    def refuse(self, error: ControllerError, provider: str | None, remote: str, **fields: Any) -> None:
        self.audit.record_anonymous("signin_refused", reason=error.code, provider=provider, remote=remote, **fields)

    def _spend_provider_call(self) -> None:
        with self._budget_lock:
            if not self._provider_calls.take():
                raise ControllerError("signin_busy", "Too many sign-ins are under way at once; try again in a "
                                      "minute.", 429)

    def start_device(self, name: object, remote: str) -> dict[str, Any]:
        client = self.provider(name)
        self._spend_provider_call()
        answer = client.start_device()
        return {"provider": client.provider.name, "device_code": answer["device_code"],
                "user_code": answer["user_code"], "verification_uri": answer["verification_uri"],
                "verification_uri_complete": answer.get("verification_uri_complete"),
                "interval": answer.get("interval", 5), "expires_in": answer.get("expires_in")}

    def poll_device(self, name: object, device_code: object, remote: str) -> SignedIn:
        client = self.provider(name)
        if not isinstance(device_code, str) or not device_code or len(device_code) > MAX_CODE_LENGTH:
            raise bad_request("invalid_device_code", "The device_code is missing; start the sign-in again.")
        self._spend_provider_call()
        status, answer = client.poll_device(device_code)
        error = answer.get("error")
        if status != 200 or error is not None:
            if error in PENDING_ERRORS:
                raise ControllerError(str(error), "The sign-in is not complete yet; keep polling.", 400)
            refusal = SigninRefused(f"provider_{error}" if isinstance(error, str) else "provider_refused",
                                    f"The identity provider refused the sign-in ({str(error)[:60]}); "
                                    "run outpostctl login again.")
            self.refuse(refusal, client.provider.name, remote)
            raise refusal
        return self._sign_in(client, answer.get("id_token"), remote, nonce=None)

    def authorize(self, name: object, redirect_uri: object, code_challenge: object, state: object) -> dict[str, Any]:
        """The provider's authorization URL for a browser sign-in with PKCE and a loopback redirect (RFC 8252)."""
        client = self.provider(name)
        uri = check_loopback(redirect_uri)
        if not isinstance(code_challenge, str) or not PKCE_CHALLENGE.fullmatch(code_challenge):
            raise bad_request("invalid_code_challenge", "The code_challenge must be the S256 of a PKCE verifier "
                              "(43 base64url characters).")
        if not isinstance(state, str) or not 16 <= len(state) <= 128:
            raise bad_request("invalid_state", "The state must be a random string of 16 to 128 characters.")
        nonce = self.new_nonce()["nonce"]
        self._spend_provider_call()
        return {"provider": client.provider.name, "nonce": nonce,
                "authorization_url": client.authorization_url(uri, code_challenge, state, nonce)}

    def redeem_code(self, name: object, code: object, code_verifier: object, redirect_uri: object, nonce: object,
                    remote: str) -> SignedIn:
        """The browser's code, redeemed at the provider by the controller (with its secret, if any)."""
        client = self.provider(name)
        try:
            uri = check_loopback(redirect_uri)
            checked = self.check_nonce(nonce)
            if not isinstance(code, str) or not code or len(code) > MAX_CODE_LENGTH or \
                    not isinstance(code_verifier, str) or not 43 <= len(code_verifier) <= 128:
                raise bad_request("invalid_code", "The code or the code_verifier is missing; sign in again.")
        except ControllerError as error:
            self.refuse(error, client.provider.name, remote)
            raise
        self._spend_provider_call()
        status, answer = client.redeem_code(code, code_verifier, uri)
        if status != 200 or "error" in answer:
            said = answer.get("error")
            refusal = SigninRefused(f"provider_{said}" if isinstance(said, str) else "provider_refused",
                                    f"The identity provider refused the sign-in ({str(said)[:60]}); "
                                    "run outpostctl login again.")
            self.refuse(refusal, client.provider.name, remote)
            raise refusal
        return self._sign_in(client, answer.get("id_token"), remote, nonce=checked)

    def new_nonce(self) -> dict[str, Any]:
        expires = int(time.time()) + NONCE_LIFETIME
        body = f"{expires}.{secrets.token_urlsafe(16)}"
        return {"nonce": f"{body}.{self._sign(body)}", "expires_at": expires}

    def _sign(self, body: str) -> str:
        return hmac.new(self._key(), body.encode(), hashlib.sha256).hexdigest()[:32]

    def _key(self) -> bytes:
        if self._nonce_key is None:
            # One key for every process sharing the store: the first to write it wins.
            with self._store.transaction() as db:
                db.execute("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING",
                           ("signin_nonce_key", secrets.token_hex(32)))
                row = db.query_one("SELECT value FROM meta WHERE key = ?", ("signin_nonce_key",))
            assert row is not None
            self._nonce_key = bytes.fromhex(row["value"])
        return self._nonce_key

    def check_nonce(self, nonce: object) -> str:
        if not isinstance(nonce, str) or len(nonce) > MAX_CODE_LENGTH or nonce.count(".") != 2:
            raise SigninRefused("nonce_invalid", "The sign-in needs a nonce from POST /api/v1/signin/nonce; "
                                "start the sign-in again.")
        body, _, mac = nonce.rpartition(".")
        expires = body.split(".")[0]
        if not hmac.compare_digest(mac, self._sign(body)) or not expires.isdigit():
            raise SigninRefused("nonce_invalid", "The nonce was not issued by this controller; start the sign-in again.")
        if int(expires) < time.time():
            raise SigninRefused("nonce_expired", "The sign-in took too long and its nonce expired; start again.")
        return nonce

    def sign_in_with_id_token(self, name: object, id_token: object, nonce: object, remote: str) -> SignedIn:
        client = self.provider(name)
        try:
            checked = self.check_nonce(nonce)
        except ControllerError as error:
            self.refuse(error, client.provider.name, remote)
            raise
        return self._sign_in(client, id_token, remote, nonce=checked)

    def _sign_in(self, client: ProviderClient, id_token: object, remote: str, nonce: str | None) -> SignedIn:
        provider = client.provider
        try:
            claims = verify_id_token(client, id_token, nonce=nonce)
            assert isinstance(id_token, str)
            groups = _groups(claims, provider)
            grants = self.settings.grants_of(groups)
            person, session = self.people.sign_in(provider, claims, id_token, grants,
                                                   self.settings.session_lifetime, remote, nonce)
        except ControllerError as error:
            self.refuse(error, provider.name, remote)
            raise
        return SignedIn(person, session, _welcome(person, grants, groups))


def check_loopback(value: object) -> str:
    """A redirect URI on this machine's loopback, as RFC 8252 has native apps use: nothing else is accepted."""
    parts = urllib.parse.urlsplit(value) if isinstance(value, str) and len(value) <= MAX_CODE_LENGTH else None
    if parts is None or parts.scheme != "http" or parts.hostname not in LOOPBACK_HOSTS or parts.query \
            or parts.fragment or parts.username is not None:
        raise bad_request("invalid_redirect_uri", "The redirect_uri must be http://127.0.0.1:PORT/PATH or "
                          "http://[::1]:PORT/PATH (a loopback address on the person's machine).")
    return str(value)


def _groups(claims: dict[str, Any], provider: Provider) -> list[str]:
    raw = claims.get(provider.groups_claim, [])
    if isinstance(raw, str):
        raw = [raw]
    return [g for g in raw if isinstance(g, str)] if isinstance(raw, list) else []


def _welcome(person: Person, grants: tuple[Grant, ...], groups: list[str]) -> str:
    if not grants:
        shown = ", ".join(groups[:10]) or "none"
        return (f"Signed in as {person.label}, but none of your groups ({shown}) is mapped to a role in the "
                "controller's [signin.roles], so you may do nothing yet; ask an admin to map one.")
    return f"Signed in as {person.label} with {', '.join(str(g) for g in grants)}."
