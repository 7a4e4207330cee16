"""The dashboard's session book: hashed cookies, a hard bound on sessions, expiry, the login form's token."""

from __future__ import annotations

from controller.dashboard.sessions import LOGIN_FORM_SECONDS, MAX_SESSIONS, SESSION_SECONDS, SessionBook, digest


def test_only_the_hash_of_a_cookie_is_kept_and_a_flood_of_logins_keeps_the_newest() -> None:
    book = SessionBook()
    first, _ = book.create("admin", "admin")
    assert first not in repr(book.__dict__) and digest(first) in book._sessions
    cookies = [book.create("admin", "admin")[0] for _ in range(MAX_SESSIONS)]
    assert len(book) == MAX_SESSIONS
    assert book.find(first) == (None, "unknown")  # the oldest went first
    assert book.find(cookies[-1])[0] is not None and book.find(cookies[0])[0] is not None


def test_a_session_ends_at_its_time_and_a_login_form_token_at_its_own() -> None:
    now = [1_000_000.0]
    book = SessionBook(clock=lambda: now[0])
    cookie, session = book.create("person", "default/ann", "oidc-session")
    assert book.find(cookie)[0] is session and book.find("")[1] == "missing"
    nonce, token = book.login_form()
    assert book.login_form_valid(nonce, token) and not book.login_form_valid("other", token)
    assert not book.login_form_valid(nonce, token.replace(".", ".0", 1)) and not book.login_form_valid(nonce, "x")
    assert not SessionBook(clock=lambda: now[0]).login_form_valid(nonce, token)  # another process's key
    now[0] += LOGIN_FORM_SECONDS + 1
    assert not book.login_form_valid(nonce, token)
    now[0] += SESSION_SECONDS
    assert book.find(cookie) == (None, "expired") and book.find(cookie) == (None, "unknown")
