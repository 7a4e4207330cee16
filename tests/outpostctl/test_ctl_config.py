"""Where outpostctl looks for its config, in which order, and what it says when it finds none."""

from __future__ import annotations

from pathlib import Path

import pytest

from outpostctl.cli import main
from outpostctl.config import (
    CONFIG_ENV_VAR,
    CtlConfig,
    find_config_file,
    load_config,
)
from outpostctl.errors import ConfigError

TOKEN = "admin-secret-0123456789abcdef"


def write_config(folder: Path, *, url: str = "https://127.0.0.1:8443", ca: str = "ca.pem",
                 token: str = TOKEN) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ca.pem").write_text("not checked until a connection is made\n")
    path = folder / "outpostctl.toml"
    path.write_text(f'url = "{url}"\nca = "{ca}"\ntoken = "{token}"\n')
    return path


@pytest.fixture
def places(tmp_path: Path) -> dict[str, Path]:
    """One config file in every place outpostctl looks, each one distinct."""
    names = ["flag", "env", "data", "cwd", "home", "etc", "varlib"]
    found = {name: write_config(tmp_path / name) for name in names}
    # The user's file lives under HOME/.config/outpost/.
    home_file = write_config(tmp_path / "homedir" / ".config" / "outpost")
    found["home"] = home_file
    return found


def find(places: dict[str, Path], tmp_path: Path, *, flag: bool, env: bool, data: bool, cwd: bool = True,
         home: bool = True) -> Path:
    return find_config_file(
        config_flag=places["flag"] if flag else None,
        data_flag=places["data"].parent if data else None,
        environ={CONFIG_ENV_VAR: str(places["env"])} if env else {},
        cwd=places["cwd"].parent if cwd else tmp_path / "empty",
        home=tmp_path / "homedir" if home else None,
        system_paths=(places["etc"], places["varlib"]),
    )


def test_config_flag_beats_environment_and_data_dir(places: dict[str, Path], tmp_path: Path) -> None:
    assert find(places, tmp_path, flag=True, env=True, data=True) == places["flag"]


def test_environment_beats_data_dir(places: dict[str, Path], tmp_path: Path) -> None:
    assert find(places, tmp_path, flag=False, env=True, data=True) == places["env"]


def test_data_dir_beats_the_current_directory(places: dict[str, Path], tmp_path: Path) -> None:
    assert find(places, tmp_path, flag=False, env=False, data=True) == places["data"]


def test_current_directory_beats_the_users_config(places: dict[str, Path], tmp_path: Path) -> None:
    assert find(places, tmp_path, flag=False, env=False, data=False) == places["cwd"]


def test_users_config_beats_the_system_ones(places: dict[str, Path], tmp_path: Path) -> None:
    assert find(places, tmp_path, flag=False, env=False, data=False, cwd=False) == places["home"]


def test_etc_beats_the_controllers_default_data_dir(places: dict[str, Path], tmp_path: Path) -> None:
    assert find(places, tmp_path, flag=False, env=False, data=False, cwd=False, home=False) == places["etc"]
    places["etc"].unlink()
    assert find(places, tmp_path, flag=False, env=False, data=False, cwd=False, home=False) == places["varlib"]


def test_an_explicit_config_that_is_missing_is_an_error_not_a_fallback(places: dict[str, Path], tmp_path: Path) -> None:
    places["flag"].unlink()
    with pytest.raises(ConfigError, match=r"flag/outpostctl.toml \(from --config\) does not exist"):
        find(places, tmp_path, flag=True, env=True, data=True)


def test_no_config_anywhere_names_every_place_and_how_to_start(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        find_config_file(config_flag=None, data_flag=None, environ={}, cwd=tmp_path, home=tmp_path / "h",
                         system_paths=(tmp_path / "etc.toml",))
    sentence = str(caught.value)
    assert "\n" not in sentence
    for place in ("--config", CONFIG_ENV_VAR, "--data DIR", str(tmp_path / "outpostctl.toml"),
                  str(tmp_path / "h" / ".config" / "outpost" / "outpostctl.toml"), str(tmp_path / "etc.toml")):
        assert place in sentence
    assert "start the controller (outpost-controller serve --data DIR) and pass --data DIR or set OUTPOSTCTL_CONFIG" in sentence


def test_cli_without_any_config_prints_one_sentence_and_exits_non_zero(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv(CONFIG_ENV_VAR, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("outpostctl.config.SYSTEM_CONFIG_PATHS", ())
    code = main(["identity", "list"])
    captured = capsys.readouterr()
    assert code != 0
    assert captured.out == ""
    assert captured.err.startswith("outpostctl: no outpostctl config found")
    assert captured.err.count("\n") == 1
    assert "Traceback" not in captured.err


def test_relative_ca_path_is_relative_to_the_config_file(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path / "dir"))
    assert config.ca_path == tmp_path / "dir" / "ca.pem"
    assert config.url == "https://127.0.0.1:8443"
    assert config.token == TOKEN


def test_the_admin_token_never_appears_in_the_configs_repr(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path / "dir"))
    assert isinstance(config, CtlConfig)
    assert TOKEN not in repr(config)
    assert TOKEN not in str(config)


@pytest.mark.parametrize("url", ["http://127.0.0.1:8443", "127.0.0.1:8443", "https://"])
def test_a_url_that_is_not_https_is_refused(tmp_path: Path, url: str) -> None:
    with pytest.raises(ConfigError, match="url must be https://HOST:PORT"):
        load_config(write_config(tmp_path / "dir", url=url))


def test_a_missing_ca_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"the CA file .*nowhere.pem does not exist"):
        load_config(write_config(tmp_path / "dir", ca="nowhere.pem"))


def test_an_empty_token_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"has no 'token' value"):
        load_config(write_config(tmp_path / "dir", token=""))


def test_a_token_an_http_header_cannot_carry_is_refused_without_quoting_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="characters an HTTP header cannot carry") as caught:
        load_config(write_config(tmp_path / "dir", token="secret-part\\nInjected: header"))
    assert "secret-part" not in str(caught.value)


def test_a_file_that_is_not_toml_is_refused_with_its_name(tmp_path: Path) -> None:
    path = tmp_path / "outpostctl.toml"
    path.write_text("url = https://oops\n")
    with pytest.raises(ConfigError, match=r"outpostctl.toml is not valid TOML"):
        load_config(path)
