"""The admin credential: a salted hash on the controller, rotated at once, migrated from plaintext;
and the management API on a listener of its own."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from controller.admin_credential import AdminCredential, hash_line, parse_hash_line
from controller.bootstrap import open_data_dir
from controller.settings import Settings
from tests.controller.harness import admin_token_of, run, running_controller

ROOT = Path(__file__).resolve().parents[2]
#: One CLI command: an interpreter start and two small files written.
CLI_TIMEOUT = 30


def rotate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "controller.cli", "admin-token", "rotate", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=CLI_TIMEOUT)


def files_holding(data_dir: Path, secret: str) -> list[str]:
    return sorted(str(p.relative_to(data_dir)) for p in data_dir.rglob("*")
                  if p.is_file() and secret.encode() in p.read_bytes())


def test_the_controller_keeps_a_salted_hash_and_the_plaintext_is_only_in_outpostctl_toml(data_dir: Path) -> None:
    async def scenario() -> None:
        async with running_controller(data_dir) as ctl:
            token = ctl.admin_token
            assert files_holding(data_dir, token) == ["outpostctl.toml"]
            assert stat.S_IMODE((data_dir / "admin.hash").stat().st_mode) == 0o600
            assert (await ctl.call("GET", "/api/v1/status"))[0] == 200
            ctl.admin_token = token[:-1] + ("A" if token[-1] != "A" else "B")
            assert (await ctl.call("GET", "/api/v1/status"))[0] == 401
            ctl.admin_token = "Bearer"
            assert (await ctl.call("GET", "/api/v1/status"))[0] == 401

    run(scenario())
    # Two hashes of one token differ (salted), and both verify it.
    first, second = hash_line("same"), hash_line("same")
    assert first != second
    credential = AdminCredential(data_dir / "admin.hash")
    assert credential.check(admin_token_of(data_dir)) and not credential.check("same")
    assert parse_hash_line(first)[0] != parse_hash_line(second)[0]


def test_a_rotation_invalidates_the_old_token_at_once_in_a_running_controller(data_dir: Path) -> None:
    async def scenario() -> None:
        async with running_controller(data_dir) as ctl:
            old = ctl.admin_token
            assert (await ctl.call("GET", "/api/v1/status"))[0] == 200
            result = await asyncio.to_thread(rotate, "--data", str(data_dir))
            assert result.returncode == 0, result.stderr
            assert "outpostctl.toml" in result.stdout and old not in result.stdout
            new = admin_token_of(data_dir)
            assert new != old
            assert (await ctl.call("GET", "/api/v1/status"))[0] == 401
            ctl.admin_token = new
            assert (await ctl.call("GET", "/api/v1/status"))[0] == 200
            config = tomllib.loads((data_dir / "outpostctl.toml").read_text())
            assert config["url"] == ctl.url and stat.S_IMODE((data_dir / "outpostctl.toml").stat().st_mode) == 0o600
            assert files_holding(data_dir, new) == ["outpostctl.toml"]

    run(scenario())


def test_a_rotation_can_write_the_operators_file_elsewhere_and_refuses_a_non_data_directory(
        data_dir: Path, tmp_path: Path) -> None:
    async def start_once() -> None:
        async with running_controller(data_dir):
            pass

    run(start_once())
    out = tmp_path / "operator" / "outpostctl.toml"
    out.parent.mkdir()
    result = rotate("--data", str(data_dir), "--out", str(out))
    assert result.returncode == 0, result.stderr
    token = tomllib.loads(out.read_text())["token"]
    assert files_holding(data_dir, token) == []
    assert AdminCredential(data_dir / "admin.hash").check(token)

    refused = rotate("--data", str(tmp_path / "operator"))
    assert refused.returncode != 0
    assert refused.stderr.strip().count("\n") == 0 and "not a controller data directory" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_a_plaintext_admin_token_of_an_older_data_directory_is_migrated_on_start(data_dir: Path) -> None:
    settings = Settings(data_dir=data_dir, listen_host="127.0.0.1", listen_port=1)
    open_data_dir(settings).close()
    token = admin_token_of(data_dir)
    # The layout older versions wrote: the credential in plaintext, no hash.
    (data_dir / "admin.hash").unlink()
    (data_dir / "admin.token").write_text(token + "\n")

    async def scenario() -> None:
        async with running_controller(data_dir) as ctl:
            assert not (data_dir / "admin.token").exists() and (data_dir / "admin.hash").exists()
            assert (await ctl.call("GET", "/api/v1/status"))[0] == 200
            assert files_holding(data_dir, token) == ["outpostctl.toml"]

    run(scenario())


def test_the_management_api_on_its_own_listener_is_not_served_on_the_public_one(data_dir: Path) -> None:
    async def scenario() -> None:
        async with running_controller(data_dir, separate_api=True) as ctl:
            assert ctl.api_url != ctl.url
            assert (await ctl.call("GET", "/api/v1/status"))[0] == 200
            async with ctl.session.get(ctl.url + "/api/v1/status", headers=ctl.admin) as public:
                assert public.status == 404
                assert "its own listener" in (await public.json())["message"]
            async with ctl.session.get(ctl.api_url + "/v1/time") as gateway_route:
                assert gateway_route.status == 404
            async with ctl.session.get(ctl.url + "/v1/time") as gateway_route:
                assert gateway_route.status == 200
            assert tomllib.loads((data_dir / "outpostctl.toml").read_text())["url"] == ctl.api_url

    run(scenario())


def test_a_restart_never_writes_the_token_again_once_outpostctl_toml_was_moved_to_the_operator(
        data_dir: Path, tmp_path: Path) -> None:
    async def once() -> str:
        async with running_controller(data_dir) as ctl:
            return ctl.admin_token

    token = run(once())
    moved = tmp_path / "operator.toml"
    (data_dir / "outpostctl.toml").rename(moved)

    async def again() -> None:
        async with running_controller(data_dir) as ctl:
            ctl.admin_token = token
            assert (await ctl.call("GET", "/api/v1/status"))[0] == 200
        assert not (data_dir / "outpostctl.toml").exists()
        assert files_holding(data_dir, token) == []

    run(again())
    # Without the file, a rotation needs to be told the URL, and refuses one that is not https.
    refused = rotate("--data", str(data_dir))
    assert refused.returncode != 0 and "--url" in refused.stderr and "Traceback" not in refused.stderr
    bad = rotate("--data", str(data_dir), "--url", "http://x")
    assert bad.returncode != 0 and "must be the management API" in bad.stderr
    good = rotate("--data", str(data_dir), "--url", "https://controller.example:8443")
    assert good.returncode == 0, good.stderr
    assert tomllib.loads((data_dir / "outpostctl.toml").read_text())["url"] == "https://controller.example:8443"


def test_root_rotating_another_users_data_directory_leaves_the_files_to_that_user(data_dir: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("only root can give files to another user")
    run(_start_once(data_dir))
    for path in [data_dir, *data_dir.rglob("*")]:
        os.chown(path, 4242, 4242)  # as the packaged service's user would own them
    result = rotate("--data", str(data_dir))
    assert result.returncode == 0, result.stderr
    for name in ("admin.hash", "outpostctl.toml"):
        info = (data_dir / name).stat()
        assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (4242, 4242, 0o600), name


async def _start_once(data_dir: Path) -> None:
    async with running_controller(data_dir):
        pass
