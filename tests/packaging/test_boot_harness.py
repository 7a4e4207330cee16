"""The boot harness finds the machine's Debian mirror in either sources format."""

from __future__ import annotations

from pathlib import Path

import pytest
from boot_harness import HarnessError, debian_mirror


def apt_dir(tmp_path: Path, files: dict[str, str]) -> Path:
    (tmp_path / "sources.list.d").mkdir()
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    return tmp_path


def test_deb822_sources_give_the_main_archive_not_security(tmp_path: Path) -> None:
    apt = apt_dir(tmp_path, {"sources.list.d/debian.sources": (
        "Types: deb\nURIs: http://security.example/debian-security\nSuites: bookworm-security\nComponents: main\n\n"
        "Types: deb\n# a comment\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\nComponents: main\n"
    )})
    assert debian_mirror(apt) == "http://mirror.example/debian"


def test_one_line_sources_list_with_options(tmp_path: Path) -> None:
    apt = apt_dir(tmp_path, {"sources.list": (
        "# deb http://old.example/debian bookworm main\n"
        "deb [arch=amd64 signed-by=/k.gpg] http://mirror.example/debian bookworm main\n"
    )})
    assert debian_mirror(apt) == "http://mirror.example/debian"


def test_no_bookworm_source_is_a_clear_error(tmp_path: Path) -> None:
    apt = apt_dir(tmp_path, {"sources.list": "deb https://packages.example/apt cloud-sdk-bookworm main\n"})
    with pytest.raises(HarnessError, match="no Debian mirror serving 'bookworm'"):
        debian_mirror(apt)
