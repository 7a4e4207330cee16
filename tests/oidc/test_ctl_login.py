"""``outpostctl login`` / ``logout`` against a controller that trusts the real test identity provider."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import stat
import threading
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import replace
from pathlib import Path

from outpostctl.cli import build_parser, main
from outpostctl.client import ManagementClient
from outpostctl.config import load_config
from outpostctl.login import load_session, login, login_browser
from tests.controller.harness import run, running_controller
from tests.oidc.harness import IdP, complete_device_login
from tests.oidc.signin_harness import call, device_sign_in, signin_settings


def person_config(tmp_path: Path, url: str, ca: Path) -> Path:
    """What a person's machine holds: where the controller is and its CA, no admin token."""
    path = tmp_path / "person.toml"
    path.write_text(f'url = "{url}"\nca = "{ca}"\n')
    return path


def test_login_polls_the_device_flow_keeps_the_session_0600_and_logout_ends_it(idp: IdP, tmp_path: Path) -> None:
    environ = {"HOME": str(tmp_path / "home")}

    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl", signin=signin_settings(idp)) as running:
            config = load_config(person_config(tmp_path, running.api_url, running.context.settings.ca_cert_path))
            printed: list[str] = []
            sleeps: list[float] = []

            def person_at_the_browser(seconds: float) -> None:
                sleeps.append(seconds)
                if len(sleeps) == 1:
                    url = printed[0].split("open ", 1)[1].split(" in a browser")[0]
                    complete_device_login(idp, url, "oscar")

            record = await asyncio.to_thread(login, ManagementClient(config), config, environ, None,
                                             printed.append, person_at_the_browser)
            assert printed[0].startswith("To sign in, open https://127.0.0.1:") and "confirm the code" in printed[0]
            assert printed[-1] == "Signed in as default/oscar with operator."
            assert sleeps and sleeps[0] >= 1  # the provider's interval, not a busy loop
            files = list((tmp_path / "home" / ".config" / "outpost").iterdir())
            assert len(files) == 1 and stat.S_IMODE(files[0].stat().st_mode) == 0o600
            assert load_session(config, environ) is not None and record["identity"] == "default/oscar"

            def cli(*argv: str) -> tuple[int, str, str]:
                out, err = io.StringIO(), io.StringIO()
                old = dict(os.environ)
                os.environ.update(environ)
                try:
                    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                        code = main([*argv, "--config", str(config.source)])
                finally:
                    os.environ.clear()
                    os.environ.update(old)
                return code, out.getvalue(), err.getvalue()

            code, out, err = await asyncio.to_thread(cli, "identity", "list")
            assert code == 0 and "oscar" in out, err
            code, out, err = await asyncio.to_thread(cli, "service", "create", "modbus")
            assert code != 0 and "Creating a service needs the admin role; you have operator." in err
            code, out, err = await asyncio.to_thread(cli, "logout")
            assert (code, out.strip()) == (0, f"signed out of {config.url} (default/oscar)"), err
            assert not files[0].exists()
            # Ended on the controller too: the bearer is worth nothing even to someone who copied it.
            async with running.session.get(running.api_url + "/api/v1/identities",
                                           headers={"Authorization": f"Bearer {record['session']}"}) as response:
                assert response.status == 401 and (await response.json())["error"] == "session_ended"
            code, out, err = await asyncio.to_thread(cli, "identity", "list")
            assert code != 0 and "sign in" in err

    run(scenario())


def test_login_with_a_browser_uses_pkce_and_a_loopback_redirect(idp: IdP, tmp_path: Path) -> None:
    environ = {"HOME": str(tmp_path / "home")}

    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl", signin=signin_settings(idp)) as running:
            config = load_config(person_config(tmp_path, running.api_url, running.context.settings.ca_cert_path))
            printed: list[str] = []
            browsers: list[threading.Thread] = []
            forged: list[int] = []

            def browser(url: str) -> None:
                query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
                assert query["code_challenge_method"] == ["S256"] and query["nonce"][0]
                redirect = query["redirect_uri"][0]
                assert redirect.startswith("http://127.0.0.1:")

                def person() -> None:
                    # Someone else's page calling the callback without this sign-in's state is ignored.
                    try:
                        urllib.request.urlopen(redirect + "?code=stolen&state=guess", timeout=10)
                    except urllib.error.HTTPError as error:
                        forged.append(error.code)
                    complete_device_login(idp, url, "alice")

                thread = threading.Thread(target=person)
                thread.start()
                browsers.append(thread)

            record = await asyncio.to_thread(login_browser, ManagementClient(config), config, environ, None,
                                             printed.append, browser)
            for thread in browsers:
                thread.join(10)
            assert forged == [404]
            assert record["identity"] == "default/alice" and printed[-1] == "Signed in as default/alice with admin."
            assert load_session(config, environ) is not None
            signin = [e for e in running.context.audit.recent() if e["event"] == "signin"]
            assert len(signin) == 1

    run(scenario())


def test_a_redirect_that_is_not_loopback_is_refused(idp: IdP, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl", signin=signin_settings(idp)) as running:
            for uri in ("https://evil.example/callback", "http://localhost:8000/cb", "http://127.0.0.1.evil/cb"):
                status, refused = await call(running, "POST", "/api/v1/signin/authorize",
                                             {"redirect_uri": uri, "code_challenge": "a" * 43, "state": "s" * 20})
                assert (status, refused["error"]) == (400, "invalid_redirect_uri"), uri

    run(scenario())


def test_whoami_names_the_person_or_the_admin_credential(idp: IdP, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl", signin=signin_settings(idp)) as running:
            person = (await device_sign_in(running, idp, "tina"))["session"]
            config = load_config(person_config(tmp_path, running.api_url, running.context.settings.ca_cert_path))
            for bearer, expected in ((person, "default/tina (admin:acme); session until "),
                                     (running.admin_token, "the admin credential (break-glass)")):
                out = io.StringIO()
                args = build_parser().parse_args(["whoami"])
                with contextlib.redirect_stdout(out):
                    code = await asyncio.to_thread(args.handler, args,
                                                   ManagementClient(replace(config, token=bearer)))
                assert code == 0 and out.getvalue().startswith(expected), out.getvalue()

    run(scenario())
