"""The event catalogue (quantlab/core/events.py) is closed over the code: every event name and notice
kind the source produces is in it, and nothing else; `unknown_event` takes what the producers write
and refuses what they do not; docs/events.md lists exactly the catalogue."""
from __future__ import annotations

import ast
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import pytest

from quantlab.app.controller import Controller
from quantlab.core.events import (
    CATALOGUE,
    COMMON_FIELDS,
    EVENTS,
    NOTICE_FIELDS,
    NOTICE_KINDS,
    event_kind,
    source_of,
    unknown_event,
)
from quantlab.edges.execute import Executor, Outcome, Recorder, outcome_notices
from quantlab.core.health import alerts_delta
from quantlab.host.agent.qlagent.probe import read_events
from quantlab.host.agent.qlagent.procs import log_event
from quantlab.core.plan import ACTIONS, Action, Blocked, Plan

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "quantlab"
DOC = ROOT / "docs" / "events.md"

# --- what the source produces ------------------------------------------------------------------

# Where an event name is not a literal: the wrappers every producer goes through (their callers are
# read instead), and the executor, which records each action under its name (plan.ACTIONS).
DYNAMIC_EVENTS: dict[tuple[str, str], frozenset[str]] = {
    ("app/holds.py", "Holds._hold_event"): frozenset(),        # _hold_event("suspended", ...)
    ("edges/execute.py", "Executor.finished"): frozenset(ACTIONS),          # rec.event(event=a.action, ...)
    ("host/agent/qlagent/procs.py", "log_event"): frozenset(),       # log_event(idir, "start", ...)
    ("host/agent/qlagent/supervisor.py", "Supervisor.event"): frozenset(),   # self.event("restart", ...)
    ("host/agent/qlagent/supervisor.py", "Supervisor.finish"): frozenset(),  # finish(..., event="lease-expired")
}
# Where a notice kind is not a literal: the Monitor's kinds for host events (the values of the mapping
# it looks them up in), raise_alert (its callers are read), and the loop's own alerts (read from its
# `self._alerts[KIND] = ...`).
DYNAMIC_NOTICES = {("core/health.py", "watch"), ("app/rounds.py", "Rounds.raise_alert"),
                   ("app/loop.py", "ReconcileLoop.act_round")}


