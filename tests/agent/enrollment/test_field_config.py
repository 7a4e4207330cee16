"""Where the agent looks for a token file: the documented places, or ``[enrollment] token_paths``."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config_file import load_config
from agent.enrollment.field import default_token_paths, find_token, token_paths
from agent.errors import ConfigError


def test_without_a_setting_the_documented_places_are_searched_in_order(tmp_path: Path) -> None:
    config_file = tmp_path / "agent.toml"
    config_file.write_text('state_dir = "/var/lib/outpost-agent"\n')
    assert token_paths(load_config(config_file)) == default_token_paths(Path("/var/lib/outpost-agent")) == (
        Path("/var/lib/outpost-agent/enroll.token"),
        Path("/etc/outpost/enroll.token"),
        Path("/boot/firmware/outpost-enroll.token"),
    )


def test_token_paths_replace_the_documented_places(tmp_path: Path) -> None:
    config_file = tmp_path / "agent.toml"
    config_file.write_text('[enrollment]\ntoken_paths = ["/media/usb/outpost.token", "/etc/outpost/enroll.token"]\n')
    assert token_paths(load_config(config_file)) == (Path("/media/usb/outpost.token"), Path("/etc/outpost/enroll.token"))


@pytest.mark.parametrize("value, complaint", [
    ('"/etc/outpost/enroll.token"', "must be a list of 1 to 16 file paths in quotes"),
    ("[]", "must be a list of 1 to 16 file paths in quotes"),
    ('["enroll.token"]', "has 'enroll.token'; give absolute paths such as \"/etc/outpost/enroll.token\""),
])
def test_a_bad_token_paths_setting_is_one_sentence_naming_the_file_and_key(tmp_path: Path, value: str, complaint: str) -> None:
    config_file = tmp_path / "agent.toml"
    config_file.write_text(f"[enrollment]\ntoken_paths = {value}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(config_file)
    assert str(caught.value) == f"{config_file}: 'enrollment.token_paths' {complaint}"


def test_the_first_regular_file_wins_and_its_digest_follows_its_content(tmp_path: Path) -> None:
    (tmp_path / "a-directory").mkdir()
    second = tmp_path / "second.token"
    third = tmp_path / "third.token"
    second.write_text("one\n")
    third.write_text("other\n")
    paths = (tmp_path / "missing.token", tmp_path / "a-directory", second, third)

    first = find_token(paths)
    assert first is not None and first.path == second
    second.write_text("two\n")
    assert find_token(paths).digest != first.digest
    second.unlink()
    assert find_token(paths).path == third
    assert find_token(paths[:2]) is None
