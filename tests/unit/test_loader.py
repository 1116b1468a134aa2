"""The loader's models and hashes: immutable specs, what spec_hash and fleet_hash react to, and how
problems are ordered. The corpus of broken fleets lives in test_loader_corpus.py."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from quantlab.spec import Fleet, FleetInvalid, Problem, load_fleet

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
    assert "does not match" in messages[0]
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
    assert sorted(Path(p.file).name for p in info.value.problems) == ["again.yaml", "strategies.yaml"]


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
], ids=["python-tag", "unknown-tag", "undefined-alias", "deep-nesting", "set", "nan", "int-key", "null-key"])
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
