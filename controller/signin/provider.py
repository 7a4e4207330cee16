"""One OpenID Provider as the controller talks to it: discovery, JWKS, the device and token endpoints.

Every request goes over TLS (the issuer is https://, verified against the
system's CAs or the provider's ``ca_file``) and blocks: callers run these in
the API worker pool, never on the event loop.
"""

from __future__ import annotations

import json
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from controller.signin.config import Provider
from controller.signin.errors import ProviderUnavailable

#: A provider answers in milliseconds; ten seconds covers a slow one and
#: bounds how long a sign-in can hold a worker thread.
PROVIDER_TIMEOUT = 10.0
#: Discovery documents and JWKS are a few KiB; this bounds what a provider can make us read.
MAX_PROVIDER_RESPONSE = 256 * 1024
#: The discovery document is re-read after an hour: a provider's endpoints
#: rarely move, and a moved one is picked up within the hour.
DISCOVERY_MAX_AGE = 3600.0
#: The JWKS is re-read at most this often when a token names a key we do not
#: have (a rotation): a flood of tokens with made-up key ids costs the
#: provider one request a minute, not one each.
JWKS_REFETCH_INTERVAL = 60.0
#: A cached JWKS is re-read at least daily even when every kid is known, so a key the provider withdrew stops working.
JWKS_MAX_AGE = 24 * 3600.0
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
#: Asked for where the provider supports them: the name and groups claims come from these.
SCOPES = "openid profile email groups"


class ProviderClient:
    def __init__(self, provider: Provider, clock: Any = time.monotonic) -> None:
        self.provider = provider
        self._clock = clock
        self._lock = threading.Lock()
        self._discovery: dict[str, Any] | None = None
        self._discovered_at = 0.0
        self._jwks: dict[str, dict[str, Any]] = {}
        self._jwks_at: float | None = None
        self._ssl = ssl.create_default_context(cafile=str(provider.ca_file) if provider.ca_file else None)
        #: How many times the JWKS was fetched (the tests count refetches).
        self.jwks_fetches = 0

    def _request(self, url: str, form: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
        if urllib.parse.urlsplit(url).scheme != "https":
            raise ProviderUnavailable(f"The identity provider {self.provider.name} named a non-HTTPS URL {url!r}; "
                                      "fix the provider's configuration.")
        headers = {"Accept": "application/json"}
        data = None
        if form is not None:
            form = dict(form, client_id=self.provider.client_id)
            if self.provider.client_secret is not None:
                form["client_secret"] = self.provider.client_secret
            data = urllib.parse.urlencode(form).encode()
        request = urllib.request.Request(url, data=data, headers=headers)
        try:
            try:
                with urllib.request.urlopen(request, context=self._ssl, timeout=PROVIDER_TIMEOUT) as response:
                    status, body = response.status, response.read(MAX_PROVIDER_RESPONSE + 1)
            except urllib.error.HTTPError as error:
                status, body = error.code, error.read(MAX_PROVIDER_RESPONSE + 1)
        except (OSError, ValueError) as error:
            reason = getattr(error, "reason", error)
            raise ProviderUnavailable(f"The identity provider {self.provider.name} at {url} cannot be reached "
                                      f"({reason}); check its URL, its TLS CA and the network.") from None
        try:
            if len(body) > MAX_PROVIDER_RESPONSE:
                raise ValueError("too large")
            value = json.loads(body)
            if not isinstance(value, dict):
                raise ValueError("not an object")
        except ValueError:
            raise ProviderUnavailable(f"The identity provider {self.provider.name} answered {url} with something "
                                      "that is not a JSON object; check the issuer URL.") from None
        return status, value

    def discovery(self) -> dict[str, Any]:
        with self._lock:
            if self._discovery is not None and self._clock() - self._discovered_at < DISCOVERY_MAX_AGE:
                return self._discovery
        url = self.provider.issuer + "/.well-known/openid-configuration"
        status, document = self._request(url)
        if status != 200 or document.get("issuer") != self.provider.issuer:
            raise ProviderUnavailable(f"The discovery document at {url} does not name the issuer "
                                      f"{self.provider.issuer}; check the issuer URL in [[signin.provider]].")
        with self._lock:
            self._discovery, self._discovered_at = document, self._clock()
        return document

    def endpoint(self, key: str) -> str:
        value = self.discovery().get(key)
        if not isinstance(value, str):
            raise ProviderUnavailable(f"The identity provider {self.provider.name} has no {key}; "
                                      "enable it there (for the device flow: the device authorization grant).")
        return value

    def _fetch_jwks(self) -> None:
        status, document = self._request(self.endpoint("jwks_uri"))
        keys = document.get("keys")
        if status != 200 or not isinstance(keys, list):
            raise ProviderUnavailable(f"The identity provider {self.provider.name} served no JWKS; check the provider.")
        with self._lock:
            # Encryption keys never verify a signature.
            self._jwks = {k["kid"]: k for k in keys
                          if isinstance(k, dict) and isinstance(k.get("kid"), str) and k.get("use", "sig") == "sig"}
            self._jwks_at = self._clock()
            self.jwks_fetches += 1

    def key(self, kid: str) -> dict[str, Any] | None:
        """The JWK of ``kid``: cached, refetched when unknown (at most once per JWKS_REFETCH_INTERVAL)."""
        with self._lock:
            fetched_at = self._jwks_at
            found = self._jwks.get(kid)
            age = None if fetched_at is None else self._clock() - fetched_at
        if found is not None and age is not None and age < JWKS_MAX_AGE:
            return found
        if age is None or age >= JWKS_REFETCH_INTERVAL:
            self._fetch_jwks()
        with self._lock:
            return self._jwks.get(kid)

    def _scopes(self) -> list[str]:
        supported = self.discovery().get("scopes_supported")
        wanted = SCOPES.split()
        if isinstance(supported, list):
            wanted = [scope for scope in wanted if scope in supported or scope == "openid"]
        return wanted

    def start_device(self) -> dict[str, Any]:
        status, answer = self._request(self.endpoint("device_authorization_endpoint"),
                                       {"scope": " ".join(self._scopes())})
        needed = ("device_code", "user_code", "verification_uri")
        if status != 200 or not all(isinstance(answer.get(k), str) for k in needed):
            raise ProviderUnavailable(f"The identity provider {self.provider.name} refused to start a device "
                                      f"sign-in ({answer.get('error', status)}); check that client "
                                      f"{self.provider.client_id} may use the device flow.")
        return answer

    def authorization_url(self, redirect_uri: str, code_challenge: str, state: str, nonce: str) -> str:
        query = urllib.parse.urlencode({
            "response_type": "code", "client_id": self.provider.client_id, "redirect_uri": redirect_uri,
            "scope": " ".join(self._scopes()), "code_challenge": code_challenge, "code_challenge_method": "S256",
            "state": state, "nonce": nonce,
        })
        endpoint = self.endpoint("authorization_endpoint")
        return endpoint + ("&" if "?" in endpoint else "?") + query

    def redeem_code(self, code: str, code_verifier: str, redirect_uri: str) -> tuple[int, dict[str, Any]]:
        return self._request(self.endpoint("token_endpoint"), {
            "grant_type": "authorization_code", "code": code, "code_verifier": code_verifier,
            "redirect_uri": redirect_uri})

    def poll_device(self, device_code: str) -> tuple[int, dict[str, Any]]:
        return self._request(self.endpoint("token_endpoint"), {"grant_type": DEVICE_GRANT, "device_code": device_code})
