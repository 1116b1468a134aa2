"""The loader's models and hashes: immutable specs, what spec_hash and fleet_hash react to, and how
problems are ordered; and the limits that keep a strange fleet directory (aliases, deep nesting,
huge or special files, unreadable folders) from hanging the loader or shrinking the fleet. The
corpus of broken fleets lives in test_loader_corpus.py."""
from __future__ import annotations

import dataclasses
import io
import multiprocessing
import os
import resource
import shutil
import socket
import stat
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import yaml

from quantlab.edges.fleetfiles import load_fleet
from quantlab.core.spec import Fleet, FleetInvalid, Problem
from quantlab.core.spec import loader, yamldocs
from quantlab.core.spec.documents import schema_message
from quantlab.core.spec.inputs import FleetFile, StrategyFile
from quantlab.core.spec.parsing import ParsedFleet
from quantlab.core.spec.problems import MAX_MESSAGE

WORKERS = """\
apiVersion: quantlab/v1
kind: Worker
id: w1
host: local
capabilities: {maxStrategies: 2, supportedApis: [bybit, binance]}
metadata: {region: JP}
"""

STRATEGY = """\
apiVersion: quantlab/v1
kind: Strategy
id: s1
name: Grid BTC
strategyFile: strategies/grid.js
params: {symbol: BTCUSDT, grid: {levels: 10, spacing: 0.004}}
desiredState: running
heartbeatMs: 60000
requirements: {api: bybit, account: acc1, region: JP}
scheduling: {maxRestarts: 5, stopTimeoutSeconds: 30}
"""

JS = "module.exports = { st_init() {}, st_heartbeat() {}, st_exit() {} };\n"


def make_fleet(root: Path, strategy: str = STRATEGY, js: str = JS) -> Path:
    (root / "strategies").mkdir(parents=True, exist_ok=True)
    (root / "workers.yaml").write_text(WORKERS)
    (root / "strategies.yaml").write_text(strategy)
    (root / "strategies" / "grid.js").write_text(js)
    return root


@pytest.fixture
def fleet_dir(tmp_path: Path) -> Path:
    return make_fleet(tmp_path / "fleet")


@pytest.fixture
def fleet(fleet_dir: Path) -> Fleet:
    return load_fleet(fleet_dir)


# --- Immutability --------------------------------------------------------------------------------

def test_specs_are_frozen(fleet: Fleet) -> None:
    spec = fleet.strategies["s1"]
    worker = fleet.workers["w1"]
    for obj, attr, value in [
        (spec, "id", "s2"), (spec, "heartbeat_ms", 1), (spec, "params_json", "{}"),
        (spec.requirements, "api", "binance"), (spec.scheduling, "max_restarts", 0),
        (spec.source, "line", 99), (worker, "host", "elsewhere"), (worker, "max_strategies", 99),
        (fleet, "fleet_hash", "sha256:0"), (fleet.settings, "policy", "round-robin"),
        (fleet.settings.ssh, "parallelism", 1), (fleet.settings.monitor, "lease_ttl_s", 0),
    ]:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, attr, value)


def test_collections_cannot_be_changed(fleet: Fleet) -> None:
    with pytest.raises(TypeError):
        fleet.strategies["s2"] = fleet.strategies["s1"]  # type: ignore[index]
    with pytest.raises(TypeError):
        del fleet.workers["w1"]  # type: ignore[attr-defined]
    with pytest.raises(AttributeError):
        fleet.workers["w1"].supported_apis.add("okx")  # type: ignore[attr-defined]
    assert isinstance(fleet.workers["w1"].runner, tuple)
    assert isinstance(fleet.files, tuple)


def test_params_are_a_fresh_copy_each_time(fleet: Fleet) -> None:
    spec = fleet.strategies["s1"]
    params = spec.params
    assert params == {"symbol": "BTCUSDT", "grid": {"levels": 10, "spacing": 0.004}}
    assert spec.params is not params
    params["symbol"] = "ETHUSDT"
    params["grid"]["levels"] = 99
    params["extra"] = True
    assert spec.params == {"symbol": "BTCUSDT", "grid": {"levels": 10, "spacing": 0.004}}
    launch = spec.launch_fields()
    launch["params"]["grid"]["levels"] = 1
    assert spec.params["grid"]["levels"] == 10


# --- spec_hash -----------------------------------------------------------------------------------

SPEC_EDITS = [
    # (id, old text, new text, does the running copy need a restart?)
    ("params-value", "symbol: BTCUSDT", "symbol: ETHUSDT", True),
    ("params-nested", "levels: 10", "levels: 12", True),
    ("params-added", "symbol: BTCUSDT,", "symbol: BTCUSDT, baseQty: 0.001,", True),
    ("heartbeatMs", "heartbeatMs: 60000", "heartbeatMs: 30000", True),
    ("scheduling-maxRestarts", "maxRestarts: 5", "maxRestarts: 6", True),
    ("scheduling-stopTimeout", "stopTimeoutSeconds: 30", "stopTimeoutSeconds: 45", True),
    ("scheduling-autoRestart", "maxRestarts: 5,", "maxRestarts: 5, autoRestart: false,", True),
    ("params-key-order", "{symbol: BTCUSDT, grid: {levels: 10, spacing: 0.004}}",
     "{grid: {spacing: 0.004, levels: 10}, symbol: BTCUSDT}", False),
    ("heartbeatMs-default-spelled-out", "heartbeatMs: 60000\n", "", False),
    ("scheduling-default-spelled-out", "maxRestarts: 5,", "maxRestarts: 5, restartDelay: 10000,", False),
    ("stopTimeout-as-float", "stopTimeoutSeconds: 30", "stopTimeoutSeconds: 30.0", False),
    ("requirements-region", "region: JP}", "region: US}", False),
    ("requirements-api", "api: bybit,", "api: binance,", False),
    ("requirements-account", "account: acc1", "account: acc2", True),     # its secrets are in the env
    ("requirements-credentials", "region: JP}", "region: JP, credentials: true}", False),
    ("desiredState", "desiredState: running", "desiredState: paused", False),
    ("name", "name: Grid BTC", "name: Grid BTC (renamed)", False),
    ("comment", "id: s1\n", "id: s1  # the first grid\n", False),
]


