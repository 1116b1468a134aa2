"""`quantlab validate` names every problem of a fleet in one run, as a person would run it: schema
errors and cross-references together (the lease rule, a missing strategy file, a repeated id, an
account or workdir used twice), also those of documents that have schema errors, each as
FILE:LINE: message, in words (no regexes), exit 1. Fixing what it said brings up nothing new.

The fleet is tests/data/invalid/mistakes-of-every-kind-in-one-file, copied so that the test may edit
it; each case runs `python -m quantlab` in a subprocess with a deadline.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import cli_env

REPO = Path(__file__).resolve().parents[2]
CASE = REPO / "tests" / "data" / "invalid" / "mistakes-of-every-kind-in-one-file"
DEADLINE = 30.0

# (line, what the message says there) in fleet.yaml, in report order
SCHEMA_ERRORS = [
    (5, "Fleet: policy: 'random' is not one of round-robin, load-based"),
    (9, "Fleet: monitor.autoRecover: expected boolean, got string 'sometimes'"),
    (10, "Fleet: ssh.parallelism: 0 is too small (must be at least 1)"),
    (14, "Worker Worker_1: id: 'Worker_1' must be lowercase letters, digits and '-', starting with a letter or "
         "digit, at most 63 characters"),
    (16, "Worker Worker_1: capabilities.maxStrategies: -1 is too small (must be at least 0)"),
    (17, "Worker Worker_1: unknown field 'labels'"),
    (32, "Worker w3: cordoned: expected boolean, got string 'maybe'"),
    (47, "Strategy s2: heartbeatMs: expected integer, got string 'fast'"),
    (54, "Strategy s1: desiredState: 'sleeping' is not one of running, paused, stopped"),
]
CROSS_REFERENCES = [
    (8, "Fleet: monitor.leaseTtlSeconds 40 is shorter than the loop may be away"),
    (31, "Worker w3: workdir /srv/quantlab/shared/ on host local is also used by worker w2"),
    (44, "Strategy s2: strategyFile 'strategies/missing.js' not found"),
    (45, "Strategy s2: account acc1 already trades BTCUSDT in strategy s1"),
    (51, "duplicate Strategy id 's1': also defined at {fleet}/fleet.yaml:36"),
]

# The schema errors fixed in place (line numbers stay), the cross-references left as they are.
FIXES = [
    ("policy: random", "policy: round-robin"),
    ("autoRecover: sometimes", "autoRecover: true"),
    ("ssh: {parallelism: 0}", "ssh: {parallelism: 4}"),
    ("id: Worker_1", "id: worker-1"),
    ("maxStrategies: -1", "maxStrategies: 1"),
    ("labels: {team: eu}", "drain: false"),
    ("cordoned: maybe", "cordoned: true"),
    ("heartbeatMs: fast", "heartbeatMs: 5000"),
    ("desiredState: sleeping", "desiredState: paused"),
]


def validate(fleet: Path, cwd: Path) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([sys.executable, "-m", "quantlab", "validate", "--fleet", str(fleet)],
                              cwd=cwd, env={**cli_env(), "PYTHONPATH": str(REPO), "NO_COLOR": "1"},
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=DEADLINE)
    except subprocess.TimeoutExpired:
        pytest.fail(f"quantlab validate --fleet {fleet} did not finish within {DEADLINE:g} s")


def reported(run: subprocess.CompletedProcess, fleet: str) -> list[str]:
    """The problem lines of a failed run, after checking how it failed."""
    assert run.returncode == 1, f"exit {run.returncode}\n{run.stdout}\n{run.stderr}"
    assert "Traceback" not in run.stderr, run.stderr
    lines = [line for line in run.stderr.splitlines() if line.startswith(fleet + "/")]
    assert len(lines) == len(set(lines)), f"a problem is printed twice:\n{run.stderr}"
    return lines


def assert_says(lines: list[str], expected: list[tuple[int, str]], fleet: str) -> None:
    head = f"{fleet}/fleet.yaml:"
    assert [int(line[len(head):].split(":")[0]) for line in lines] == [n for n, _ in expected], "\n".join(lines)
    for line, (number, words) in zip(lines, expected):
        assert line.startswith(f"{head}{number}: ") and words.replace("{fleet}", fleet) in line, line


@pytest.fixture
def fleet(tmp_path: Path) -> Path:
    copy = tmp_path / "fleet"
    shutil.copytree(CASE / "fleet", copy)
    return copy


def test_one_run_names_every_problem(fleet: Path, tmp_path: Path) -> None:
    run = validate(Path("fleet"), cwd=tmp_path)               # relative, as typed in the fleet's folder
    lines = reported(run, "fleet")
    assert_says(lines, sorted(SCHEMA_ERRORS + CROSS_REFERENCES), "fleet")
    assert f"{len(lines)} problems" in run.stderr and len(lines) == 14
    for line in lines:                                        # said in words, never as a regex
        assert "^[" not in line and "{0," not in line, line


def test_fixing_what_it_said_brings_up_nothing_new(fleet: Path, tmp_path: Path) -> None:
    text = (fleet / "fleet.yaml").read_text()
    for old, new in FIXES:
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    (fleet / "fleet.yaml").write_text(text)
    lines = reported(validate(fleet, cwd=tmp_path), str(fleet))
    assert_says(lines, CROSS_REFERENCES, str(fleet))
