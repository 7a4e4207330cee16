"""The dashboard's cookie sessions and CSRF tokens.

A session lives in this process's memory only, under the SHA-256 of its
cookie (a copy of the table, a core dump, leaks no usable cookie). A
controller restart, or another controller process behind the same
address, does not know it: the browser is sent to log in again. That is
the price of keeping the store free of a table for something this
short-lived; it is written in docs/dashboard.md.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

#: A session ends this long after login, used or not: a dashboard left open on
#: a shared screen does not stay signed in through the night.
SESSION_SECONDS = 30 * 60
#: Sessions one process holds at once: logins need the credential, so this is
#: only a bound on memory against a script logging in in a loop (the oldest goes).
MAX_SESSIONS = 1000
#: A login form is good for this long: enough to type a token, short enough
#: that a token copied from an old page is useless.
LOGIN_FORM_SECONDS = 10 * 60
COOKIE = "outpost_ui"
LOGIN_COOKIE = "outpost_ui_login"
#: Random bytes in a cookie and in a CSRF token.
TOKEN_BYTES = 32


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass
class Session:
    """Who logged in: the admin credential, or a person (their session bearer, checked again on every page)."""

    kind: str  # "admin" or "person"
    name: str
    csrf: str
    expires_at: float
    #: a person's ``outpostctl login`` bearer: every page asks the sign-in service whether it still holds
    bearer: str = field(default="", repr=False)


class SessionBook:
    """The sessions of this process, by the hash of their cookie."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._sessions: dict[str, Session] = {}
        #: the key of this process's login-form tokens (a form from another controller does not verify here)
        self._form_key = secrets.token_bytes(TOKEN_BYTES)

    def create(self, kind: str, name: str, bearer: str = "") -> tuple[str, Session]:
        """A new session and the cookie value that names it (the cookie itself is not kept)."""
        self._expire()
        while len(self._sessions) >= MAX_SESSIONS:
            del self._sessions[next(iter(self._sessions))]  # the oldest: dicts keep insertion order
        cookie = secrets.token_urlsafe(TOKEN_BYTES)
        session = Session(kind, name, secrets.token_urlsafe(TOKEN_BYTES), self.clock() + SESSION_SECONDS, bearer)
        self._sessions[digest(cookie)] = session
        return cookie, session

    def find(self, cookie: str) -> tuple[Session | None, str]:
        """The session a cookie names, or None and why not (``missing``, ``unknown``, ``expired``)."""
        if not cookie:
            return None, "missing"
        key = digest(cookie)
        session = self._sessions.get(key)
        if session is None:
            return None, "unknown"
        if session.expires_at <= self.clock():
            del self._sessions[key]
            return None, "expired"
        return session, ""

    def end(self, cookie: str) -> None:
        self._sessions.pop(digest(cookie), None)

    def _expire(self) -> None:
        now = self.clock()
        for key in [k for k, s in self._sessions.items() if s.expires_at <= now]:
            del self._sessions[key]

    def __len__(self) -> int:
        return len(self._sessions)

    # The login form's CSRF token: a random nonce in a cookie, and in the form its MAC under this
    # process's key with the time it was issued; nothing is stored until the login succeeds.

    def login_form(self) -> tuple[str, str]:
        """(cookie value, form token) for one login form."""
        nonce = secrets.token_urlsafe(TOKEN_BYTES)
        issued = str(int(self.clock()))
        return nonce, f"{issued}.{self._form_mac(nonce, issued)}"

    def login_form_valid(self, nonce: str, token: str) -> bool:
        issued, _, mac = token.partition(".")
        if not nonce or not issued.isdigit() or not hmac.compare_digest(mac, self._form_mac(nonce, issued)):
            return False
        return 0 <= self.clock() - int(issued) <= LOGIN_FORM_SECONDS

    def _form_mac(self, nonce: str, issued: str) -> str:
        return hmac.new(self._form_key, f"{nonce}.{issued}".encode(), hashlib.sha256).hexdigest()


def csrf_matches(session: Session, presented: str) -> bool:
    return bool(presented) and hmac.compare_digest(session.csrf.encode(), presented.encode())