@pytest.mark.parametrize("old,new,changes", [e[1:] for e in SPEC_EDITS], ids=[e[0] for e in SPEC_EDITS])
def test_spec_hash_follows_what_the_process_was_started_with(
        tmp_path: Path, fleet: Fleet, old: str, new: str, changes: bool) -> None:
    assert STRATEGY.count(old) == 1
    edited = load_fleet(make_fleet(tmp_path / "edited", STRATEGY.replace(old, new)))
    before, after = fleet.strategies["s1"], edited.strategies["s1"]
    assert (before.spec_hash != after.spec_hash) is changes
    assert before.spec_hash.startswith("sha256:")


def test_spec_hash_follows_strategy_file_content(tmp_path: Path, fleet: Fleet) -> None:
    before = fleet.strategies["s1"]
    edited = load_fleet(make_fleet(tmp_path / "edited", js=JS.replace("st_init() {}", "st_init() { return 1; }")))
    assert edited.strategies["s1"].spec_hash != before.spec_hash
    assert edited.strategies["s1"].file_sha256 != before.file_sha256
    same = load_fleet(make_fleet(tmp_path / "same"))
    assert same.strategies["s1"].spec_hash == before.spec_hash


def test_spec_hash_is_stable_across_loads(fleet_dir: Path, fleet: Fleet) -> None:
    assert load_fleet(fleet_dir).strategies["s1"].spec_hash == fleet.strategies["s1"].spec_hash


# --- fleet_hash ----------------------------------------------------------------------------------

def test_fleet_hash_is_stable(fleet_dir: Path, fleet: Fleet) -> None:
    os.utime(fleet_dir / "workers.yaml", (0, 0))      # times do not count, only content
    assert load_fleet(fleet_dir).fleet_hash == fleet.fleet_hash


@pytest.mark.parametrize("path,edit", [
    ("workers.yaml", lambda t: t.replace("maxStrategies: 2", "maxStrategies: 3")),
    ("workers.yaml", lambda t: t + "# only a comment\n"),
    ("strategies.yaml", lambda t: t.replace("desiredState: running", "desiredState: stopped")),
    ("strategies.yaml", lambda t: t.replace("region: JP}", "region: US}")),
    ("strategies/grid.js", lambda t: t + "// changed\n"),
], ids=["worker-field", "yaml-comment", "strategy-desiredState", "strategy-requirements", "strategy-file"])
def test_fleet_hash_changes_with_any_fleet_file(fleet_dir: Path, fleet: Fleet, path: str, edit) -> None:
    target = fleet_dir / path
    target.write_text(edit(target.read_text()))
    assert load_fleet(fleet_dir).fleet_hash != fleet.fleet_hash


def test_fleet_hash_changes_when_a_yaml_file_is_added_or_renamed(fleet_dir: Path, fleet: Fleet) -> None:
    (fleet_dir / "fleet.yaml").write_text("apiVersion: quantlab/v1\nkind: Fleet\n")
    added = load_fleet(fleet_dir).fleet_hash
    assert added != fleet.fleet_hash
    (fleet_dir / "fleet.yaml").rename(fleet_dir / "settings.yaml")
    assert load_fleet(fleet_dir).fleet_hash not in (added, fleet.fleet_hash)


def test_fleet_hash_ignores_hidden_folders(fleet_dir: Path, fleet: Fleet) -> None:
    (fleet_dir / ".quantlab").mkdir()
    (fleet_dir / ".quantlab" / "state.yaml").write_text("serial: 7\n")
    assert load_fleet(fleet_dir).fleet_hash == fleet.fleet_hash


# --- Problems ------------------------------------------------------------------------------------

def test_problems_are_sorted_and_deduplicated() -> None:
    a10, a9, b1, a0 = Problem("a.yaml", 10, "x"), Problem("a.yaml", 9, "y"), Problem("b.yaml", 1, "z"), \
        Problem("a.yaml", 0, "w")
    exc = FleetInvalid([b1, a10, a9, a10, a0, b1])
    assert exc.problems == [a0, a9, a10, b1]           # line order is numeric: 9 before 10
    assert str(exc).splitlines() == ["a.yaml: w", "a.yaml:9: y", "a.yaml:10: x", "b.yaml:1: z"]


def test_problems_from_every_phase_come_out_in_file_line_order(tmp_path: Path) -> None:
    # Cross-reference problems are found after the schema ones; the report is still FILE:LINE order.
    root = make_fleet(tmp_path / "fleet", STRATEGY.replace("strategies/grid.js", "strategies/gone.js"))
    (root / "z.yaml").write_text(WORKERS.replace("w1", "w2") + "port: 0\n")
    (root / "a.yaml").write_text(WORKERS + "---\n" + WORKERS.replace("w1", "w3").replace("local", "Bad Host"))
    with pytest.raises(FleetInvalid) as info:
        load_fleet(root)
    shown = [(Path(p.file).name, p.line) for p in info.value.problems]
    assert shown == [("a.yaml", 11), ("strategies.yaml", 5), ("workers.yaml", 3), ("z.yaml", 7)]
    messages = [p.message for p in info.value.problems]
    assert "host: 'Bad Host' must be a host name" in messages[0]
    assert "not found" in messages[1]
    assert "duplicate Worker id 'w1'" in messages[2] and f"{root / 'a.yaml'}:3" in messages[2]
    assert "port: 0 is too small" in messages[3]