def literals(node: ast.expr) -> set[str] | None:
    """The strings `node` can be when it is a literal or a conditional between literals; else None."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if isinstance(node, ast.IfExp):
        body, orelse = literals(node.body), literals(node.orelse)
        return None if body is None or orelse is None else body | orelse
    return None


def called(node: ast.Call) -> str:
    func = node.func
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""


class Producers(ast.NodeVisitor):
    """Event names and notice kinds written in one module, with the function each is written in.
    Events: `{"event": NAME}`, `log_event(idir, NAME)` (also through bookkeeping(..., log_event, idir,
    NAME)), `x.event(NAME)` or `x.event(event=NAME)`, `_hold_event(NAME)`, any `event=NAME` argument or
    default. Notices: `{"kind": KIND, "message": ...}`, `raise_alert(KIND)`, `self._alerts[KIND] = ...`."""

    def __init__(self, rel: str):
        self.rel, self.scope = rel, [""]
        self.events: list[tuple[str, str, ast.expr]] = []
        self.notices: list[tuple[str, str, ast.expr]] = []

    def _in(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) -> None:
        self.scope.append(f"{self.scope[-1]}.{node.name}".lstrip("."))
        self.generic_visit(node)
        self.scope.pop()

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self._in(node)

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        args = node.args.posonlyargs + node.args.args
        for arg, default in zip(args[len(args) - len(node.args.defaults):], node.args.defaults):
            if arg.arg == "event":
                self.events.append((self.rel, f"{self.scope[-1]}.{node.name}".lstrip("."), default))
        for arg, kw_default in zip(node.args.kwonlyargs, node.args.kw_defaults):
            if arg.arg == "event" and kw_default is not None:
                self.events.append((self.rel, f"{self.scope[-1]}.{node.name}".lstrip("."), kw_default))
        self._in(node)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Dict(self, node: ast.Dict) -> None:
        keys = {k.value: v for k, v in zip(node.keys, node.values) if isinstance(k, ast.Constant)}
        if "event" in keys:
            self.events.append((self.rel, self.scope[-1], keys["event"]))
        if "kind" in keys and "message" in keys:
            self.notices.append((self.rel, self.scope[-1], keys["kind"]))
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        name = called(node)
        keyword = next((kw.value for kw in node.keywords if kw.arg == "event"), None)
        if keyword is not None:
            self.events.append((self.rel, self.scope[-1], keyword))
        elif name == "log_event" and len(node.args) > 1:
            self.events.append((self.rel, self.scope[-1], node.args[1]))
        elif name in ("event", "_hold_event") and node.args:
            self.events.append((self.rel, self.scope[-1], node.args[0]))
        for i, arg in enumerate(node.args):
            if isinstance(arg, ast.Name) and arg.id == "log_event" and len(node.args) > i + 2:
                self.events.append((self.rel, self.scope[-1], node.args[i + 2]))
        if name == "raise_alert" and node.args:
            self.notices.append((self.rel, self.scope[-1], node.args[0]))
        self.generic_visit(node)

    def visit_Assign(self, node: ast.Assign) -> None:
        for target in node.targets:
            if isinstance(target, ast.Subscript) and isinstance(target.value, ast.Attribute) \
                    and target.value.attr == "_alerts":
                self.notices.append((self.rel, self.scope[-1], target.slice))
        self.generic_visit(node)


def modules() -> Iterator[tuple[str, ast.Module]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel != "core/events.py":                # the catalogue itself produces nothing
            yield rel, ast.parse(path.read_text(), filename=str(path))


def function(tree: ast.Module, qualname: str) -> ast.FunctionDef:
    node: Any = tree
    for part in qualname.split("."):
        node = next(n for n in node.body if isinstance(n, (ast.ClassDef, ast.FunctionDef)) and n.name == part)
    assert isinstance(node, ast.FunctionDef)
    return node


def monitor_kinds(tree: ast.Module) -> set[str]:
    """health.watch: `kind = {HOST EVENT: NOTICE KIND, ...}.get(...)`, the mapping's values."""
    for node in ast.walk(function(tree, "watch")):
        if isinstance(node, ast.Assign) and [ast.unparse(t) for t in node.targets] == ["kind"] \
                and isinstance(node.value, ast.Call) and isinstance(node.value.func, ast.Attribute) \
                and isinstance(node.value.func.value, ast.Dict):
            found = [literals(v) for v in node.value.func.value.values]
            assert all(f is not None for f in found), ast.unparse(node)
            return set().union(*(f for f in found if f is not None))
    raise AssertionError("health.watch: the mapping of host events to notice kinds is not where it was")


def produced() -> tuple[dict[str, set[str]], set[str]]:
    """Event names by source (host: quantlab/host/, controller: the rest), and notice kinds."""
    events: dict[str, set[str]] = {"controller": set(), "host": set()}
    notices: set[str] = set()
    dynamic_events, dynamic_notices = set(), set()
    for rel, tree in modules():
        found = Producers(rel)
        found.visit(tree)
        source = "host" if rel.startswith("host/") else "controller"
        for _, scope, expr in found.events:
            names = literals(expr)
            if names is None:
                assert (rel, scope) in DYNAMIC_EVENTS, \
                    f"{rel}: {scope} writes an event whose name is not a literal ({ast.unparse(expr)}): name it, " \
                    "or teach this test where its names come from"
                dynamic_events.add((rel, scope))
                names = set(DYNAMIC_EVENTS[(rel, scope)])
            events[source] |= names
        for _, scope, expr in found.notices:
            kinds = literals(expr)
            if kinds is None:
                assert (rel, scope) in DYNAMIC_NOTICES, \
                    f"{rel}: {scope} raises a notice whose kind is not a literal ({ast.unparse(expr)}): name it, " \
                    "or teach this test where its kinds come from"
                dynamic_notices.add((rel, scope))
                kinds = monitor_kinds(tree) if rel == "core/health.py" else set()
            notices |= kinds
    assert dynamic_events == set(DYNAMIC_EVENTS), "a producer this test reads through is gone: update it"
    assert dynamic_notices == DYNAMIC_NOTICES, "a producer this test reads through is gone: update it"
    return events, notices


