"""The dependency rules of docs/architecture.md, checked on the source and on a running interpreter.

The agent runs on gateways without the controller installed, the controller
runs without the agent's key store, enrollment or clock, and the protocol core
must stay pure so it can be tested and fuzzed on bytes alone. What both ends
need lives in ``shared``. Every rule holds transitively: through other modules
(any import statement, also relative ones and those inside functions), and
through whatever the standard library pulls in at run time.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections import deque
from collections.abc import Collection
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("agent", "controller", "outpostctl", "shared")
PROTOCOL_CORE = "shared.protocol"
#: What no module of the protocol core, nor any module it imports, may import itself.
FORBIDDEN_IN_CORE = {"asyncio", "socket", "ssl", "time", "selectors", "threading", "os", "random", "secrets"}
#: What the core may not load even through the standard library (which itself uses os).
FORBIDDEN_AT_RUN_TIME = {"asyncio", "socket", "ssl", "time", "selectors", "threading"}
#: What each package must never reach, directly or through another module: the two ends never
#: import each other, and what they share imports neither of them. outpostctl may use all three
#: (``outpostctl connect`` is an agent for one dial; the quickstart drives the real programs).
NEVER_REACHES = {
    "agent": ("controller", "outpostctl"),
    "controller": ("agent", "outpostctl"),
    "shared": ("agent", "controller", "outpostctl"),
}
#: A fresh interpreter that records every import statement it runs (importer -> imported), then
#: imports the modules named on its command line and prints the edges as JSON.
RECORD_IMPORTS = r"""
import builtins, importlib, importlib.util, json, sys
sys.path.insert(0, sys.argv[1])
edges = {}
real_import = builtins.__import__

def recording_import(name, globals=None, locals=None, fromlist=(), level=0):
    module = real_import(name, globals, locals, fromlist, level)
    importer = (globals or {}).get("__name__")
    if importer:
        package = globals.get("__package__") or importer.rpartition(".")[0]
        target = importlib.util.resolve_name("." * level + name, package) if level else name
        found = edges.setdefault(importer, set())
        found.add(target)
        found.update(f"{target}.{item}" for item in fromlist or () if f"{target}.{item}" in sys.modules)
    return module

builtins.__import__ = recording_import
for name in sys.argv[2:]:
    importlib.import_module(name)