def test_the_same_problem_is_reported_once(tmp_path: Path) -> None:
    # The same YAML file reached twice (a symlink inside the fleet) names each path once.
    root = make_fleet(tmp_path / "fleet", STRATEGY + "bogus: 1\n")
    os.symlink("strategies.yaml", root / "again.yaml")
    with pytest.raises(FleetInvalid) as info:
        load_fleet(root)
    texts = [str(p) for p in info.value.problems]
    assert len(texts) == len(set(texts))
    # Each path's unknown field, and (a document with schema errors still counts) its id twice.
    expected = [("again.yaml", 11, "unknown field 'bogus'"), ("strategies.yaml", 3, "duplicate Strategy id 's1'"),
                ("strategies.yaml", 11, "unknown field 'bogus'")]
    assert [(Path(p.file).name, p.line) for p in info.value.problems] == [e[:2] for e in expected]
    assert all(e[2] in p.message for p, e in zip(info.value.problems, expected))


def test_problem_text() -> None:
    assert str(Problem("fleet/a.yaml", 3, "bad")) == "fleet/a.yaml:3: bad"
    assert str(Problem("fleet/a.yaml", 0, "bad")) == "fleet/a.yaml: bad"


@pytest.mark.parametrize("make,fragment", [
    (lambda p: p, "fleet directory not found"),
    (lambda p: (p.parent.mkdir(parents=True, exist_ok=True), p.write_text("x"), p)[-1], "is not a directory"),
    (lambda p: (p.mkdir(parents=True), p)[-1], "no *.yaml or *.yml files found"),
], ids=["missing", "a-file", "empty"])
def test_no_usable_fleet_directory(tmp_path: Path, make, fragment: str) -> None:
    root = make(tmp_path / "fleet")
    with pytest.raises(FleetInvalid) as info:
        load_fleet(root)
    (problem,) = info.value.problems
    assert problem.file == str(root) and problem.line == 0 and fragment in problem.message


@pytest.mark.parametrize("text,fragment", [
    ("params: !!python/object:os.system {}\n", "could not determine a constructor"),
    ("params: !vault {a: 1}\n", "could not determine a constructor"),
    ("params: {a: *nowhere}\n", "undefined alias"),
    ("params: " + "[" * 2000 + "]" * 2000 + "\n", "YAML syntax error"),
    ("params: !!set {a, b}\n", "set values are not JSON data"),
    ("scheduling: {stopTimeoutSeconds: .nan}\n", "is not a JSON number"),
    ("params: {1: a, b: c}\n", "key '1' reads as integer 1, not a string"),
    ("? \n: 1\n", "reads as null None"),
    ("params: {a: " + "1" * 5000 + "}\n", "is too long to read"),
    ("? " + "[" * 600 + "]" * 600 + "\n: 1\n", "a list or mapping cannot be a key"),
], ids=["python-tag", "unknown-tag", "undefined-alias", "deep-nesting", "set", "nan", "int-key", "null-key",
        "int-of-5000-digits", "deeply-nested-key"])
def test_odd_yaml_is_a_problem_not_a_crash(tmp_path: Path, text: str, fragment: str) -> None:
    base = "".join(line for line in STRATEGY.splitlines(keepends=True)
                   if not line.startswith(("params:", "scheduling:")))
    assert base.count("\n") == 8
    root = make_fleet(tmp_path / "fleet", base + text)
    with pytest.raises(FleetInvalid) as info:
        load_fleet(root)
    (problem,) = info.value.problems
    assert problem.file == str(root / "strategies.yaml") and problem.line == 9
    assert fragment in problem.message


# --- Every problem in one run --------------------------------------------------------------------
# A document with schema errors still takes part in the cross-references, from its fields that
# passed; no model is built from it.

DATA = Path(__file__).resolve().parents[1] / "data"


def _refused(root: Path, checkout: Path | None = None) -> list[Problem]:
    with pytest.raises(FleetInvalid) as info:
        load_fleet(root, checkout=checkout)
    return info.value.problems


def test_every_mistake_in_one_file_is_reported_in_one_run() -> None:
    # 9 schema errors, and 5 cross-references that each involve a document with schema errors (so
    # they are found in the same run only when such a document still takes part).
    root = DATA / "invalid" / "mistakes-of-every-kind-in-one-file" / "fleet"
    problems = _refused(root)
    assert {p.file for p in problems} == {str(root / "fleet.yaml")}
    assert [(p.line, p.message.split(":")[0]) for p in problems] == [
        (5, "Fleet"),                                   # policy: not one of
        (8, "Fleet"),                                   # the lease rule, with autoRecover and ssh broken
        (9, "Fleet"),                                   # autoRecover: not a boolean
        (10, "Fleet"),                                  # ssh.parallelism: too small
        (14, "Worker Worker_1"),                        # id: not lowercase
        (16, "Worker Worker_1"),                        # maxStrategies: too small
        (17, "Worker Worker_1"),                        # unknown field
        (31, "Worker w3"),                              # workdir of w2 again, w3 has a schema error
        (32, "Worker w3"),                              # cordoned: not a boolean
        (44, "Strategy s2"),                            # strategy file missing, s2 has a schema error
        (45, "Strategy s2"),                            # account+symbol of s1
        (47, "Strategy s2"),                            # heartbeatMs: not an integer
        (51, "duplicate Strategy id 's1'"),             # the repeat has a schema error
        (54, "Strategy s1"),                            # desiredState: not one of
    ]


