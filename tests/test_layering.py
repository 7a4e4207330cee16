"""The dependency rules of docs/architecture.md, checked on the source itself.

The agent runs on gateways without the controller installed, and the protocol
core must stay pure so it can be tested and fuzzed on bytes alone.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROTOCOL_CORE = ROOT / "agent" / "tunnel" / "protocol"
FORBIDDEN_IN_CORE = {"asyncio", "socket", "ssl", "time", "selectors", "threading", "os", "random", "secrets"}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def python_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


@pytest.mark.parametrize("path", python_files(ROOT / "agent"), ids=lambda p: str(p.relative_to(ROOT)))
def test_agent_never_imports_controller_or_outpostctl(path: Path) -> None:
    bad = {m for m in imported_modules(path) if m.split(".")[0] in {"controller", "outpostctl"}}
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}; the agent must not depend on them"


def test_protocol_core_exists() -> None:
    assert python_files(PROTOCOL_CORE), "the sans-IO protocol core is missing"


@pytest.mark.parametrize("path", python_files(PROTOCOL_CORE), ids=lambda p: str(p.relative_to(ROOT)))
def test_protocol_core_does_no_io_and_keeps_no_clock(path: Path) -> None:
    bad = {m for m in imported_modules(path) if m.split(".")[0] in FORBIDDEN_IN_CORE}
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}; the protocol core is sans-IO"


@pytest.mark.parametrize("path", python_files(ROOT / "controller"), ids=lambda p: str(p.relative_to(ROOT)))
def test_controller_uses_only_the_agents_protocol_side(path: Path) -> None:
    allowed = ("agent.tunnel.protocol", "agent.tunnel.auth", "agent.tunnel.session", "agent.errors", "agent.fsutil", "agent.identity.trust",
               "agent.service_manager")
    bad = {
        m for m in imported_modules(path)
        if m.split(".")[0] == "agent" and not m.startswith(allowed)
    }
    bad |= {m for m in imported_modules(path) if m.split(".")[0] == "outpostctl"}
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"
