"""The dashboard's door over real TLS: login and logout with CSRF, and each way a request is refused.

The pages themselves are driven in a real Chromium in tests/controller/test_dashboard_browser.py.
"""

from __future__ import annotations

import asyncio
import html
import re
import sqlite3
import ssl
import time
from pathlib import Path

import pytest

from controller.dashboard import sessions
from controller.dashboard.sessions import COOKIE, LOGIN_COOKIE, SESSION_SECONDS
from controller.signin.config import Grant, Provider
from tests.controller.harness import Running, run, running_controller

PROVIDER = Provider(name="idp", issuer="https://idp.example", client_id="outpost")


async def get(ctl: Running, path: str, cookie: str = "") -> tuple[int, str, dict[str, str]]:
    headers = {"Cookie": f"{COOKIE}={cookie}"} if cookie else {}
    async with ctl.session.get(ctl.api_url + path, headers=headers, allow_redirects=False) as response:
        return response.status, await response.text(), {k: v.value for k, v in response.cookies.items()}


async def login_form(ctl: Running) -> tuple[str, str]:
    """(login cookie, CSRF token of the form)."""
    status, text, cookies = await get(ctl, "/ui/login")
    assert status == 200
    match = re.search(r'name="csrf" value="([^"]+)"', text)
    assert match is not None
    return cookies[LOGIN_COOKIE], match.group(1)


async def login(ctl: Running, token: str, *, csrf: str | None = None, nonce: str | None = None,
                origin: str | None = None) -> tuple[int, str, dict[str, str], str]:
    """POST the login form; (status, body, cookies set, raw Set-Cookie of the session)."""
    form_nonce, form_csrf = await login_form(ctl)
    headers = {"Cookie": f"{LOGIN_COOKIE}={form_nonce if nonce is None else nonce}"}
    if origin is not None:
        headers["Origin"] = origin
    async with ctl.session.post(ctl.api_url + "/ui/login", data={"csrf": form_csrf if csrf is None else csrf,
                                                                "token": token},
                                headers=headers, allow_redirects=False) as response:
        raw = ";".join(v for k, v in response.raw_headers if k == b"Set-Cookie" for v in [v.decode()]
                       if v.startswith(COOKIE + "="))
        return response.status, await response.text(), {k: v.value for k, v in response.cookies.items()}, raw


def error_of(text: str) -> str:
    match = re.search(r'id="error">([^<]*)<', text)
    assert match is not None, text[:400]
    return html.unescape(match.group(1))