FLEET_DOC = "apiVersion: quantlab/v1\nkind: Fleet\n"


@pytest.mark.parametrize("text,lines,lease", [
    # The field a break rests on has an error: its default would decide, so only the error is said.
    ("reconcile: {intervalSeconds: 30s}\nmonitor: {leaseTtlSeconds: 12}\n", [3], False),
    ("reconcile: {intervalSeconds: 30}\nmonitor: {leaseTtlSeconds: -5}\n", [4], False),
    ("reconcile: {intervalSeconds: fast, probeDeadlineSeconds: 10}\n", [3], False),
    ("reconcile: {intervalSeconds: 2, leaderLeaseSeconds: 0}\nmonitor: {leaseTtlSeconds: 60}\n", [3], False),
    ("reconcile: {intervalSeconds: 30}\nmonitor: 40\n", [4], False),
    # Errors elsewhere, or in a term the break does not rest on: the break is real either way.
    ("reconcile: {intervalSeconds: 30}\nmonitor: {leaseTtlSeconds: 40, autoRecover: 1}\n", [4, 4], True),
    ("reconcile: {intervalSeconds: 30, bogus: 1}\nmonitor: {leaseTtlSeconds: 40}\npolicy: fair\n", [3, 4, 5], True),
    ("reconcile: {intervalSeconds: fast, probeDeadlineSeconds: 1}\n"
     "monitor: {controllerRestartSeconds: 60, leaseTtlSeconds: 30}\n", [3, 4], True),
], ids=["interval-broken", "ttl-broken", "interval-broken-deadline-written", "leader-lease-broken",
        "monitor-not-a-mapping", "unrelated-field", "unknown-field-and-policy", "interval-broken-restart-decides"])
def test_the_lease_rule_is_checked_from_the_fields_that_passed(tmp_path: Path, text: str, lines: list[int],
                                                               lease: bool) -> None:
    root = make_fleet(tmp_path / "fleet")
    (root / "fleet.yaml").write_text(FLEET_DOC + text)
    problems = _refused(root)
    assert [p.line for p in problems] == lines, problems
    said = [p for p in problems if "leaseTtlSeconds" in p.message and "shorter than the loop" in p.message]
    assert len(said) == lease, problems


def test_a_document_with_schema_errors_keeps_its_cross_references(tmp_path: Path) -> None:
    root = make_fleet(tmp_path / "fleet", STRATEGY + "bogus: 1\n")
    (root / "more.yaml").write_text(
        STRATEGY.replace("strategies/grid.js", "strategies/gone.js").replace("heartbeatMs: 60000", "heartbeatMs: 1")
        + "---\n" + WORKERS.replace("w1", "w2") + "workdir: /srv/w\nport: 22\n"
        + "---\n" + WORKERS.replace("w1", "w3") + "workdir: /srv/w/\nport: 22\ncordoned: maybe\n")
    shown = [(Path(p.file).name, p.line, p.message) for p in _refused(root)]
    assert [s[:2] for s in shown] == [("more.yaml", 5), ("more.yaml", 8), ("more.yaml", 27), ("more.yaml", 29),
                                      ("strategies.yaml", 3), ("strategies.yaml", 11)]
    assert "Strategy s1: strategyFile 'strategies/gone.js' not found" in shown[0][2]
    assert "heartbeatMs: 1 is too small" in shown[1][2]
    assert "Worker w3: workdir /srv/w/ on host local is also used by worker w2" in shown[2][2]
    assert "cordoned: expected boolean" in shown[3][2]
    assert "duplicate Strategy id 's1'" in shown[4][2] and "more.yaml:3" in shown[4][2]
    assert "unknown field 'bogus'" in shown[5][2]
    # The repeated id stays out of the account check (same account and symbol, no shareAccount):
    # which of the two would it be?
    assert not any("already trades" in s[2] for s in shown)


def _doc(kind: str, **fields: Any) -> str:
    return yaml.safe_dump({"apiVersion": "quantlab/v1", "kind": kind, **fields}, sort_keys=False)


def _strategy(ident: str, account: str = "acc1", **fields: Any) -> str:
    return _doc("Strategy", id=ident, **{"strategyFile": "strategies/grid.js", "params": {"symbol": "BTCUSDT"},
                                         "requirements": {"api": "bybit", "account": account}, **fields})


def _worker(ident: str, **fields: Any) -> str:
    return _doc("Worker", id=ident, host="local", capabilities={"maxStrategies": 1, "supportedApis": ["bybit"]},
                **{"workdir": "/srv/w", **fields})


