"""The dependency rule, checked on the source: the core (spec, scheduling, observed, memory, plan,
planner, health, status, explain, events) imports no I/O module, reads no clock and knows nothing of the
edges; the host agent imports nothing of the controller."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "quantlab"
CORE = ["spec/loader.py", "spec/models.py", "spec/__init__.py", "scheduling/__init__.py", "scheduling/filters.py",
        "scheduling/pool.py", "scheduling/policies.py", "scheduling/scheduler.py", "observed.py", "memory.py",
        "plan.py", "planner/__init__.py", "planner/context.py", "planner/locate.py", "planner/classify.py",
        "planner/place.py", "planner/guards.py", "health.py", "status.py", "explain.py", "leadership.py",
        "redact.py", "web/metrics.py", "events.py"]
IO_MODULES = {"os", "io", "subprocess", "socket", "time", "datetime", "threading", "shutil", "tempfile",
              "fcntl", "select", "signal", "paramiko", "typer", "rich", "apscheduler", "urllib", "http"}
EDGES = {"fleetfiles", "gitsource", "follow", "controller", "hosts", "transport", "store", "gather", "execute",
         "loop", "cli", "render", "notify", "ledger", "clock", "atomicfile", "checkpoints", "vcs", "scaffold",
         "leader", "pgstate", "statebackend", "handover", "snapshot"}


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = ("." * node.level) + (node.module or "")
            found.add(base)
            found |= {f"{base}.{alias.name}" if base.endswith(".") else alias.name for alias in node.names}
    return found


def test_the_core_imports_no_io_and_no_edge():
    for rel in CORE:
        names = imports(PACKAGE / rel)
        roots = {n.lstrip(".").split(".")[0] for n in names if not n.startswith(".")}
        assert not roots & IO_MODULES, f"{rel} imports {sorted(roots & IO_MODULES)}"
        local = {n.lstrip(".").split(".")[0] for n in names if n.startswith(".")} | \
                {n.split(".")[1] for n in names if n.startswith("quantlab.") and n.count(".") >= 1}
        assert not local & EDGES, f"{rel} imports the edge {sorted(local & EDGES)}"


def test_the_agent_imports_nothing_of_the_controller():
    """The agent (a zip application of quantlab/host/agent/) imports the standard library and its
    own package qlagent only."""
    found = list((PACKAGE / "host" / "agent").rglob("*.py"))
    assert len(found) >= 8
    for path in found:
        names = {n for n in imports(path) if not n.startswith(".")}
        outside = {n for n in names if n.split(".")[0] in ("quantlab", "yaml", "paramiko", "typer", "jsonschema")}
        assert not outside, f"{path.name} imports {sorted(outside)}"
