"""The bounded TOML read the agent's config and outpostctl's config share."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from agent.config_file import MAX_CONFIG_FILE
from agent.config_file import load_config as load_agent_config
from agent.errors import ConfigError as AgentConfigError
from outpostctl.config import MAX_CONFIG_FILE_BYTES
from outpostctl.config import load_config as load_ctl_config
from outpostctl.errors import ConfigError as CtlConfigError
from shared.toml_file import FileTooLarge, load_toml_file


def test_a_document_within_the_bound_is_read(tmp_path: Path) -> None:
    path = tmp_path / "a.toml"
    path.write_text('name = "x"\n')
    assert load_toml_file(path, len('name = "x"\n')) == {"name": "x"}


def test_a_file_one_byte_past_the_bound_is_refused_and_its_failures_are_told_apart(tmp_path: Path) -> None:
    path = tmp_path / "a.toml"
    path.write_text('name = "x"\n')
    with pytest.raises(FileTooLarge):
        load_toml_file(path, len('name = "x"\n') - 1)
    with pytest.raises(FileNotFoundError):
        load_toml_file(tmp_path / "none.toml", 100)
    path.write_bytes(b'name = "\xff"\n')
    with pytest.raises(UnicodeDecodeError):
        load_toml_file(path, 100)
    path.write_text("[name\n")
    with pytest.raises(tomllib.TOMLDecodeError):
        load_toml_file(path, 100)


def test_both_configs_refuse_a_file_past_their_bound_in_their_own_words(tmp_path: Path) -> None:
    agent = tmp_path / "agent.toml"
    agent.write_bytes(b"#" * (MAX_CONFIG_FILE + 1))
    with pytest.raises(AgentConfigError, match=rf"^the config file {agent} is larger than {MAX_CONFIG_FILE} bytes"):
        load_agent_config(agent)
    ctl = tmp_path / "outpostctl.toml"
    ctl.write_bytes(b"#" * (MAX_CONFIG_FILE_BYTES + 1))
    with pytest.raises(CtlConfigError, match=rf"^{ctl} is larger than {MAX_CONFIG_FILE_BYTES} bytes"):
        load_ctl_config(ctl)