@pytest.mark.parametrize("pair,fragments", [
    # Two documents that the check would compare, if the field with an error took part.
    ((_strategy("Bad_Id"), _strategy("Bad_Id", "acc2")), ["id: 'Bad_Id' must be", "id: 'Bad_Id' must be"]),
    ((_strategy("s1", "acc 1"), _strategy("s2", "acc 1")),
     ["requirements.account: 'acc 1' must be", "requirements.account: 'acc 1' must be"]),
    ((_strategy("s1", scheduling={"shareAccount": True}), _strategy("s2", scheduling={"shareAccount": "yes"})),
     ["scheduling.shareAccount: expected boolean"]),
    ((_strategy("s1"), _strategy("s2", params=["symbol", "BTCUSDT"])), ["params: expected object"]),
    ((_strategy("s1"), _strategy("s2", "acc2", strategyFile="")),
     ["strategyFile: '' must end in", "strategyFile: '' should be non-empty"]),
    ((_worker("w1", workdir="~quant/w"), _worker("w2", workdir="~quant/w")),
     ["workdir: '~quant/w' must not start with ~user", "workdir: '~quant/w' must not start with ~user"]),
    ((_worker("w1", port="22"), _worker("w2", port="22")), ["port: expected integer", "port: expected integer"]),
], ids=["id", "account", "share-account", "params", "empty-strategy-file", "workdir", "port"])
def test_a_field_with_an_error_is_left_out_of_the_cross_references(tmp_path: Path, pair: tuple[str, str],
                                                                   fragments: list[str]) -> None:
    # Only the errors are said: a repeated id, a shared account, a shared workdir or a strategy
    # file that is not one would be a consequence of them (the file '' is the fleet dir itself).
    root = make_fleet(tmp_path / "fleet")
    (root / ("strategies.yaml" if "Strategy" in pair[0] else "workers.yaml")).unlink()
    (root / "pair.yaml").write_text("---\n".join(pair))
    messages = [p.message for p in _refused(root)]
    assert len(messages) == len(fragments), messages
    assert all(f in m for f, m in zip(fragments, messages)), messages


def test_the_adapter_reads_the_strategy_files_of_documents_with_errors(tmp_path: Path) -> None:
    texts = [STRATEGY.replace("heartbeatMs: 60000", "heartbeatMs: fast"),
             STRATEGY.replace("id: s1", "id: s2").replace("strategies/grid.js", "b.js") + "bogus: 1\n",
             STRATEGY.replace("id: s1", "id: S3").replace("strategies/grid.js", "c.py"),
             STRATEGY.replace("id: s1", "id: s4").replace("strategies/grid.js", "/abs/d.js"),
             STRATEGY.replace("strategyFile: strategies/grid.js", "strategyFile: [e.js]")]
    files = [FleetFile(f"{i}.yaml", f"{i}.yaml", data=t.encode()) for i, t in enumerate(texts)]
    parsed = loader.parse_fleet(tmp_path, files, [])
    assert parsed.strategy_files() == ["b.js", "c.py", "strategies/grid.js"]
    # Each one the adapter found is taken as read (none "was not read"); still no model is built.
    found = {w: StrategyFile(path=tmp_path / w, rel=w, sha256="0" * 64) for w in parsed.strategy_files()}
    with pytest.raises(FleetInvalid) as info:
        loader.build_fleet(parsed, found)
    problems = info.value.problems
    assert {p.file for p in problems} == {f"{i}.yaml" for i in range(5)}
    assert not any("was not read" in p.message for p in problems), problems
    assert any("'/abs/d.js' must be relative to the fleet directory" in p.message for p in problems)


def test_a_checkout_of_a_commit_reads_them_too(tmp_path: Path) -> None:
    # What the loop applies: the files of a commit checked out elsewhere, named as in the fleet dir.
    root = tmp_path / "fleet"
    checkout = make_fleet(tmp_path / "checkout", STRATEGY.replace("strategies/grid.js", "strategies/gone.js")
                          .replace("desiredState: running", "desiredState: sleeping"))
    problems = _refused(root, checkout)
    assert [(p.file, p.line) for p in problems] == [(str(root / "strategies.yaml"), 5),
                                                    (str(root / "strategies.yaml"), 7)]
    assert f"not found; expected {root / 'strategies' / 'gone.js'}" in problems[0].message


# --- No regexes in messages ----------------------------------------------------------------------

def _patterns(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        if "pattern" in node:
            yield node
        for value in node.values():
            yield from _patterns(value)
    elif isinstance(node, list):
        for value in node:
            yield from _patterns(value)


def test_every_pattern_in_the_schemas_says_in_words_what_it_allows() -> None:
    # patternErrorMessage is also what editors (yaml-language-server, VS Code) show for it.
    from quantlab.core.spec.schemas import schemas_by_kind
    found = [s for schema in schemas_by_kind().values() for s in _patterns(schema)]
    assert len(found) >= 15
    for sub in found:
        words = sub.get("patternErrorMessage", "")
        assert words.startswith("must ") and sub["pattern"] not in words, sub


def test_no_message_of_the_invalid_corpus_shows_a_regex() -> None:
    from quantlab.core.spec.schemas import schemas_by_kind
    patterns = {s["pattern"] for schema in schemas_by_kind().values() for s in _patterns(schema)}
    messages = []
    for case in sorted((DATA / "invalid").iterdir()):
        if (case / "fleet").exists() or (case / "fleet").is_symlink():
            messages += [p.message for p in _refused(case / "fleet")]
    assert len(messages) > 80
    for message in messages:
        assert "^[" not in message and "{0," not in message and "]{" not in message, message
        assert not any(p in message for p in patterns), message


def test_a_pattern_without_words_is_still_not_shown() -> None:
    import jsonschema
    schema = {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}$",
                                                         "description": "three capital letters"}}}
    (error,) = jsonschema.Draft202012Validator(schema).iter_errors({"code": "eu"})
    path, message = schema_message(error, schema)
    assert path == ["code"]
    assert message == "code: 'eu' is not in the form this field takes (three capital letters)"


