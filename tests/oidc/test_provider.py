"""The test identity provider itself: discovery, JWKS and the device flow driven as a person would."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import jwt

from tests.oidc.harness import IdP, complete_device_login

#: The device flow's poll answers at once on loopback; this bounds a broken provider.
POLLS = 20


def _get(idp: IdP, url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, context=idp.ssl_context(), timeout=10) as r:
        return json.loads(r.read())  # type: ignore[no-any-return]


def _post(idp: IdP, url: str, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, data=urllib.parse.urlencode(form).encode())
    try:
        with urllib.request.urlopen(request, context=idp.ssl_context(), timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_device_flow_gives_an_id_token_with_groups(idp: IdP) -> None:
    meta = _get(idp, idp.issuer + "/.well-known/openid-configuration")
    assert meta["issuer"] == idp.issuer
    status, start = _post(idp, meta["device_authorization_endpoint"],
                          {"client_id": idp.client_id, "scope": "openid profile groups"})
    assert status == 200, start
    grant = {"grant_type": "urn:ietf:params:oauth:grant-type:device_code", "device_code": start["device_code"],
             "client_id": idp.client_id}
    status, pending = _post(idp, meta["token_endpoint"], grant)
    assert (status, pending["error"]) == (400, "authorization_pending")
    complete_device_login(idp, start["verification_uri_complete"], "alice")
    for _ in range(POLLS):
        status, tokens = _post(idp, meta["token_endpoint"], grant)
        if status == 200:
            break
        time.sleep(0.2)
    assert status == 200, tokens
    claims = jwt.decode(tokens["id_token"], idp.signing_key.public_key(), algorithms=["RS256"],
                        audience=idp.client_id, issuer=idp.issuer)
    assert claims["sub"] == "alice"
    assert claims["groups"] == ["ops-admins"]
