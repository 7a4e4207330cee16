"""``outpostctl login`` and ``logout``: a person's session, through the controller's identity provider.

The device authorization grant (RFC 8628): the controller starts it at the
provider, this prints the URL and the code, the person approves in any
browser (on another machine if this is a jump host), and this polls the
controller at the provider's interval, slower on ``slow_down``. The session
the controller hands back is kept 0600 in the person's config directory,
one file per controller, and used by every later command until it expires.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import os
import secrets
import time
import urllib.parse
import webbrowser
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
#: RFC 7636: a verifier of 43 to 128 characters; 48 random bytes make 64.
PKCE_VERIFIER_BYTES = 48
CALLBACK_PATH = "/callback"
#: How often the wait for the browser looks at the deadline (the loopback server's accept timeout).
CALLBACK_POLL_SECONDS = 1.0


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
    return _keep(config, environ, answer, out)


def _keep(config: CtlConfig, environ: Mapping[str, str], answer: dict[str, Any],
          out: Callable[[str], None]) -> dict[str, Any]:
    """Store the session the controller answered, 0600, and say who signed in."""
    directory = session_dir(environ)
    ensure_private_dir(directory)
    record = {"url": config.url, "session": answer["session"], "identity": answer["identity"],
              "name": answer["name"], "tenant": answer["tenant"], "grants": answer["grants"],
              "expires_at": answer["expires_at"]}
    atomic_write(session_file(config, environ), json.dumps(record).encode())
    out(str(answer["message"]))
    return record


class _Callback(http.server.BaseHTTPRequestHandler):
    """The one request the browser makes to the loopback redirect: the code, or the provider's refusal."""

    server: _CallbackServer

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        parts = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(parts.query)
        if parts.path != CALLBACK_PATH or query.get("state", [""])[0] != self.server.state:
            # Another page, or a request forged without this sign-in's state: not ours, keep waiting.
            self.send_error(404)
            return
        self.server.result = {k: v[0] for k, v in query.items()}
        body = b"Outpost: you may close this window and return to the terminal.\n"
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # the code must not reach a terminal or a log
        pass


class _CallbackServer(http.server.HTTPServer):
    state = ""
    result: dict[str, str] | None = None


def login_browser(client: ManagementClient, config: CtlConfig, environ: Mapping[str, str], provider: str | None,
                  out: Callable[[str], None] = print,
                  open_browser: Callable[[str], object] = webbrowser.open) -> dict[str, Any]:
    """The authorization code flow with PKCE and a loopback redirect (RFC 8252), for a browser at hand."""
    verifier = secrets.token_urlsafe(PKCE_VERIFIER_BYTES)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    server = _CallbackServer(("127.0.0.1", 0), _Callback)
    server.state = secrets.token_urlsafe(24)
    server.timeout = CALLBACK_POLL_SECONDS
    try:
        redirect_uri = f"http://127.0.0.1:{server.server_address[1]}{CALLBACK_PATH}"
        body: dict[str, Any] = {"redirect_uri": redirect_uri, "code_challenge": challenge, "state": server.state}
        if provider is not None:
            body["provider"] = provider
        start = client.request("POST", "/signin/authorize", body)
        out(f"To sign in, open {start['authorization_url']} in a browser on this machine.")
        open_browser(start["authorization_url"])
        deadline = time.monotonic() + MAX_LOGIN_SECONDS
        while server.result is None:
            if time.monotonic() > deadline:
                raise ConfigError("the sign-in was not completed in the browser in time; run outpostctl login again")
            server.handle_request()
        result = server.result
    finally:
        server.server_close()
    if "code" not in result:
        raise ConfigError(f"the identity provider refused the sign-in ({result.get('error', 'no code')[:60]}); "
                          "run outpostctl login again")
    answer = client.request("POST", "/signin/code", {
        "provider": start["provider"], "code": result["code"], "code_verifier": verifier,
        "redirect_uri": redirect_uri, "nonce": start["nonce"]})
    return _keep(config, environ, answer, out)


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