# --- Limits: nesting, aliases, sizes, long values ------------------------------------------------

def _strategy_with(text: str) -> str:
    """STRATEGY with its params line (line 6) replaced by `text`."""
    return STRATEGY.replace("params: {symbol: BTCUSDT, grid: {levels: 10, spacing: 0.004}}\n", text)


@pytest.mark.parametrize("levels,refused", [(62, False), (63, True)], ids=["64-deep", "65-deep"])
def test_nesting_is_capped_at_64_levels(tmp_path: Path, levels: int, refused: bool) -> None:
    # The document is level 1 and params level 2: 62 nested lists in params.a reach level 64.
    root = make_fleet(tmp_path / "fleet", _strategy_with("params: {a: " + "[" * levels + "]" * levels + "}\n"))
    if not refused:
        assert load_fleet(root).strategies["s1"].params["a"]
        return
    with pytest.raises(FleetInvalid) as info:
        load_fleet(root)
    assert [str(p) for p in info.value.problems] == [
        f"{root / 'strategies.yaml'}:6: params: nested deeper than 64 levels; flatten it"]


def test_an_alias_that_contains_itself_is_a_problem(tmp_path: Path) -> None:
    root = make_fleet(tmp_path / "fleet", _strategy_with("params: {loop: &loop [1, *loop]}\n"))
    with pytest.raises(FleetInvalid) as info:
        load_fleet(root)
    (problem,) = info.value.problems
    assert problem.line == 6 and "nested deeper than 64 levels" in problem.message


def test_the_value_budget_counts_every_use_of_an_alias(tmp_path: Path) -> None:
    # 1,000 uses of one list of 1,000: a small file, a million values once expanded.
    text = "params:\n  row: &row [" + ", ".join(["0"] * 1000) + "]\n  rows: [" + ", ".join(["*row"] * 1000) + "]\n"
    root = make_fleet(tmp_path / "fleet", _strategy_with(text))
    with pytest.raises(FleetInvalid) as info:
        load_fleet(root)
    (problem,) = info.value.problems
    assert problem.line == 6 and "expands to more than 1,000,000 values" in problem.message


def test_deep_nesting_without_libyaml_is_a_problem(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # PyYAML's pure-Python parser (used when libyaml is missing) recurses once per level.
    monkeypatch.setattr(yamldocs, "FleetLoader", yaml.SafeLoader)
    root = make_fleet(tmp_path / "fleet", _strategy_with("params: {a: " + "[" * 1500 + "]" * 1500 + "}\n"))
    with pytest.raises(FleetInvalid) as info:
        load_fleet(root)
    (problem,) = info.value.problems
    assert problem.file == str(root / "strategies.yaml") and "nested too deeply to read" in problem.message


@pytest.mark.parametrize("extra_bytes,refused", [(0, False), (1, True)], ids=["96-KiB", "96-KiB-and-1"])
def test_params_are_capped_at_96_KiB_of_json(tmp_path: Path, extra_bytes: int, refused: bool) -> None:
    # canonical JSON: {"a":"…"} is 8 bytes around the string; "é" is 2 bytes in UTF-8.
    value = "é" * 1000 + "x" * (96 * 1024 - 8 - 2000 + extra_bytes)
    root = make_fleet(tmp_path / "fleet", _strategy_with(f"params: {{a: '{value}'}}\n"))
    if not refused:
        assert load_fleet(root).strategies["s1"].params["a"] == value
        return
    with pytest.raises(FleetInvalid) as info:
        load_fleet(root)
    assert [(p.line, p.message.split(":")[:2]) for p in info.value.problems] == [
        (6, ["Strategy s1", " params are 98,305 bytes as JSON, more than 96 KiB"])]


LONG = "x" * 1_000_000


@pytest.mark.parametrize("edit,line,fragment", [
    (lambda t: t.replace("heartbeatMs: 60000", f"heartbeatMs: '{LONG}'"), 8, "(1000000 characters)"),
    (lambda t: t.replace("desiredState: running", f"desiredState: {LONG}"), 7, "(1000000 characters)"),
    (lambda t: t.replace("id: s1", f"id: {LONG}"), 3, "(1000000 characters)"),
    (lambda t: t.replace("kind: Strategy", f"kind: {LONG}"), 2, "(1000000 characters)"),
    (lambda t: t + f"? {LONG}\n: 1\n", 11, "unknown field 'xxxxxxxx"),
    (lambda t: t.replace("name: Grid BTC", f"name: [{', '.join(['x'] * 100_000)}]"), 4, "['x', 'x', 'x', 'x', ...]"),
    (lambda t: t.replace("strategies/grid.js", f"strategies/{LONG}.js"), 5, "(1000014 characters)"),
    (lambda t: t.replace("heartbeatMs: 60000", "heartbeatMs: " + "9" * 4000), 8, "… (4000 characters) is too large"),
], ids=["type", "enum", "pattern", "kind", "unknown-field", "long-list", "strategy-file", "huge-integer"])
def test_long_values_are_clipped_in_messages(tmp_path: Path, edit: Callable[[str], str], line: int,
                                             fragment: str) -> None:
    root = make_fleet(tmp_path / "fleet", edit(STRATEGY))
    with pytest.raises(FleetInvalid) as info:
        load_fleet(root)
    (problem,) = info.value.problems
    assert problem.line == line
    assert len(problem.message) < 400 and fragment in problem.message, problem.message[:1000]


def test_a_message_is_clipped_as_a_whole() -> None:
    reader = ParsedFleet(Path("."))
    reader.problem(("a.yaml", 1), "y" * 50_000)
    (problem,) = reader.problems
    assert problem.message == "y" * MAX_MESSAGE + "… (50000 characters)"


def _sparse_file(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)


def test_a_yaml_file_over_16_MiB_is_refused_unread(fleet_dir: Path) -> None:
    _sparse_file(fleet_dir / "huge.yaml", 16 * 2**20 + 1)
    with pytest.raises(FleetInvalid) as info:
        load_fleet(fleet_dir)
    assert [str(p) for p in info.value.problems] == [
        f"{fleet_dir / 'huge.yaml'}: larger than 16 MiB; split it into smaller files"]


def test_a_yaml_file_of_exactly_16_MiB_is_read(fleet_dir: Path) -> None:
    text = WORKERS.replace("w1", "w2")
    (fleet_dir / "big.yaml").write_text(text + "#" * (16 * 2**20 - len(text) - 1) + "\n")
    assert set(load_fleet(fleet_dir).workers) == {"w1", "w2"}


def test_a_strategy_file_over_16_MiB_is_refused(fleet_dir: Path) -> None:
    _sparse_file(fleet_dir / "strategies" / "grid.js", 16 * 2**20 + 1)
    with pytest.raises(FleetInvalid) as info:
        load_fleet(fleet_dir)
    (problem,) = info.value.problems
    assert problem.line == 5 and "strategyFile 'strategies/grid.js' is larger than 16 MiB" in problem.message


# --- Strange entries in the fleet directory ------------------------------------------------------
# Loads that could hang or exhaust memory before these fixes run in a forked child with a
# deadline and a memory cap. As root, permission bits do not stop reads: the child then drops to
# an unprivileged user, and the fleet lives in a folder that user can reach.

NOBODY = 65534
CHILD_DEADLINE = 30.0


def _load_in_child(root: Path, unprivileged: bool = False) -> tuple[str, Any]:
    """("valid", strategy ids) | ("invalid", problems) | ("crash", traceback) of load_fleet(root)."""
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_child_load, args=(send, root, unprivileged), daemon=True)
    child.start()
    send.close()
    try:
        if not receive.poll(CHILD_DEADLINE):
            pytest.fail(f"load_fleet({root}) did not finish within {CHILD_DEADLINE:g} s")
        return receive.recv()
    finally:
        child.kill()
        child.join(CHILD_DEADLINE)
        receive.close()


