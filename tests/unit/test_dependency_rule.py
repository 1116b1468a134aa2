"""The dependency rule, checked on the source by folder: arrows point inward.

    face  (cli, render, scaffold, web)   → app, edges, core
    app   (controller, loop, leader, …)  → edges, core
    edges (hosts, transport, state, git) → core
    core  (spec, planning, health, …)    → core only, and no I/O, no clock
    host  (the agent on the workers)     → nothing of quantlab, no third-party package

A new module lands in one of these folders and is held to its rule without editing this test.
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "quantlab"
LAYERS = ("core", "edges", "app", "face", "host")
# What each layer may import of quantlab (besides itself). Edges and the app may read the agent's
# protocol module (the one definition of the requests and answers both ends speak).
MAY_IMPORT = {"core": set(), "edges": {"core", "host"}, "app": {"core", "edges", "host"},
              "face": {"core", "edges", "app"}, "host": set()}
IO_MODULES = {"os", "io", "subprocess", "socket", "time", "datetime", "threading", "shutil", "tempfile",
              "fcntl", "select", "signal", "paramiko", "typer", "rich", "apscheduler", "urllib", "http",
              "psycopg", "concurrent", "asyncio"}
THIRD_PARTY = {"yaml", "paramiko", "typer", "rich", "jsonschema", "apscheduler", "psycopg"}


def layer_of(path: Path, package: Path = PACKAGE) -> str:
    return path.relative_to(package).parts[0]


def imported(path: Path, package: Path = PACKAGE) -> set[str]:
    """Absolute names of the modules `path` imports (relative imports resolved)."""
    parent = list(path.relative_to(package.parent).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = parent[:len(parent) - (node.level - 1)]
                found.add(".".join(base + ([node.module] if node.module else [])))
            else:
                found.add(node.module or "")
    return found


def sources(package: Path = PACKAGE) -> list[Path]:
    return sorted(p for p in package.rglob("*.py") if p.parent != package)


def outward_imports(package: Path = PACKAGE) -> list[str]:
    """Every import that breaks the rule, said as `module (layer) imports name (layer)`."""
    found = []
    for path in sources(package):
        layer = layer_of(path, package)
        for name in sorted(imported(path, package)):
            parts = name.split(".")
            if parts[0] != package.name:
                continue
            target = parts[1] if len(parts) > 1 else "(the package itself)"
            if target != layer and target not in MAY_IMPORT[layer]:
                found.append(f"{path.relative_to(package)} ({layer}) imports {name} ({target})")
    return found


def test_every_module_is_in_a_layer():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert top == ["__init__.py", "__main__.py"], f"modules outside the layers' folders: {top}"
    assert {layer_of(p) for p in sources()} == set(LAYERS)


def test_each_layer_imports_only_inward():
    assert outward_imports() == [], "arrows point inward"


def test_the_core_does_no_io_and_reads_no_clock():
    for path in sources():
        if layer_of(path) == "core":
            roots = {n.split(".")[0] for n in imported(path)}
            assert not roots & IO_MODULES, f"{path.relative_to(PACKAGE)} imports {sorted(roots & IO_MODULES)}"


def test_the_agent_imports_nothing_of_the_controller():
    """The agent (a zip application of quantlab/host/agent/) imports the standard library and its
    own package qlagent only."""
    found = list((PACKAGE / "host" / "agent").rglob("*.py"))
    assert len(found) >= 8
    for path in found:
        names = {n for n in imported(path) if not n.startswith("quantlab.host.agent.qlagent")}   # its own
        roots = {n.split(".")[0] for n in names} - {"qlagent", ""}
        assert not roots & ({"quantlab"} | THIRD_PARTY), f"{path.name} imports {sorted(roots & ({'quantlab'} | THIRD_PARTY))}"


def test_the_rule_catches_an_outward_import(tmp_path):
    """The check itself, on a package made for it: an edge importing the app (relatively or not) and
    the core importing an edge are caught; an app module importing the core is not."""
    package = tmp_path / "quantlab"
    for layer in LAYERS:
        (package / layer).mkdir(parents=True)
    (package / "edges" / "bad.py").write_text("from ..app import loop\nimport quantlab.face.cli\n")
    (package / "core" / "bad.py").write_text("from quantlab.edges.store import StateFile\n")
    (package / "app" / "good.py").write_text("from ..core.plan import Plan\nfrom . import loop\n")
    assert outward_imports(package) == [
        "core/bad.py (core) imports quantlab.edges.store (edges)",
        "edges/bad.py (edges) imports quantlab.app (app)",
        "edges/bad.py (edges) imports quantlab.face.cli (face)",
    ]


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def load_time_imports(path: Path, package: Path = PACKAGE) -> set[str]:
    """What importing `path` imports of the package: its module-level imports, not those inside a
    function or under `if TYPE_CHECKING:` (which run later, or never)."""
    parent = module_name(path, package).split(".") if path.name == "__init__.py" else \
        module_name(path, package).split(".")[:-1]
    found = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                visit(node.orelse)
                continue
            if isinstance(node, (ast.If, ast.Try)):
                visit(node.body)
                visit(getattr(node, "orelse", []))
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = parent[:len(parent) - (node.level - 1)] if node.level else []
                module = ".".join(base + ([node.module] if node.module else []))
                found.add(module)
                found.update(f"{module}.{alias.name}" for alias in node.names)    # `from pkg import mod`
    visit(ast.parse(path.read_text()).body)
    return found


def import_cycles(package: Path = PACKAGE) -> list[list[str]]:
    """The cycles among the package's modules at import time (each as the modules in order)."""
    modules = {module_name(p, package): p for p in package.rglob("*.py") if "host" not in p.relative_to(package).parts}
    # A module's own packages are imported before it anyway (`from . import filters` names its
    # package, but depends on filters).
    graph = {m: sorted(n for n in load_time_imports(p, package) if n in modules and not (m + ".").startswith(n + "."))
             for m, p in modules.items()}
    cycles, state, stack = [], {}, []

    def walk(m: str) -> None:
        state[m] = "open"
        stack.append(m)
        for n in graph[m]:
            if state.get(n) == "open":
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                walk(n)
        stack.pop()
        state[m] = "done"
    for m in sorted(graph):
        if m not in state:
            walk(m)
    return cycles


def test_no_module_imports_itself_back_at_import_time():
    """A cycle makes the import order matter and the layers meaningless; the controller's use cases
    and the hand-over to a leader used to import each other."""
    assert import_cycles() == []


def test_the_cycle_check_finds_a_cycle(tmp_path):
    package = tmp_path / "quantlab"
    (package / "app").mkdir(parents=True)
    (package / "app" / "__init__.py").write_text("")
    (package / "app" / "a.py").write_text("from .b import B\n")
    (package / "app" / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .c import C\n"
                                          "from . import a\n")
    (package / "app" / "c.py").write_text("def f():\n    from .a import A\n")     # at call time: no cycle
    assert import_cycles(package) == [["quantlab.app.a", "quantlab.app.b", "quantlab.app.a"]]
