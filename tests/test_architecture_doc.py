"""docs/architecture.md names every module of the four packages, one line each, so a newcomer finds each concern."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "architecture.md"
PACKAGES = ("agent", "controller", "outpostctl", "shared")
#: A module's line in the doc: a list item that starts with its path in backticks, then what it is.
MODULE_LINE = re.compile(r"^\s*- `(?P<path>[\w/]+(?:\.py|/))`: \S")


def is_package_marker(path: Path) -> bool:
    """An ``__init__.py`` with nothing in it but perhaps a docstring: its folder's line stands for it."""
    if path.name != "__init__.py":
        return False
    body = ast.parse(path.read_text()).body
    return not body or (len(body) == 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant))


def modules_and_folders(root: Path) -> set[str]:
    """Every module of the four packages (``agent/cli.py``) and every sub-package folder (``agent/clock/``)."""
    found: set[str] = set()
    for package in PACKAGES:
        for path in (root / package).rglob("*.py"):
            if "__pycache__" in path.parts:
                continue
            relative = path.relative_to(root)
            if relative.parent != Path(package):
                found.add(relative.parent.as_posix() + "/")
            if not is_package_marker(path):
                found.add(relative.as_posix())
    return found


def listed(doc: str) -> list[str]:
    return [match["path"] for line in doc.splitlines() if (match := MODULE_LINE.match(line))]


def missing_from_doc(root: Path, doc: str) -> list[str]:
    return sorted(modules_and_folders(root) - set(listed(doc)))


def test_every_module_and_folder_has_its_line_in_docs_architecture_md() -> None:
    missing = missing_from_doc(ROOT, DOC.read_text())
    assert not missing, "docs/architecture.md has no line for: " + ", ".join(missing) + (
        "; add one line each under its package: - `path`: what it is for"
    )


def test_every_line_names_a_module_that_exists_and_none_twice() -> None:
    paths = listed(DOC.read_text())
    assert len(paths) == len(set(paths)), sorted({p for p in paths if paths.count(p) > 1})
    gone = sorted(p for p in paths if not (ROOT / p).exists())
    assert not gone, "docs/architecture.md lists modules that do not exist: " + ", ".join(gone)


def test_a_new_module_without_a_line_is_found(tmp_path: Path) -> None:
    for package in PACKAGES:
        (tmp_path / package / "sub").mkdir(parents=True)
        (tmp_path / package / "__init__.py").write_text('"""A package."""\n')
        (tmp_path / package / "sub" / "__init__.py").write_text("")
    (tmp_path / "agent" / "cli.py").write_text("x = 1\n")
    (tmp_path / "agent" / "sub" / "new.py").write_text("x = 1\n")
    (tmp_path / "shared" / "__init__.py").write_text('__version__ = "1.0.0"\n')
    doc = "- `agent/cli.py`: the command line\n- `agent/sub/`: a folder\n`agent/sub/new.py` mentioned in passing\n"
    assert missing_from_doc(tmp_path, doc) == [
        "agent/sub/new.py", "controller/sub/", "outpostctl/sub/", "shared/__init__.py", "shared/sub/",
    ]