def _child_load(send: Any, root: Path, unprivileged: bool) -> None:
    try:
        _cap_memory(2**30)
        if unprivileged:
            _drop_root()
        fleet = load_fleet(root)
        send.send(("valid", sorted(fleet.strategies)))
    except FleetInvalid as exc:
        send.send(("invalid", exc.problems))
    except BaseException:
        send.send(("crash", traceback.format_exc()))


def _cap_memory(extra: int) -> None:
    # A device read to its end must fail fast here instead of filling the machine's memory.
    with open("/proc/self/statm") as statm:
        in_use = int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    resource.setrlimit(resource.RLIMIT_AS, (in_use + extra, in_use + extra))


def _drop_root() -> None:
    if os.geteuid() == 0:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)


def _problems(result: tuple[str, Any]) -> list[str]:
    kind, detail = result
    assert kind == "invalid", detail
    return [str(p) for p in detail]


@pytest.fixture
def open_tmp() -> Iterator[Path]:
    """A temporary folder an unprivileged user can reach (pytest's tmp_path is private to root).
    Permissions the test took away are given back before it is removed."""
    folder = Path(tempfile.mkdtemp(prefix="quantlab-loader-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        _make_removable(folder)
        shutil.rmtree(folder)


def _make_removable(folder: Path) -> None:
    folder.chmod(0o700)
    for dirpath, dirnames, _ in os.walk(folder):   # top-down: each folder is opened before it is listed
        for name in dirnames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, 0o700)


@pytest.fixture
def open_fleet(open_tmp: Path) -> Path:
    root = make_fleet(open_tmp / "fleet")
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    assert _load_in_child(root, unprivileged=True) == ("valid", ["s1"])     # readable as it stands
    return root


def _make_fifo(path: Path) -> None:
    os.mkfifo(path)


def _make_char_device(path: Path) -> None:
    try:
        os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 5))      # /dev/zero: never ends
    except PermissionError:
        pytest.skip("creating a device needs root (CAP_MKNOD)")


def _make_socket(path: Path) -> None:
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))


SPECIAL = [(_make_fifo, "a FIFO (named pipe)"), (_make_char_device, "a character device"),
           (_make_socket, "a socket")]
SPECIAL_IDS = ["fifo", "char-device", "socket"]


@pytest.mark.parametrize("make,kind", SPECIAL, ids=SPECIAL_IDS)
def test_a_special_file_named_yaml_is_refused_without_opening_it(open_tmp: Path, make, kind: str) -> None:
    root = make_fleet(open_tmp / "fleet")
    make(root / "odd.yaml")
    assert _problems(_load_in_child(root)) == [
        f"{root / 'odd.yaml'}: is {kind}, not a regular file; remove it or rename it"]


@pytest.mark.parametrize("make,kind", SPECIAL, ids=SPECIAL_IDS)
def test_a_special_strategy_file_is_refused_without_opening_it(open_tmp: Path, make, kind: str) -> None:
    root = make_fleet(open_tmp / "fleet")
    (root / "strategies" / "grid.js").unlink()
    make(root / "strategies" / "grid.js")
    assert _problems(_load_in_child(root)) == [
        f"{root / 'strategies.yaml'}:5: Strategy s1: strategyFile 'strategies/grid.js' is not a regular file "
        f"but {kind}; point strategyFile at a regular file"]


