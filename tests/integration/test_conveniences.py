"""`quantlab init --systemd`, the pre-commit hook and shell completion."""
from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from harness import REPO, quantlab


def test_init_systemd_writes_a_unit_that_never_kills_the_supervisors(fleet):
    fleet.worker("w1").strategy("s1").write()
    made = quantlab("init", fleet.root, "--systemd", check=None)
    unit = fleet.root / "deploy" / "quantlab-reconcile.service"
    assert made.returncode == 0 and unit.exists(), made.describe()
    text = unit.read_text()
    assert "KillMode=process" in text and f"reconcile --fleet {fleet.root.resolve()}" in text
    assert "No cron line" in made.stdout and not (fleet.root / "deploy" / "quantlab-reconcile.cron").exists()
    if shutil.which("systemd-analyze"):
        checked = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
        problems = [line for line in checked.stderr.splitlines() if str(unit) in line or "quantlab" in line]
        assert not problems, checked.stderr


def test_init_systemd_writes_a_cron_line_only_when_the_lease_rule_allows_it(fleet):
    fleet.worker("w1").strategy("s1")
    fleet.settings["reconcile"]["cronPeriodSeconds"] = 60
    fleet.settings["monitor"]["leaseTtlSeconds"] = 200
    fleet.write()
    quantlab("init", fleet.root, "--systemd")
    cron = (fleet.root / "deploy" / "quantlab-reconcile.cron").read_text()
    assert cron.startswith("* * * * * cd ") and "reconcile --once" in cron
    fleet.settings["monitor"]["leaseTtlSeconds"] = 60        # two missed cron runs outlast this lease
    fleet.write()
    refused = quantlab("init", fleet.root, "--systemd", check=1)
    assert "leaseTtlSeconds 60 is shorter than the loop may be away" in refused.output


def test_the_pre_commit_hook_runs_validate():
    (hook,) = yaml.safe_load((REPO / ".pre-commit-hooks.yaml").read_text())
    assert hook["id"] == "quantlab-validate" and hook["entry"] == "quantlab validate"
    assert hook["pass_filenames"] is False and hook["language"] == "python"


@pytest.mark.parametrize("shell", ["bash", "zsh"])
def test_shell_completion_is_offered(shell):
    shown = quantlab("--show-completion", shell, check=None)
    assert shown.returncode == 0 and "quantlab" in shown.stdout, shown.describe()