print(json.dumps({"edges": {k: sorted(v) for k, v in edges.items()}, "loaded": sorted(sys.modules)}))
"""


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_modules() -> dict[str, Path]:
    """Every module of the three packages, by dotted name."""
    return {
        module_name(path): path
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
        if "__pycache__" not in path.parts
    }


MODULES = source_modules()


def _is_type_checking_block(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return isinstance(test, ast.Name) and test.id == "TYPE_CHECKING" or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imported_names(name: str, path: Path, known: Collection[str], *, type_checking: bool = False) -> set[str]:
    """Every module an import statement of module ``name`` names, wherever it stands; relative ones resolved.

    ``from a import b`` names ``a`` and, when it is in ``known``, the module ``a.b``.
    Imports under ``if TYPE_CHECKING:`` never run and are left out unless ``type_checking``.
    """
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    pending: list[ast.AST] = [ast.parse(path.read_text(), filename=str(path))]
    while pending:
        node = pending.pop()
        if not type_checking and _is_type_checking_block(node):
            pending.extend(node.orelse)  # type: ignore[attr-defined]
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in known)
        pending.extend(ast.iter_child_nodes(node))
    return found


def with_parents(name: str) -> list[str]:
    """``a.b.c`` -> ``a.b.c``, ``a.b``, ``a``: importing a module runs its packages first."""
    parts = name.split(".")
    return [".".join(parts[:n]) for n in range(len(parts), 0, -1)]


def reachable(start: set[str], edges: dict[str, set[str]]) -> dict[str, str | None]:
    """Every module reachable from ``start``, each with the module that first led to it."""
    came_from: dict[str, str | None] = {}
    queue: deque[tuple[str, str | None]] = deque((s, None) for s in sorted(start))
    while queue:
        name, parent = queue.popleft()
        for module in with_parents(name):
            if module in came_from:
                continue
            came_from[module] = parent
            queue.extend((target, module) for target in sorted(edges.get(module, ())))
    return came_from


def chain(came_from: dict[str, str | None], name: str) -> str:
    links = [name]
    while came_from.get(links[-1]) is not None:
        links.append(came_from[links[-1]])  # type: ignore[arg-type]
    return " <- ".join(links)


STATIC_EDGES = {name: imported_names(name, path, MODULES) for name, path in MODULES.items()}
CORE = {name for name in MODULES if name == PROTOCOL_CORE or name.startswith(PROTOCOL_CORE + ".")}


def in_package(name: str, *packages: str) -> bool:
    return name.split(".")[0] in packages


def run_recording(*modules: str) -> dict:
    """Import ``modules`` in a fresh interpreter (no site customisation) that records every import."""
    result = subprocess.run(
        [sys.executable, "-I", "-c", RECORD_IMPORTS, str(ROOT), *modules],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    recorded = json.loads(result.stdout.strip().splitlines()[-1])
    recorded["edges"] = {k: set(v) for k, v in recorded["edges"].items()}
    return recorded


def test_the_layers_exist_where_the_rules_look() -> None:
    assert CORE, "the sans-IO protocol core is missing"
    assert {"agent.cli", "controller.server", "outpostctl.cli", "shared.tunnel.session"} <= set(MODULES)


def test_the_import_walk_follows_relative_and_function_level_imports_and_skips_type_checking(tmp_path: Path) -> None:
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    module = tmp_path / "pkg" / "sub" / "mod.py"
    module.write_text(
        "from typing import TYPE_CHECKING\n"
        "from . import sibling\n"
        "from ..other import thing\n"
        "if TYPE_CHECKING:\n    import ssl\nelse:\n    import json\n"
        "def later():\n    import socket\n"
    )
    known = {"pkg", "pkg.sub", "pkg.sub.mod", "pkg.sub.sibling", "pkg.other"}
    found = imported_names("pkg.sub.mod", module, known)
    assert found == {"typing", "pkg.sub", "pkg.sub.sibling", "pkg.other", "json", "socket"}
    edges = {"pkg.sub.mod": found, "pkg.other": {"time"}}
    assert chain(reachable({"pkg.sub.mod"}, edges), "time") == "time <- pkg.other <- pkg.sub.mod"


def test_the_rule_catches_a_controller_module_that_reaches_the_agent_through_shared() -> None:
    edges = {"controller.x": {"shared.y"}, "shared.y": {"agent.errors"}}
    assert reached_packages_it_must_not("controller", {"controller.x"}, edges) == [
        "agent <- shared.y <- controller.x",
        "agent.errors <- shared.y <- controller.x",
    ]


def reached_packages_it_must_not(package: str, start: set[str], edges: dict[str, set[str]]) -> list[str]:
    found = reachable(start, edges)
    return sorted(chain(found, name) for name in found if in_package(name, *NEVER_REACHES[package]))


def test_agent_and_controller_never_import_each_other_and_shared_imports_neither() -> None:
    bad = []
    for package in NEVER_REACHES:
        bad += reached_packages_it_must_not(package, {n for n in MODULES if in_package(n, package)}, STATIC_EDGES)
    assert not bad, "a package reaches one it must not (docs/architecture.md):\n" + "\n".join(bad)


def test_importing_every_module_of_a_package_loads_none_it_must_not_reach() -> None:
    for package, forbidden in NEVER_REACHES.items():
        modules = sorted(name for name in MODULES if in_package(name, package) and not name.endswith("__main__"))
        recorded = run_recording(*modules)
        assert set(modules) <= set(recorded["loaded"])
        bad = sorted(name for name in recorded["loaded"] if in_package(name, *forbidden))
        assert not bad, f"importing {package} loaded {bad}"


def test_the_protocol_core_and_every_module_it_imports_import_no_io_clock_or_randomness() -> None:
    found = reachable(CORE, STATIC_EDGES)
    bad = sorted(
        f"{chain(found, name)} imports {sorted(FORBIDDEN_IN_CORE & {m.split('.')[0] for m in STATIC_EDGES[name]})}"
        for name in found
        if name in MODULES and FORBIDDEN_IN_CORE & {m.split(".")[0] for m in STATIC_EDGES[name]}
    )
    assert not bad, "the protocol core is sans-IO:\n" + "\n".join(bad)
    outside = sorted(name for name in found if name in MODULES and name not in CORE)
    assert outside == ["shared"], "the core grew a dependency: " + ", ".join(outside)


def test_the_protocol_core_loads_no_io_or_clock_module_even_through_the_standard_library() -> None:
    recorded = run_recording(*sorted(CORE))
    found = reachable(CORE, recorded["edges"])
    assert "json" in found and "shared.protocol.codes" in found, "the recording saw the core's imports"
    assert "shared.errors" not in found, "the core's errors are its own, not the application's"
    bad = sorted(chain(found, name) for name in found if name in FORBIDDEN_AT_RUN_TIME)
    assert not bad, "the protocol core loads I/O or the clock:\n" + "\n".join(bad)


def import_cycles(edges: dict[str, set[str]], package: str) -> list[str]:
    """Every circle of imports among the modules of ``package``, each once, as ``a -> b -> a``.

    A strongly connected component of more than one module is a circle; the
    path shown is one circle through its first module, for the reader to break.
    """
    inside = {name: {t for t in targets if in_package(t, package) and t in edges and t != name}
              for name, targets in edges.items() if in_package(name, package)}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[list[str]] = []
    for root in sorted(inside):
        if root in index:
            continue
        work = [(root, iter(sorted(inside[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        while work:
            name, targets = work[-1]
            target = next(targets, None)
            if target is not None:
                if target not in index:
                    index[target] = low[target] = len(index)
                    stack.append(target)
                    work.append((target, iter(sorted(inside[target]))))
                elif target in stack:
                    low[name] = min(low[name], index[target])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[name])
            if low[name] == index[name]:
                component = []
                while True:
                    member = stack.pop()
                    component.append(member)
                    if member == name:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return [_one_circle(sorted(c)[0], set(c), inside) for c in sorted(components)]


def _one_circle(start: str, members: set[str], edges: dict[str, set[str]]) -> str:
    came_from: dict[str, str] = {}
    queue = deque([start])
    while queue:
        name = queue.popleft()
        for target in sorted(edges[name] & members):
            if target == start:
                path = [name]
                while path[-1] != start:
                    path.append(came_from[path[-1]])
                return " -> ".join([start, *reversed(path[:-1]), start]) if len(path) > 1 else f"{start} -> {start}"
            if target not in came_from:
                came_from[target] = name
                queue.append(target)
    raise AssertionError(f"{start} is in no circle")


def test_the_cycle_check_finds_a_circle_and_names_it() -> None:
    edges = {"agent.a": {"agent.b", "json"}, "agent.b": {"agent.c"}, "agent.c": {"agent.a"}, "agent.d": {"agent.a"}}
    assert import_cycles(edges, "agent") == ["agent.a -> agent.b -> agent.c -> agent.a"]
    assert import_cycles({"agent.a": {"agent.b"}, "agent.b": set()}, "agent") == []


def test_no_module_of_the_agent_imports_itself_in_a_circle() -> None:
    # Every import statement counts, those inside functions too: an import moved into a
    # function only postpones the circle (agent.config once reached agent.clock.ntp that way).
    circles = import_cycles(STATIC_EDGES, "agent")
    assert not circles, "import circles among agent modules (pass typed values in instead):\n" + "\n".join(circles)


#: Every module of shared/ and the modules of shared/ it names, TYPE_CHECKING imports included: a
#: circle drawn only for the type checker is still two modules that cannot be understood apart.
SHARED_EDGES = {
    name: {target for target in imported_names(name, path, MODULES, type_checking=True)
           if in_package(target, "shared") and target in MODULES and target != name}
    for name, path in MODULES.items() if in_package(name, "shared")
}


def test_no_modules_of_shared_import_each_other_round_a_circle() -> None:
    assert SHARED_EDGES["shared.tunnel.session"] >= {"shared.tunnel.channel", "shared.tunnel.splice"}
    circles = import_cycles(SHARED_EDGES, "shared")
    assert not circles, "import circles in shared/ (docs/architecture.md):\n" + "\n".join(circles)


def test_the_core_errors_are_not_the_applications() -> None:
    from shared.errors import OutpostError
    from shared.protocol import InvalidLimits, ProtocolError

    assert not issubclass(ProtocolError, OutpostError) and not issubclass(InvalidLimits, OutpostError)