def test_login_sets_a_strict_secure_httponly_cookie_and_logout_needs_the_csrf_token(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl") as ctl:
            status, text, _ = await get(ctl, "/ui/fleet")
            assert status == 401 and "You are not logged in to the dashboard" in error_of(text)
            status, _, cookies, raw = await login(ctl, ctl.admin_token)
            assert status == 303 and COOKIE in cookies
            flags = raw.lower()
            assert "secure" in flags and "httponly" in flags and "samesite=strict" in flags
            assert f"max-age={SESSION_SECONDS}" in flags and "path=/ui" in flags
            cookie = cookies[COOKIE]
            status, text, _ = await get(ctl, "/ui/fleet", cookie)
            assert status == 200 and 'id="fleet"' in text and "operator" in text
            csrf = re.search(r'name="csrf" value="([^"]+)"', text)
            assert csrf is not None
            # Logout with a forged token is refused and the session lives on.
            async with ctl.session.post(ctl.api_url + "/ui/logout", data={"csrf": "forged"},
                                        headers={"Cookie": f"{COOKIE}={cookie}"}, allow_redirects=False) as r:
                assert r.status == 403 and "CSRF token is missing or forged" in error_of(await r.text())
            assert (await get(ctl, "/ui/fleet", cookie))[0] == 200
            async with ctl.session.post(ctl.api_url + "/ui/logout", data={"csrf": csrf.group(1)},
                                        headers={"Cookie": f"{COOKIE}={cookie}"}, allow_redirects=False) as r:
                assert r.status == 303 and r.headers["Location"] == "/ui/login"
            status, text, _ = await get(ctl, "/ui/fleet", cookie)
            assert status == 401 and "not known to this controller" in error_of(text)
            _, body = await ctl.call("GET", "/api/v1/audit")
            events = [e["event"] for e in body["events"]]
            assert "dashboard_login" in events and "dashboard_logout" in events

    run(scenario())


def test_a_login_without_its_csrf_token_from_another_site_or_with_a_wrong_credential_is_refused(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl") as ctl:
            for kwargs, status, sentence in (
                ({"csrf": ""}, 403, "CSRF token is missing, forged"),
                ({"csrf": "1.forged"}, 403, "CSRF token is missing, forged"),
                ({"nonce": "another-form"}, 403, "CSRF token is missing, forged"),
                ({"origin": "https://evil.example"}, 403, "not from the dashboard's own pages"),
            ):
                got, text, cookies, _ = await login(ctl, ctl.admin_token, **kwargs)  # type: ignore[arg-type]
                assert (got, COOKIE in cookies) == (status, False), kwargs
                assert sentence in error_of(text)
            got, text, cookies, _ = await login(ctl, "not-the-admin-token")
            assert got == 401 and COOKIE not in cookies and "carries no valid credential" in error_of(text)

    run(scenario())


def test_an_expired_session_and_a_cookie_of_another_controller_are_refused(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "a") as a, running_controller(tmp_path / "b") as b:
            _, _, cookies, _ = await login(a, a.admin_token)
            cookie = cookies[COOKIE]
            assert (await get(a, "/ui/fleet", cookie))[0] == 200
            status, text, _ = await get(b, "/ui/fleet", cookie)
            assert status == 401 and "cookie is from another controller" in error_of(text)
            monkeypatch.setattr(sessions, "SESSION_SECONDS", 1)
            _, _, cookies, _ = await login(a, a.admin_token)
            await asyncio.sleep(1.2)
            status, text, _ = await get(a, "/ui/fleet", cookies[COOKIE])
            assert status == 401 and "ended 30 minutes after you logged in" in error_of(text)

    run(scenario())


def test_a_persons_session_opens_the_dashboard_only_with_the_auditor_role(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl") as ctl:
            people = ctl.context.signin.people  # type: ignore[union-attr]
            far = time.time() + 3600
            _, auditor = people.sign_in(PROVIDER, {"sub": "1", "preferred_username": "ann", "exp": far}, "t1",
                                        (Grant("auditor"),), 600, "127.0.0.1")
            _, approver = people.sign_in(PROVIDER, {"sub": "2", "preferred_username": "bob", "exp": far}, "t2",
                                         (Grant("approver"),), 600, "127.0.0.1")
            status, text, _, _ = await login(ctl, approver)
            assert status == 403 and "Using the dashboard needs the auditor role; you have approver" in error_of(text)
            status, _, cookies, _ = await login(ctl, auditor)
            assert status == 303
            status, text, _ = await get(ctl, "/ui/audit", cookies[COOKIE])
            assert status == 200 and "default/ann" in text
            people.end(auditor, "127.0.0.1")  # signed out with outpostctl logout: the dashboard follows
            status, text, _ = await get(ctl, "/ui/audit", cookies[COOKIE])
            assert status == 401 and "You signed out of this session" in error_of(text)

    run(scenario())


def test_bad_filters_get_one_sentence_and_pages_forbid_foreign_assets(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl") as ctl:
            _, _, cookies, _ = await login(ctl, ctl.admin_token)
            cookie = cookies[COOKIE]
            for path, sentence in (("/ui/fleet?presence=asleep", "Unknown presence 'asleep'"),
                                   ("/ui/fleet?sort=secret", "cannot be sorted by 'secret'"),
                                   ("/ui/fleet?colour=red", "Unknown parameter 'colour'"),
                                   ("/ui/connections?since=tomorrow", "'tomorrow' is not a time"),
                                   ("/ui/gateway/default/nobody", "There is no identity default/nobody")):
                status, text, _ = await get(ctl, path, cookie)
                assert status in (400, 404) and sentence in error_of(text), (path, text[:300])
            async with ctl.session.get(ctl.api_url + "/ui/policies", headers={"Cookie": f"{COOKIE}={cookie}"}) as r:
                policy = r.headers["Content-Security-Policy"]
                assert "default-src 'none'" in policy and "frame-ancestors 'none'" in policy
                assert re.search(r'(src|href)="(https?:)?//', await r.text()) is None
            status, _, _ = await get(ctl, "/ui/static/..%2Fapp.py", cookie)
            assert status == 404

    run(scenario())


def test_the_static_files_ship_in_the_wheel_and_the_deb() -> None:
    import tomllib

    from controller.dashboard.app import STATIC, STATIC_FILES

    root = Path(__file__).resolve().parents[2]
    data = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["controller"]
    shipped = {p.name for pattern in data for p in (root / "controller").glob(pattern)}
    assert set(STATIC_FILES) <= shipped and all((STATIC / name).stat().st_size > 100 for name in STATIC_FILES)
    # The controller's .deb installs the whole package directory, static files included.
    assert "controller usr/lib/outpost-controller/" in (root / "packaging/debian/outpost-controller.install").read_text()


def test_what_the_audit_holds_is_shown_escaped_and_a_broken_chain_is_named(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from controller.dashboard import app

    monkeypatch.setattr(app, "VERIFY_REUSE_SECONDS", 0.0)

    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl") as ctl:
            hostile = '<script>alert("x")</script><img src=//evil.example/x>'
            ctl.context.audit.record("report_refused", identity="default/operator", reason=hostile)
            _, _, cookies, _ = await login(ctl, ctl.admin_token)
            status, text, _ = await get(ctl, "/ui/audit", cookies[COOKIE])
            assert status == 200 and "<script>alert" not in text and "<img src=//evil" not in text
            assert html.escape(hostile) in text and 'id="verification" class="verified"' in text
            status, text, _ = await get(ctl, "/ui/gateway/default/operator", cookies[COOKIE])
            assert status == 200 and html.escape(hostile) in text and "<script>alert" not in text
            # Someone with the store edits a row: the page says the chain is broken, and where.
            edit = sqlite3.connect(tmp_path / "ctl" / "store.sqlite3")  # as someone with the file would
            try:
                edit.executescript("DROP TRIGGER audit_no_update; DROP TRIGGER audit_no_delete;")
                [(row_id,)] = edit.execute("SELECT MAX(id) FROM audit WHERE event = 'report_refused'").fetchall()
                edit.execute("UPDATE audit SET fields = ? WHERE id = ?", ('{"reason": "nothing"}', row_id))
                edit.commit()
            finally:
                edit.close()
            status, text, _ = await get(ctl, "/ui/audit", cookies[COOKIE])
            assert 'id="verification" class="broken"' in text and f"event {row_id}:" in text

    run(scenario())


def test_a_person_with_the_role_in_one_tenant_sees_that_tenants_gateways_only(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl") as ctl:
            await ctl.create_identity("gw-acme", tenant="acme")
            await ctl.create_identity("gw-other", tenant="other")
            people = ctl.context.signin.people  # type: ignore[union-attr]
            _, token = people.sign_in(PROVIDER, {"sub": "3", "preferred_username": "cat", "exp": time.time() + 3600},
                                      "t3", (Grant("auditor", "acme"),), 600, "127.0.0.1")
            status, _, cookies, _ = await login(ctl, token)
            assert status == 303
            cookie = cookies[COOKIE]
            status, text, _ = await get(ctl, "/ui/fleet", cookie)
            assert status == 200 and "gw-acme" in text and "gw-other" not in text and ">operator<" not in text
            status, text, _ = await get(ctl, "/ui/gateway/other/gw-other", cookie)
            assert status == 404 and "There is no identity other/gw-other you may see" in error_of(text)
            assert (await get(ctl, "/ui/gateway/acme/gw-acme", cookie))[0] == 200
            status, text, _ = await get(ctl, "/ui/audit", cookie)
            assert status == 403 and error_of(text) == ("Reading the audit log (across every tenant) needs the auditor "
                                                        "role; you have auditor:acme.")

    run(scenario())


def test_a_login_form_sent_one_byte_a_second_is_cut_off_at_the_body_deadline(tmp_path: Path) -> None:
    from controller.listener import ListenerLimits
    from tests.controller.test_listener_guard import (
        LATE,
        TRICKLE_INTERVAL,
        TRICKLE_MAX_LINES,
        closed_within,
        tls_client,
    )

    short = ListenerLimits(handshake_deadline=3.0, head_deadline=3.0, body_deadline=3.0)

    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl", limits=short) as ctl:
            reader, writer = await tls_client(ctl)
            writer.write(b"POST /ui/login HTTP/1.1\r\nHost: localhost\r\n"
                         b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 1000\r\n\r\nt")
            started = asyncio.get_running_loop().time()
            closed_after = None
            for _ in range(TRICKLE_MAX_LINES):
                if await closed_within(reader, TRICKLE_INTERVAL):
                    closed_after = asyncio.get_running_loop().time() - started
                    break
                try:
                    writer.write(b"o")
                    await writer.drain()
                except (ConnectionError, ssl.SSLError):
                    closed_after = asyncio.get_running_loop().time() - started
                    break
            writer.close()
            assert closed_after is not None, "a trickling login was never cut off"
            assert short.body_deadline - 0.5 <= closed_after <= short.body_deadline + LATE

    run(scenario())
