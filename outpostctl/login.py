"""``outpostctl login`` and ``logout``: a person's session, through the controller's identity provider.

The device authorization grant (RFC 8628): the controller starts it at the
provider, this prints the URL and the code, the person approves in any
browser (on another machine if this is a jump host), and this polls the
controller at the provider's interval, slower on ``slow_down``. The session
the controller hands back is kept 0600 in the person's config directory,
one file per controller, and used by every later command until it expires.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from outpostctl.client import ManagementClient
from outpostctl.config import CtlConfig
from outpostctl.errors import ApiError, ConfigError
from shared.fsutil import atomic_write, ensure_private_dir

#: RFC 8628 3.5: a client that is told ``slow_down`` adds five seconds to its interval.
SLOW_DOWN_STEP = 5.0
#: The interval when the provider names none (RFC 8628's default).
DEFAULT_INTERVAL = 5.0
#: A sign-in left this long is abandoned (providers expire device codes in 5 to 15 minutes).
MAX_LOGIN_SECONDS = 15 * 60
#: A session file holds four short values; a larger file is not ours.
MAX_SESSION_FILE = 16 * 1024
SESSION_PREFIX = "ops_"


def session_dir(environ: Mapping[str, str]) -> Path:
    base = environ.get("XDG_CONFIG_HOME") or (str(Path(environ["HOME"]) / ".config") if environ.get("HOME") else "")
    if not base:
        raise ConfigError("neither $XDG_CONFIG_HOME nor $HOME is set, so there is no place for the session; set one")
    return Path(base) / "outpost"


def session_file(config: CtlConfig, environ: Mapping[str, str]) -> Path:
    """One file per controller: signing in to a second one does not sign out of the first."""
    host = config.url.split("://", 1)[1].replace(":", "_").replace("/", "_").replace("[", "").replace("]", "")
    return session_dir(environ) / f"session-{host}.json"


def load_session(config: CtlConfig, environ: Mapping[str, str], now: float | None = None) -> dict[str, Any] | None:
    """The live session for this controller, or None (none, expired, not ours)."""
    try:
        path = session_file(config, environ)
        with open(path, "rb") as handle:
            raw = handle.read(MAX_SESSION_FILE + 1)
        session = json.loads(raw)
    except (OSError, ValueError, ConfigError):
        return None
    if not isinstance(session, dict) or session.get("url") != config.url:
        return None
    token, expires = session.get("session"), session.get("expires_at")
    if not isinstance(token, str) or not token.startswith(SESSION_PREFIX) or not isinstance(expires, int | float):
        return None
    if expires <= (time.time() if now is None else now):
        return None
    return session


def with_session(config: CtlConfig, environ: Mapping[str, str]) -> CtlConfig:
    """The config with the person's session as the bearer, where there is one: a person acts as themselves."""
    session = load_session(config, environ)
    return config if session is None else replace(config, token=str(session["session"]))


def login(client: ManagementClient, config: CtlConfig, environ: Mapping[str, str], provider: str | None,
          out: Callable[[str], None] = print, sleep: Callable[[float], None] = time.sleep) -> dict[str, Any]:
    body: dict[str, Any] = {} if provider is None else {"provider": provider}
    start = client.request("POST", "/signin/device", body)
    url = start.get("verification_uri_complete") or start["verification_uri"]
    out(f"To sign in, open {url} in a browser and confirm the code {start['user_code']}.")
    interval = float(start.get("interval") or DEFAULT_INTERVAL)
    deadline = time.monotonic() + min(float(start.get("expires_in") or MAX_LOGIN_SECONDS), MAX_LOGIN_SECONDS)
    poll = {"provider": start["provider"], "device_code": start["device_code"]}
    while True:
        sleep(interval)
        try:
            answer = client.request("POST", "/signin/device/poll", poll)
            break
        except ApiError as error:
            if error.code == "slow_down":
                interval += SLOW_DOWN_STEP
            elif error.code != "authorization_pending":
                raise
        if time.monotonic() > deadline:
            raise ConfigError("the sign-in was not confirmed in time; run outpostctl login again")
    directory = session_dir(environ)
    ensure_private_dir(directory)
    record = {"url": config.url, "session": answer["session"], "identity": answer["identity"],
              "name": answer["name"], "tenant": answer["tenant"], "grants": answer["grants"],
              "expires_at": answer["expires_at"]}
    atomic_write(session_file(config, environ), json.dumps(record).encode())
    out(str(answer["message"]))
    return record


def logout(config: CtlConfig, environ: Mapping[str, str], out: Callable[[str], None] = print) -> int:
    session = load_session(config, environ)
    path = session_file(config, environ)
    if session is None:
        if path.exists():
            path.unlink()
        out("not signed in to this controller")
        return 0
    try:
        ManagementClient(replace(config, token=str(session["session"]))).request("POST", "/signin/logout")
    finally:
        # Gone from this machine whatever the controller said: an ended session is worth nothing anyway.
        os.unlink(path)
    out(f"signed out of {config.url} ({session['identity']})")
    return 0