def test_every_event_the_code_writes_is_in_the_catalogue_and_nothing_else():
    events, _ = produced()
    for source in ("controller", "host"):
        catalogued = {k.name for k in CATALOGUE if k.source == source}
        assert events[source] - catalogued == set(), f"produced by the {source}, not in quantlab/core/events.py"
        assert catalogued - events[source] == set(), f"in quantlab/core/events.py, never produced by the {source}"
    assert set(EVENTS) == events["controller"] | events["host"]


def test_every_notice_kind_the_code_raises_is_in_the_catalogue_and_nothing_else():
    _, notices = produced()
    assert notices - set(NOTICE_KINDS) == set(), "raised, not in NOTICE_KINDS"
    assert set(NOTICE_KINDS) - notices == set(), "in NOTICE_KINDS, never raised"
    assert set(NOTICE_FIELDS) == set(NOTICE_KINDS)


def test_the_scan_finds_what_it_should():
    """The scanner itself: a few producers of each shape, found where they are."""
    events, notices = produced()
    assert {"leader", "notify", "blocked", "suspended", "resumed", "retry", "move"} <= events["controller"]
    assert {"start", "stopped", "lease-expired", "paused", "resumed", "supervisor-lost"} <= events["host"]
    assert {"strategy-error", "lease-expired", "fleet-invalid", "not-deployed", "notices-dropped"} <= notices


def test_the_scan_reads_every_shape_of_producer():
    source = '''
class C:
    def a(self, x):
        self.record_event({"t": 1, "event": "one", "actor": "monitor"})
        recorder.event(event="two", guard="g")
        self._hold_event("three", "*", set(), "by", 1, None)
        log_event(idir, "four" if x else "five", "detail")
        bookkeeping(problems, "events.log", log_event, idir, "six", "detail")
        self.event("seven")
        self.finish("why", event="eight")
        self.raise_alert("k1", settings, None)
        self._alerts["k2"] = "problem"
        return {"t": 1, "kind": "k3", "message": "m"}

    def finish(self, reason, event="nine"):
        return {"kind": "not-a-notice", "reason": reason}
'''
    found = Producers("x.py")
    found.visit(ast.parse(source))
    assert set().union(*(literals(e) or set() for _, _, e in found.events)) == \
        {"one", "two", "three", "four", "five", "six", "seven", "eight", "nine"}
    assert set().union(*(literals(e) or set() for _, _, e in found.notices)) == {"k1", "k2", "k3"}
    assert {scope for _, scope, _ in found.events} == {"C.a", "C.finish"}


def test_the_catalogue_is_well_formed():
    assert len({(k.source, k.name) for k in CATALOGUE}) == len(CATALOGUE)
    for kind in CATALOGUE:
        assert kind.source in ("controller", "host")
        assert kind.meaning.strip() and kind.meaning.endswith(".")
        both = (*COMMON_FIELDS, *kind.fields, *kind.optional)
        assert len(both) == len(set(both)), f"{kind.name}: a field listed twice"
    assert all(m.strip() for m in NOTICE_KINDS.values())


# --- unknown_event -----------------------------------------------------------------------------

class Events:
    """An events port that keeps what it is given."""

    def __init__(self) -> None:
        self.kept: list[dict[str, Any]] = []

    def append(self, event: dict[str, Any]) -> bool:
        self.kept.append(event)
        return True


def recorder() -> tuple[Recorder, Events]:
    events = Events()
    clock = SimpleNamespace(wall=lambda: 1_700_000_000_000, mono=lambda: 5_000)
    rec = Recorder(None, events, "alice@box apply", {"revision": "abc123", "dirty": False}, clock)
    return rec, events


def executed(*outcomes: Outcome) -> list[dict[str, Any]]:
    """What the executor records of these outcomes."""
    rec, events = recorder()
    executor = SimpleNamespace(rec=rec, progress=lambda *_: None)
    for outcome in outcomes:
        Executor.finished(executor, outcome)
    return events.kept


