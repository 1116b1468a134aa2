"""`quantlab init --systemd`, the pre-commit hook and shell completion."""
from __future__ import annotations

import shutil
import subprocess

import yaml

from harness import PYTHON, REPO, quantlab
from tests.support import cli_env


def test_init_systemd_writes_a_unit_that_never_kills_the_supervisors(fleet):
    fleet.worker("w1").strategy("s1").write()
    # The fleet is in git, as the README asks: what init writes must not become fleet content.
    subprocess.run(["git", "init", "-q", str(fleet.root)], check=True, timeout=30)
    (fleet.root / ".gitignore").write_text(".quantlab/\n")
    made = quantlab("init", fleet.root, "--systemd", check=None)
    unit = fleet.root / ".quantlab" / "deploy" / "quantlab-reconcile.service"
    assert made.returncode == 0 and unit.exists(), made.describe()
    text = unit.read_text()
    assert "KillMode=process" in text and f"reconcile --fleet {fleet.root.resolve()}" in text
    assert "No cron line" in made.stdout and "cron line" not in made.stdout.split("No cron line", 1)[1], \
        "a cron line is offered after saying there is none"
    assert not (unit.parent / "quantlab-reconcile.cron").exists() and not (fleet.root / "deploy").exists()
    untracked = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=fleet.root,
                               capture_output=True, text=True, timeout=30).stdout
    assert ".quantlab" not in untracked and "deploy" not in untracked, untracked
    if shutil.which("systemd-analyze"):
        checked = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
        problems = [line for line in checked.stderr.splitlines() if str(unit) in line or "quantlab" in line]
        assert not problems, checked.stderr


def test_init_systemd_writes_a_cron_line_only_when_the_lease_rule_allows_it(fleet, tmp_path):
    fleet.worker("w1").strategy("s1")
    fleet.settings["reconcile"]["cronPeriodSeconds"] = 60
    fleet.settings["monitor"]["leaseTtlSeconds"] = 200
    fleet.write()
    made = quantlab("init", "fleet", "--systemd", "--state", "run/state.json", cwd=tmp_path)
    deploy = tmp_path / "run" / "deploy"                # beside the state the loop uses
    cron = (deploy / "quantlab-reconcile.cron").read_text()
    assert cron.startswith("* * * * * cd ") and "reconcile --once" in cron
    assert f"--state {tmp_path / 'run' / 'state.json'}" in cron, "the cron run uses another state"
    assert f"QUANTLAB_STATE={tmp_path / 'run' / 'state.json'}" in (deploy / "quantlab-reconcile.service").read_text()
    assert "never both" in made.stdout
    fleet.settings["monitor"]["leaseTtlSeconds"] = 60        # two missed cron runs outlast this lease
    fleet.write()
    refused = quantlab("init", fleet.root, "--systemd", check=1)
    assert "leaseTtlSeconds 60 is shorter than the loop may be away" in refused.output


def test_the_pre_commit_hook_runs_validate():
    (hook,) = yaml.safe_load((REPO / ".pre-commit-hooks.yaml").read_text())
    assert hook["id"] == "quantlab-validate" and hook["entry"] == "quantlab validate"
    assert hook["pass_filenames"] is False and hook["language"] == "python"


def test_shell_completion_is_offered_to_the_shell_it_runs_in():
    """`--show-completion` takes no value: it writes the script for the shell it was started from
    (found among its parent processes), so it is typed in bash here. `; exit` keeps bash from
    replacing itself with the command, as it does for a lone `bash -c CMD`."""
    shown = subprocess.run(["bash", "-c", f"{PYTHON} -m quantlab --show-completion; exit $?"], cwd=REPO,
                           capture_output=True, text=True, timeout=60, env=cli_env(), stdin=subprocess.DEVNULL)
    assert shown.returncode == 0 and "complete " in shown.stdout and "quantlab" in shown.stdout, (
        shown.stdout + shown.stderr)
