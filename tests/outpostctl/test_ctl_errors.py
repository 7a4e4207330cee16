"""What an operator reads when something is wrong, and that nothing changed because of it."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from agent.errors import EXIT_UNAVAILABLE, EXIT_USAGE
from tests.outpostctl.harness import Ctl, RunningController, other_ca_pem, run_outpostctl, subprocess_env


def one_sentence(err: str) -> str:
    """The single stderr line, checked to be the outpostctl form with no traceback."""
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("outpostctl: ")
    return lines[0]


def config_copy(controller: RunningController, folder: Path, **changes: str) -> Path:
    """The controller's outpostctl.toml with some values changed, written into ``folder``."""
    values = {"url": controller.url, "ca": str(controller.data / "ca" / "ca.pem"), "token": admin_token(controller)}
    values.update(changes)
    path = folder / "outpostctl.toml"
    path.write_text("".join(f'{key} = "{value}"\n' for key, value in values.items()))
    return path


def admin_token(controller: RunningController) -> str:
    import tomllib
    return tomllib.loads(controller.config_path.read_text())["token"]


def identity_names(ctl: Ctl) -> set[str]:
    return {i["name"] for i in json.loads(ctl.ok("identity", "list", "--json").out)["identities"]}


def test_a_wrong_admin_token_is_a_clear_401_sentence(controller: RunningController, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    wrong = "not-the-admin-token-" + "x" * 20
    config = config_copy(controller, tmp_path, token=wrong)
    result = run_outpostctl("--config", str(config), "identity", "list")
    sentence = one_sentence(result.err)
    assert result.code == EXIT_USAGE
    assert "refused the admin token" in sentence and "401" in sentence and str(config) in sentence
    assert wrong not in result.err + result.out, "the token is never printed"


def test_the_real_admin_token_is_never_printed(ctl: Ctl, controller: RunningController, tmp_path: Path) -> None:
    token = admin_token(controller)
    outputs = [ctl("identity", "create", "gw-secret", "--token-out", str(tmp_path / "s.token")),
               ctl("identity", "list"), ctl("status", "--json"), ctl("identity", "show", "nobody-here")]
    for result in outputs:
        assert token not in result.out + result.err


def test_a_stopped_controller_is_named_with_its_url(controller: RunningController, tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Nothing listens on a port we just released.
    config = config_copy(controller, tmp_path, url=f"https://127.0.0.1:{port}")
    result = run_outpostctl("status", env=subprocess_env(OUTPOSTCTL_CONFIG=str(config)))
    assert result.code == EXIT_UNAVAILABLE
    assert one_sentence(result.err) == (
        f"outpostctl: cannot reach the controller at https://127.0.0.1:{port}: connection refused; is it running?"
    )


def test_a_certificate_not_from_the_configured_ca_is_refused(controller: RunningController, tmp_path: Path) -> None:
    config = config_copy(controller, tmp_path, ca=str(other_ca_pem(tmp_path)))
    result = run_outpostctl("--config", str(config), "identity", "list")
    assert result.code != 0
    sentence = one_sentence(result.err)
    assert f"the certificate presented at {controller.url} is not from the controller CA in" in sentence
    assert result.out == ""


@pytest.mark.parametrize("bad_name", ["Gateway_1", "-leading-hyphen", "x" * 64])
def test_an_invalid_identity_name_gets_the_controllers_sentence_and_creates_nothing(
        ctl: Ctl, tmp_path: Path, bad_name: str) -> None:
    before = identity_names(ctl)
    token_file = tmp_path / "bad.token"
    # "--" so that argparse passes a name starting with a hyphen on to the controller.
    result = ctl("identity", "create", "--token-out", str(token_file), "--", bad_name)
    assert result.code != 0
    sentence = one_sentence(result.err)
    assert "is not valid; use 1 to 63 lowercase letters, digits or hyphens" in sentence
    assert not token_file.exists()
    assert identity_names(ctl) == before


def test_an_invalid_service_name_gets_the_controllers_sentence(ctl: Ctl) -> None:
    result = ctl("service", "create", "Modbus!")
    assert result.code != 0
    assert "The service name 'Modbus!' is not valid" in one_sentence(result.err)
    services = json.loads(ctl.ok("service", "list", "--json").out)["services"]
    assert "Modbus!" not in {s["name"] for s in services}


@pytest.mark.parametrize("selector", ["role:", "Bad/Name", "a/b/c", "role:x/"])
def test_a_policy_with_a_bad_selector_is_refused_and_not_stored(ctl: Ctl, selector: str) -> None:
    before = json.loads(ctl.ok("policy", "list", "--json").out)["policies"]
    result = ctl("policy", "create", "--kind", "dial", "--identities", selector, "--services", "anything")
    assert result.code != 0
    sentence = one_sentence(result.err)
    # The controller names the part that is wrong: the selector, its tenant or its name.
    assert " is not valid; " in sentence
    assert json.loads(ctl.ok("policy", "list", "--json").out)["policies"] == before


def test_an_empty_selector_is_refused_before_the_controller_is_asked(ctl: Ctl) -> None:
    result = ctl("policy", "create", "--kind", "bind", "--identities", "a,,b", "--services", "s")
    assert result.code == EXIT_USAGE
    assert "has an empty selector" in one_sentence(result.err)


def test_an_existing_token_file_is_kept_and_no_identity_is_created(ctl: Ctl, tmp_path: Path) -> None:
    token_file = tmp_path / "promised.token"
    token_file.write_text("a token already given to a technician\n")
    result = ctl("identity", "create", "gw-kept", "--token-out", str(token_file))
    assert result.code != 0
    assert "already exists; choose another --token-out or pass --force" in one_sentence(result.err)
    assert token_file.read_text() == "a token already given to a technician\n"
    assert "gw-kept" not in identity_names(ctl)


def test_force_replaces_an_existing_token_file(ctl: Ctl, tmp_path: Path) -> None:
    token_file = tmp_path / "replace.token"
    token_file.write_text("old\n")
    ctl.ok("identity", "create", "gw-forced", "--token-out", str(token_file), "--force")
    assert token_file.read_text().count(".") == 2, "a JWT replaced the old content"


def test_creating_an_identity_twice_gets_the_controllers_sentence_and_keeps_the_first(
        ctl: Ctl, tmp_path: Path) -> None:
    ctl.ok("identity", "create", "gw-twice", "--token-out", str(tmp_path / "one.token"))
    result = ctl("identity", "create", "gw-twice", "--token-out", str(tmp_path / "two.token"))
    assert result.code != 0
    assert "gw-twice" in one_sentence(result.err)
    assert not (tmp_path / "two.token").exists()


def test_an_unknown_identity_is_a_sentence_not_a_traceback(ctl: Ctl) -> None:
    result = ctl("identity", "show", "nobody-by-this-name")
    assert result.code != 0
    assert "nobody-by-this-name" in one_sentence(result.err)


def test_a_missing_config_from_a_shell_is_one_sentence(tmp_path: Path) -> None:
    from outpostctl.config import SYSTEM_CONFIG_PATHS
    if any(path.exists() for path in SYSTEM_CONFIG_PATHS):
        pytest.skip("this host has a system-wide outpostctl config")
    env = subprocess_env(HOME=str(tmp_path / "home"))
    result = run_outpostctl("identity", "list", env=env, cwd=tmp_path)
    assert result.code == EXIT_USAGE
    sentence = one_sentence(result.err)
    assert sentence.startswith("outpostctl: no outpostctl config found (looked for")
    assert sentence.endswith("start the controller (outpost-controller serve --data DIR) and pass --data DIR "
                             "or set OUTPOSTCTL_CONFIG")
