"""The loader against a corpus of fleets: every invalid one is refused with the expected problems.

tests/data/invalid/<case>/fleet/      the fleet directory
tests/data/invalid/<case>/expected.txt
    one `RELPATH:LINE: fragment` a line (RELPATH relative to fleet/, `.` for fleet/ itself; LINE 0
    means the file as a whole). `{fleet}` in a fragment stands for the fleet directory as passed.
    Lines are written in report order (FILE:LINE), and together they must account for every
    problem the loader reports: nothing missing, nothing extra.
tests/data/valid/<case>/fleet/        fleets that must load
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from quantlab.edges.fleetfiles import load_fleet
from quantlab.core.spec import Fleet, FleetInvalid, Problem
from quantlab.core.spec.models import FleetSettings

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "data"
INVALID = sorted(p for p in (DATA / "invalid").iterdir() if p.is_dir())
VALID = sorted(p for p in (DATA / "valid").iterdir() if p.is_dir())
EXPECTED_LINE = re.compile(r"^(?P<file>[^:]+):(?P<line>\d+): (?P<fragment>.+)$")

# A few cases also go through `quantlab validate`, as a person would run it.
CLI_CASES = [
    "duplicate-strategy-id-across-files",
    "invalid-utf8",
    "many-problems-many-files",
    "yaml-dangling-symlink",
    "yaml-tab-character",
]


@dataclass(frozen=True)
class Expected:
    file: str      # relative to the fleet dir
    line: int
    fragment: str

    def shown(self, fleet: str) -> tuple[str, str]:
        """(file as the loader names it when given `fleet`, the fragment with {fleet} filled in)."""
        file = fleet if self.file == "." else os.path.join(fleet, self.file)
        return file, self.fragment.replace("{fleet}", fleet)

    def matches(self, problem: Problem, fleet: str) -> bool:
        file, fragment = self.shown(fleet)
        return problem.file == file and problem.line == self.line and fragment in problem.message


def read_expected(case: Path) -> list[Expected]:
    out = []
    for raw in (case / "expected.txt").read_text(encoding="utf-8").splitlines():
        if not raw.strip() or raw.startswith("#"):
            continue
        m = EXPECTED_LINE.match(raw)
        assert m, f"{case.name}/expected.txt: cannot parse {raw!r}"
        out.append(Expected(m["file"], int(m["line"]), m["fragment"]))
    assert out, f"{case.name}/expected.txt lists no problem"
    return out


def _refused(fleet: Path) -> list[Problem]:
    with pytest.raises(FleetInvalid) as info:
        load_fleet(fleet)
    return info.value.problems


def test_corpus_is_big_enough() -> None:
    assert len(INVALID) >= 35
    assert len(VALID) >= 3


@pytest.mark.parametrize("case", INVALID, ids=[p.name for p in INVALID])
def test_invalid_fleet_is_refused(case: Path) -> None:
    fleet = str(case / "fleet")
    problems = _refused(Path(fleet))
    expected = read_expected(case)
    listing = "\n".join(str(p) for p in problems)

    # Every expected line is matched, in the order the problems are reported.
    positions = []
    for exp in expected:
        hits = [i for i, p in enumerate(problems) if exp.matches(p, fleet)]
        assert hits, f"no problem matches {exp}; reported:\n{listing}"
        positions.append(hits[0])
    assert positions == sorted(positions), f"expected.txt is not in report order; reported:\n{listing}"

    # Nothing reported that expected.txt does not account for.
    unexpected = [p for p in problems if not any(exp.matches(p, fleet) for exp in expected)]
    assert not unexpected, "unexpected problems:\n" + "\n".join(map(str, unexpected))

    # Sorted by FILE:LINE, each reported once, and each one printable.
    assert [(p.file, p.line) for p in problems] == sorted((p.file, p.line) for p in problems)
    assert len({str(p) for p in problems}) == len(problems)
    assert all(p.message and "\n" not in p.message for p in problems)


@pytest.fixture(scope="module")
def cli_runs() -> dict[str, subprocess.CompletedProcess]:
    """Start every CLI case at once (interpreter start-up dominates), then collect them."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "300", "NO_COLOR": "1"}
    env.pop("QUANTLAB_FLEET", None)
    procs = {}
    for name in CLI_CASES:
        # Relative --fleet: problems must be shown as that path joined with the file.
        procs[name] = subprocess.Popen(
            [sys.executable, "-m", "quantlab", "validate", "--fleet", "fleet"],
            cwd=DATA / "invalid" / name, env=env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
    absolute = DATA / "invalid" / CLI_CASES[0] / "fleet"
    procs["absolute"] = subprocess.Popen(
        [sys.executable, "-m", "quantlab", "validate", "--fleet", str(absolute)],
        cwd=REPO, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    procs["valid"] = subprocess.Popen(
        [sys.executable, "-m", "quantlab", "validate", "--fleet", str(DATA / "valid" / "full" / "fleet")],
        cwd=REPO, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=60)
        out[name] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    return out


def _assert_cli_reports(run: subprocess.CompletedProcess, case: Path, fleet: str) -> None:
    assert run.returncode == 1, run.stderr
    lines = run.stderr.splitlines()
    for exp in read_expected(case):
        file, fragment = exp.shown(fleet)
        head = f"{file}:{exp.line}: " if exp.line else f"{file}: "
        assert any(line.startswith(head) and fragment in line for line in lines), (
            f"{head}...{fragment} not on stderr:\n{run.stderr}")
    reported = [line for line in lines if line.startswith(fleet)]
    assert reported, run.stderr
    assert len(reported) == len(set(reported)), f"a problem is printed twice:\n{run.stderr}"
    assert "Traceback" not in run.stderr


@pytest.mark.parametrize("name", CLI_CASES)
def test_cli_validate_reports_file_and_line(cli_runs: dict, name: str) -> None:
    _assert_cli_reports(cli_runs[name], DATA / "invalid" / name, "fleet")


def test_cli_validate_with_absolute_fleet_path(cli_runs: dict) -> None:
    case = DATA / "invalid" / CLI_CASES[0]
    _assert_cli_reports(cli_runs["absolute"], case, str(case / "fleet"))


def test_cli_validate_valid_fleet(cli_runs: dict) -> None:
    run = cli_runs["valid"]
    assert run.returncode == 0, run.stderr
    assert "is valid" in run.stdout


# --- Valid fleets --------------------------------------------------------------------------------

@pytest.mark.parametrize("case", VALID, ids=[p.name for p in VALID])
def test_valid_fleet_loads(case: Path) -> None:
    fleet = load_fleet(case / "fleet")
    assert fleet.workers
    for spec in fleet.strategies.values():
        assert spec.strategy_path.is_file()
        assert spec.strategy_path.resolve().is_relative_to((case / "fleet").resolve())
    assert fleet.fleet_hash.startswith("sha256:")


def test_minimal_fleet_gets_every_default() -> None:
    fleet = load_fleet(DATA / "valid" / "minimal" / "fleet")
    assert fleet.files == ("worker.yaml",)
    assert list(fleet.strategies) == []
    assert fleet.settings == FleetSettings()       # no Fleet document: all defaults
    assert fleet.settings.source is None
    assert fleet.settings.policy == "load-based"
    assert fleet.settings.reconcile_interval_s == 5
    assert fleet.settings.probe_deadline_s == 5
    assert fleet.settings.monitor.lease_ttl_s == 25
    assert fleet.settings.lease_rule_problem() is None      # the defaults obey the lease rule
    assert fleet.settings.ssh.parallelism == 32
    assert fleet.settings.notify.command is None
    (worker,) = fleet.workers.values()
    assert worker.runner == ("node", "{runner}")
    assert (worker.port, worker.user, worker.workdir, worker.region, worker.proxy) == (None,) * 5
    assert worker.cordoned is False and worker.drain is False
    assert worker.is_local


def test_full_fleet() -> None:
    root = DATA / "valid" / "full" / "fleet"
    fleet = load_fleet(root)
    # Every *.yaml / *.yml, nested folders included; hidden folders and files skipped.
    assert sorted(fleet.files) == [
        "fleet.yaml", "strategies/strategies.yaml", "workers/asia/jp.yaml", "workers/eu.yml",
    ]
    assert set(fleet.workers) == {"jp-1", "jp-2", "eu-1", "eu-2"}
    assert set(fleet.strategies) == {"grid-btc-a", "grid-btc-b", "trend-eth", "calendar-sol"}

    settings = fleet.settings
    assert settings.policy == "round-robin"
    assert settings.reconcile_interval_s == 0.5            # fractional durations are fine
    assert settings.monitor.worker_offline_after_s == 15   # default inside a given section
    assert settings.probe_deadline_s == 0.5                # default: the interval, at most 5 s
    assert settings.notify.command == ("/usr/local/bin/page-oncall", "--quiet")
    assert settings.ssh.parallelism == 8
    assert settings.ssh.connect_timeout_s == 10
    assert settings.source is not None and settings.source.file == str(root / "fleet.yaml")

    a, b = fleet.strategies["grid-btc-a"], fleet.strategies["grid-btc-b"]
    assert a.requirements.account == b.requirements.account == "desk@bybit-main"
    assert a.params["symbol"] == b.params["symbol"] == "BTCUSDT"
    assert a.scheduling.share_account and b.scheduling.share_account
    assert a.heartbeat_ms == 60000                         # default
    assert a.scheduling.max_restarts == 5                  # default
    assert a.scheduling.restart_delay_ms == 10000
    assert a.desired_state == "running"
    assert a.name == "grid-btc-a"                          # name defaults to the id
    assert b.scheduling.max_restarts == 2
    assert b.source.file == str(root / "strategies" / "strategies.yaml")

    # A symlink that stays inside the fleet dir is followed; the spec keeps the path as written.
    trend = fleet.strategies["trend-eth"]
    assert trend.strategy_file == "strategies/current.mjs"
    assert trend.strategy_path == (root / "strategies" / "trend-v2.mjs").resolve()
    assert trend.file_sha256 == fleet.strategies["calendar-sol"].file_sha256
    assert trend.requirements.credentials is True
    assert trend.desired_state == "paused"

    jp1 = fleet.workers["jp-1"]
    assert jp1.supported_apis == frozenset({"bybit", "binance"})
    assert (jp1.region, jp1.proxy, jp1.port, jp1.user) == ("JP", "http://127.0.0.1:8890", 2222, "quant")
    assert fleet.workers["eu-2"].runner == ("deno", "run", "-A", "{runner}")
    assert fleet.workers["eu-2"].cordoned is True


def test_date_looking_params_stay_strings() -> None:
    fleet = load_fleet(DATA / "valid" / "dates-and-anchors" / "fleet")
    params = fleet.strategies["calendar-btc"].params
    assert params["start"] == "2024-01-15"
    assert params["rollAt"] == "2024-03-29 08:00:00"
    assert params["expiries"] == ["2024-06-28", "2024-09-27"]
    assert params["version"] == "1.10"


def test_anchors_and_merge_keys() -> None:
    fleet = load_fleet(DATA / "valid" / "dates-and-anchors" / "fleet")
    eth = fleet.strategies["calendar-eth"]
    assert eth.params["legs"] == [{"size": 1, "side": "buy"}, {"size": 1, "side": "sell"}]
    assert eth.requirements.region == "JP"
    assert eth.requirements.account == "desk@bybit-alt"   # an explicit key overrides the merge


def test_example_fleet_loads_with_defaults() -> None:
    fleet = load_fleet(REPO / "fleet")
    assert isinstance(fleet, Fleet)
    assert fleet.strategies and fleet.workers
    assert fleet.settings.source is not None
    assert fleet.settings.ssh.config == "~/.ssh/config"              # not written: default
    assert fleet.settings.ssh.known_hosts == "~/.ssh/known_hosts"
    for worker in fleet.workers.values():
        assert worker.runner == ("node", "{runner}")
        assert worker.workdir is None and not worker.cordoned
    for spec in fleet.strategies.values():
        assert spec.strategy_path.is_file()
        assert spec.desired_state == "running"
    eth = fleet.strategies["grid-eth-sub2"]                           # no scheduling section
    assert eth.scheduling.max_restarts == 5
    assert eth.scheduling.restart_delay_ms == 10000
    assert eth.scheduling.auto_restart is True
    assert eth.scheduling.share_account is False
    assert eth.requirements.credentials is False