def test_a_symlink_inside_the_fleet_to_a_special_file_is_refused(open_tmp: Path) -> None:
    root = make_fleet(open_tmp / "fleet")
    os.mkfifo(root / "strategies" / "pipe")
    os.symlink("strategies/pipe", root / "linked.yaml")
    assert _problems(_load_in_child(root)) == [
        f"{root / 'linked.yaml'}: is a FIFO (named pipe), not a regular file; remove it or rename it"]


def test_an_unreadable_folder_is_a_problem_not_a_smaller_fleet(open_fleet: Path) -> None:
    more = open_fleet / "more"
    more.mkdir(mode=0o755)
    (more / "s2.yaml").write_text(STRATEGY.replace("id: s1", "id: s2").replace("acc1", "acc2"))
    (more / "s2.yaml").chmod(0o644)
    assert _load_in_child(open_fleet, unprivileged=True) == ("valid", ["s1", "s2"])
    more.chmod(0o000)
    assert _problems(_load_in_child(open_fleet, unprivileged=True)) == [
        f"{more}: cannot read folder: Permission denied; fix its permissions"]


def test_a_folder_that_can_be_listed_but_not_entered_is_a_problem(open_fleet: Path) -> None:
    more = open_fleet / "more"
    more.mkdir(mode=0o755)
    (more / "s2.yaml").write_text(STRATEGY.replace("id: s1", "id: s2"))
    more.chmod(0o644)          # names can be listed, files cannot be opened
    assert _problems(_load_in_child(open_fleet, unprivileged=True)) == [
        f"{more / 's2.yaml'}: cannot read: Permission denied; check its permissions"]


def test_an_unreadable_yaml_file_is_a_problem(open_fleet: Path) -> None:
    (open_fleet / "workers.yaml").chmod(0o000)
    assert _problems(_load_in_child(open_fleet, unprivileged=True)) == [
        f"{open_fleet / 'workers.yaml'}: cannot read: Permission denied; check its permissions"]


def test_an_unreadable_hidden_folder_is_still_skipped(open_fleet: Path) -> None:
    (open_fleet / ".quantlab").mkdir(mode=0o000)
    assert _load_in_child(open_fleet, unprivileged=True) == ("valid", ["s1"])


@pytest.mark.parametrize("target", ["strategies/grid.js", "strategies"], ids=["file", "folder"])
def test_an_unreadable_strategy_file_is_a_problem(open_fleet: Path, target: str) -> None:
    (open_fleet / target).chmod(0o000)
    # The walk for YAML files also meets the unreadable folder, and says so.
    folder = [f"{open_fleet / 'strategies'}: cannot read folder: Permission denied; fix its permissions"]
    assert _problems(_load_in_child(open_fleet, unprivileged=True)) == (folder if target == "strategies" else []) + [
        f"{open_fleet / 'strategies.yaml'}:5: Strategy s1: strategyFile 'strategies/grid.js' cannot be read: "
        "Permission denied; check its permissions"]


def test_an_unreadable_fleet_directory_is_one_problem(open_fleet: Path) -> None:
    open_fleet.chmod(0o000)
    assert _problems(_load_in_child(open_fleet, unprivileged=True)) == [
        f"{open_fleet}: cannot read folder: Permission denied; fix its permissions"]


def test_a_fleet_directory_that_cannot_be_reached_is_one_problem(open_fleet: Path) -> None:
    open_fleet.parent.chmod(0o000)
    assert _problems(_load_in_child(open_fleet, unprivileged=True)) == [
        f"{open_fleet}: cannot read fleet directory: Permission denied; fix its permissions or pass another "
        "--fleet DIR"]


def test_a_special_file_as_fleet_directory_is_one_problem(open_tmp: Path) -> None:
    os.mkfifo(open_tmp / "fleet")
    assert _problems(_load_in_child(open_tmp / "fleet")) == [
        f"{open_tmp / 'fleet'}: fleet directory is not a directory; pass --fleet DIR or set QUANTLAB_FLEET"]


def test_cli_validate_reports_an_unreadable_fleet_directory_in_one_line(open_fleet: Path) -> None:
    from quantlab.face.cli import app
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_child_validate, args=(send, app, open_fleet), daemon=True)
    open_fleet.chmod(0o000)
    child.start()
    send.close()
    try:
        assert receive.poll(CHILD_DEADLINE), "quantlab validate did not finish"
        code, stderr = receive.recv()
    finally:
        child.kill()
        child.join(CHILD_DEADLINE)
        receive.close()
    assert code == 1, stderr
    assert stderr.splitlines()[0] == f"{open_fleet}: cannot read folder: Permission denied; fix its permissions"
    assert "Traceback" not in stderr and len(stderr.splitlines()) == 2, stderr


def _child_validate(send: Any, app: Any, root: Path) -> None:
    empty = Path(tempfile.mkdtemp())
    try:
        sys.stdout = sys.stderr = io.StringIO()
        try:                  # the error path's lazy imports happen as root (the stdlib may be root-only)
            app(["validate", "--fleet", str(empty)])
        except SystemExit:
            pass
        empty.rmdir()
        sys.stderr = io.StringIO()
        _drop_root()
        try:
            app(["validate", "--fleet", str(root)])
            code = 0
        except SystemExit as exc:
            code = exc.code
        send.send((code, sys.stderr.getvalue()))
    except BaseException:
        send.send((-1, traceback.format_exc()))