def notified(notices: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """As Controller.notify records them."""
    return [{**n, "event": "notify", "actor": "monitor"} for n in notices]


def reported(tmp_path: Path, worker: str, strategy: str, lines: list[tuple[Any, ...]]) -> list[dict[str, Any]]:
    """What a host's events.log says, as gather collects it and record_host_events records it."""
    idir = tmp_path / strategy
    idir.mkdir()
    for args, extra in lines:
        log_event(str(idir), *args, **extra)
    found = read_events(str(idir), 0)
    return [{**e, "worker": worker, "strategy": strategy, "actor": f"supervisor@{worker}"} for e in found]


START = Action("start", "grid-1", "new strategy", "new", worker="w1", epoch=3)
MOVE = Action("move", "grid-1", "worker w1 offline", "worker-offline", source="w1", target="w2", epoch=4)


def test_what_the_controller_records_is_known():
    records = executed(Outcome(START, True, "started"), Outcome(START, False, "host refused"),
                       Outcome(MOVE, True, "started"), Outcome(MOVE, False, "no answer"))
    rec, events = recorder()
    rec.event(event="blocked", guard="mass-stop", reason="too many stops", strategies=["a", "b"])
    records += events.kept
    records.append(Controller._hold_event("suspended", "*", {"grid-1"}, "alice@box stop-all", 1, "why"))
    records.append(Controller._hold_event("resumed", "grid-1", {"grid-1"}, "alice@box resume", 2, None))
    records.append(Controller._hold_event("suspended", "w1", {"grid-1"}, "alice@box suspend", 3, None))
    plan = Plan(actions=(START, MOVE), blocked=(Blocked("mass-stop", "too many stops", (START,)),))
    notices, raised = outcome_notices(plan, [Outcome(START, False, "refused"), Outcome(MOVE, True)], 10)
    resolved, _ = alerts_delta({"offline:w1": "w1 is offline"}, {}, "offline:", 11)
    records += notified(notices + list(raised.values()) + resolved)
    assert {r["event"] for r in records} >= {"start", "move", "blocked", "suspended", "resumed", "notify"}
    assert {r.get("kind") for r in records} >= {"action-failed", "failover", "guard-blocked", "resolved"}
    for record in records:
        assert source_of(record) == "controller"
        assert unknown_event(record) is None, record


def test_what_the_hosts_report_is_known(tmp_path: Path):
    records = reported(tmp_path, "w1", "grid-1", [
        (("start", "epoch 3"), {"epoch": 3}),
        (("restart", "exit 1; restart 1 in 2.0s"), {"epoch": 3, "restarts": 1}),
        (("paused",), {"epoch": 3}),
        (("resumed",), {"epoch": 3}),
        (("error", "supervisor cannot start: no such file"), {}),         # record_failure: no epoch
        (("stopped", "removed (its supervisor was gone)"), {}),            # the agent's stop: no epoch
        (("lease-expired", "lease expired"), {"epoch": 3}),
    ])
    assert [r["event"] for r in records] == ["start", "restart", "paused", "resumed", "error", "stopped",
                                             "lease-expired"]
    for record in records:
        assert source_of(record) == "host"
        assert unknown_event(record) is None, record


def test_a_name_means_what_its_source_means_by_it(tmp_path: Path):
    """`start`, `restart` and `resumed` are written by both sources, with other fields."""
    host = reported(tmp_path, "w1", "grid-1", [(("start", "epoch 3"), {"epoch": 3})])[0]
    controller = executed(Outcome(START, True, "started"))[0]
    assert event_kind("start", "host") != event_kind("start", "controller")
    assert unknown_event(host) is None and unknown_event(controller) is None
    # The controller's `start` without what the executor records is not one of them.
    assert "lacks" in (unknown_event({**host, "actor": "alice@box apply"}) or "")
    # A person whose login is `supervisor` is not a host: the host's actor has no command after it.
    assert source_of({"actor": "supervisor@box apply"}) == "controller"


@pytest.mark.parametrize("record, why", [
    ({"t": 1, "actor": "monitor"}, "no event name"),
    ({"t": 1, "event": 7, "actor": "monitor"}, "not text"),
    ({"t": 1, "event": "exploded", "actor": "monitor"}, "unknown event 'exploded'"),
    ({"t": 1, "event": "my-strategy-said-so", "actor": "supervisor@w1", "worker": "w1", "strategy": "s"},
     "unknown event"),
    ({"t": 1, "event": "blocked", "actor": "supervisor@w1", "worker": "w1", "strategy": "s"},
     "an event of the controller only"),
    ({"t": 1, "event": "lease-expired", "actor": "alice@box apply", "detail": "x", "epoch": 1},
     "an event of the host only"),
    ({"event": "state-pushed", "actor": "alice@box state push", "detail": "from x"}, "lacks t"),
    ({"t": 1, "event": "state-pushed", "detail": "from x"}, "lacks actor"),
    ({"t": 1, "event": "leader", "actor": "reconcile pid 1 on box", "change": "took", "detail": "x"}, "lacks term"),
    ({"t": 1, "event": "notify", "actor": "monitor", "message": "m"}, "lacks kind"),
    ({"t": 1, "event": "notify", "actor": "monitor", "kind": "meteor-strike", "message": "m"},
     "unknown notice kind 'meteor-strike'"),
    ({"t": 1, "event": "notify", "actor": "monitor", "kind": "resolved", "message": "resolved: x"},
     "the 'resolved' notice lacks alert"),
    ({"t": 1, "event": "notify", "actor": "monitor", "kind": "worker-offline", "message": "m"},
     "the 'worker-offline' notice lacks worker"),
    ({"t": 1, "event": "restart", "actor": "supervisor@w1", "worker": "w1", "strategy": "s", "detail": "x",
      "epoch": 1}, "lacks restarts"),
])
def test_what_is_not_in_the_catalogue_is_named(record: dict[str, Any], why: str):
    said = unknown_event(record)
    assert said is not None and why in said, said


def test_fields_beyond_the_catalogue_are_allowed():
    record = {"t": 1, "event": "paused", "actor": "supervisor@w1", "worker": "w1", "strategy": "s", "epoch": 2,
              "note": "a strategy may write more"}
    assert unknown_event(record) is None


# --- docs/events.md ----------------------------------------------------------------------------

ROW = re.compile(r"^\|\s*`([^`]+)`\s*\|(.*)\|\s*$")
SECTIONS = {"## Common fields": "common", "## Events the controller records": "controller",
            "## Events the hosts report": "host", "## Notice kinds": "notice"}


def doc_rows() -> dict[str, list[tuple[str, list[str], list[str], str]]]:
    """The table rows of each section: (name, fields, optional fields, meaning)."""
    rows: dict[str, list[tuple[str, list[str], list[str], str]]] = {s: [] for s in SECTIONS.values()}
    section = None
    for line in DOC.read_text().splitlines():
        if line.startswith("## "):
            section = SECTIONS.get(line.strip())
            continue
        found = ROW.match(line)
        if found is None:
            continue
        assert section is not None, f"docs/events.md: a table row outside the catalogue's sections: {line}"
        cells = [c.strip() for c in found.group(2).split("|")]
        fields = cells[0] if len(cells) > 1 else ""
        required, _, optional = fields.partition("optional:")
        rows[section].append((found.group(1), re.findall(r"`([^`]+)`", required), re.findall(r"`([^`]+)`", optional),
                              cells[-1]))
    return rows


def test_the_reference_lists_exactly_the_catalogue():
    rows = doc_rows()
    assert [r[0] for r in rows["common"]] == list(COMMON_FIELDS)
    for source in ("controller", "host"):
        listed = [r[0] for r in rows[source]]
        assert len(listed) == len(set(listed)), f"docs/events.md lists a {source} event twice"
        assert set(listed) == {k.name for k in CATALOGUE if k.source == source}
        for name, fields, optional, meaning in rows[source]:
            kind = event_kind(name, source)
            assert kind is not None
            assert (fields, optional) == (list(kind.fields), list(kind.optional)), f"docs/events.md: {name}'s fields"
            assert meaning == kind.meaning, f"docs/events.md: {name}'s meaning is not the catalogue's"
    listed = [r[0] for r in rows["notice"]]
    assert len(listed) == len(set(listed)) and set(listed) == set(NOTICE_KINDS)
    for name, fields, _, meaning in rows["notice"]:
        assert fields == list(NOTICE_FIELDS[name]), f"docs/events.md: the {name} notice's fields"
        assert meaning == NOTICE_KINDS[name], f"docs/events.md: the {name} notice's meaning is not the catalogue's"


def test_every_alert_kind_is_a_notice_kind_and_every_told_once_alert_survives_a_full_queue():
    from quantlab.edges.notify.delivery import ALERT_KINDS
    assert ALERT_KINDS <= set(NOTICE_KINDS), sorted(ALERT_KINDS - set(NOTICE_KINDS))
    # Raised once and cleared later (a `resolved` follows): never dropped as routine when a queue is full.
    assert {"foreign-state", "worker-offline", "fleet-invalid", "disk-full"} <= ALERT_KINDS
