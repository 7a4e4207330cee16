"""A controller that trusts the test identity provider, and people signing in to it."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from controller.signin.config import Grant, Provider, SigninSettings
from tests.controller.harness import Running
from tests.oidc.harness import IdP, complete_device_login

#: The device flow's polls; at the provider's interval this bounds a sign-in to well under a minute.
MAX_POLLS = 40
#: Seconds between polls here: the tests complete the login before polling, so the first poll succeeds.
POLL_PAUSE = 0.2
PROVIDER_NAME = "test"

ROLES: dict[str, tuple[Grant, ...]] = {
    "ops-admins": (Grant("admin"),),
    "ops": (Grant("operator"),),
    "acme-admins": (Grant("admin", "acme"),),
    "audit": (Grant("auditor"),),
    "change-board": (Grant("approver"),),
}


def signin_settings(idp: IdP, **overrides: Any) -> SigninSettings:
    provider = Provider(name=PROVIDER_NAME, issuer=idp.issuer, client_id=idp.client_id, ca_file=idp.ca_file)
    return SigninSettings(**{"providers": (provider,), "roles": ROLES, **overrides})


async def call(running: Running, method: str, path: str, body: Any = None,
               bearer: str | None = None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {bearer}"} if bearer else {}
    base = running.api_url or running.url
    async with running.session.request(method, base + path, json=body, headers=headers) as response:
        return response.status, await response.json(content_type=None)


async def device_sign_in(running: Running, idp: IdP, login: str, provider: str = PROVIDER_NAME) -> dict[str, Any]:
    """What ``outpostctl login`` and the person do together; the controller's answer."""
    status, start = await call(running, "POST", "/api/v1/signin/device", {"provider": provider})
    assert status == 200, start
    status, pending = await call(running, "POST", "/api/v1/signin/device/poll",
                                 {"provider": provider, "device_code": start["device_code"]})
    assert (status, pending["error"]) == (400, "authorization_pending"), pending
    await asyncio.to_thread(complete_device_login, idp, start["verification_uri_complete"], login)
    deadline = time.monotonic() + 30
    for _ in range(MAX_POLLS):
        status, answer = await call(running, "POST", "/api/v1/signin/device/poll",
                                    {"provider": provider, "device_code": start["device_code"]})
        if status != 400 or answer.get("error") not in ("authorization_pending", "slow_down"):
            break
        assert time.monotonic() < deadline
        await asyncio.sleep(POLL_PAUSE)
    assert status == 201, answer
    return answer  # type: ignore[no-any-return]
