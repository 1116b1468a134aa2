"""Paths as people type them: `--fleet fleet`, `--fleet .`, the default `./fleet`, `--state` and `--out`
relative to the current directory, in a git work tree (where the loop reads commits through git,
which runs in another folder) and outside one. Each run must start the strategy, not read an empty
fleet."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from harness import FleetDir, quantlab, wait_for
from test_gitops import commit, git


def _gitfleet(tmp_path: Path, where: str) -> tuple[FleetDir, Path]:
    """A fleet in `clone/<where>` of a git repository, with one worker and strategy s1, committed."""
    clone = tmp_path / "clone"
    clone.mkdir()
    git(clone, "init", "-q", "-b", "main")
    fl = FleetDir(clone / where)
    fl.worker("w1", max_strategies=8).strategy("s1", {"v": 1}).write()
    (clone / ".gitignore").write_text(".quantlab/\n")
    commit(clone, "fleet with s1")
    return fl, clone


@pytest.mark.parametrize("where, cwd, args", [
    ("fleet", ".", ("--fleet", "fleet")),                # the README's Quick start
    ("fleet", ".", ()),                                  # the default ./fleet
    ("fleet", "fleet", ("--fleet", ".")),                # from inside the fleet directory
    ("ops/fleet", "ops", ("--fleet", "fleet", "--state", "../run/state.json")),   # a sub-folder, state elsewhere
])
def test_reconcile_once_with_relative_paths_in_git_starts_the_fleet(node, reaper, tmp_path, where, cwd, args):
    fl, clone = _gitfleet(tmp_path, where)
    run = quantlab("reconcile", "--once", *args, cwd=clone / cwd)
    assert "no *.yaml" not in run.output and "start s1" in run.output, run.describe()
    state = Path(os.path.normpath(clone / cwd / args[-1])) if "--state" in args else fl.state_path
    placed = json.loads(state.read_text())["placements"]["s1"]
    assert placed["revision"] == git(clone, "rev-parse", "--short=12", "HEAD")
    fl.beating("s1", beats=1)
    # The checkout of the commit is kept where the state lives, never inside git's scratch folders.
    assert list((state.parent / "revisions").iterdir()), "no checkout under the state folder"
    quantlab("status", *args, cwd=clone / cwd)


def test_plan_out_and_apply_of_a_relative_plan_file_outside_git(node, reaper, tmp_path):
    fl = FleetDir(tmp_path / "fleet")
    fl.worker("w1").strategy("s1").write()
    saved = quantlab("plan", "--fleet", "fleet", "--out", "plans/next.json", cwd=tmp_path)
    assert "quantlab apply plans/next.json" in saved.output, saved.describe()
    assert json.loads((tmp_path / "plans" / "next.json").read_text())["actions"][0]["strategy"] == "s1"
    quantlab("apply", "plans/next.json", "--fleet", "fleet", "--yes", cwd=tmp_path)
    wait_for(lambda: fl.runner_pid("s1"), 10, what="s1 started from the saved plan")


def test_a_pulled_commit_that_does_not_validate_fails_the_round(node, reaper, tmp_path):
    """`reconcile --once --git-pull` under cron: a broken commit upstream exits 1, and nothing is
    planned from the commit before it either (as the daemon does)."""
    origin = tmp_path / "origin.git"
    git(tmp_path, "init", "-q", "--bare", "-b", "main", str(origin))
    fl, clone = _gitfleet(tmp_path, "fleet")
    git(clone, "remote", "add", "origin", str(origin))
    git(clone, "push", "-q", "-u", "origin", "main")
    quantlab("reconcile", "--once", "--git-pull", "--fleet", "fleet", cwd=clone)
    fl.beating("s1", beats=1)
    pid = fl.runner_pid("s1")

    mate = tmp_path / "mate"
    git(tmp_path, "clone", "-q", str(origin), str(mate))
    yaml_file = mate / "fleet" / "strategies.yaml"
    yaml_file.write_text(yaml_file.read_text().replace("heartbeatMs", "heartbeatMz"))
    commit(mate, "typo")
    git(mate, "push", "-q", "origin", "main")
    run = quantlab("reconcile", "--once", "--git-pull", "--fleet", "fleet", cwd=clone, check=1)
    assert "does not validate" in run.output and "heartbeatMz" in run.output, run.describe()
    assert fl.runner_pid("s1") == pid, "the broken commit changed what runs"


def test_serve_reads_a_relative_token_file_and_fleet(node, reaper, tmp_path):
    import http.client
    import subprocess
    import sys

    from tests.support import cli_env, free_port

    fl = FleetDir(tmp_path / "fleet")
    fl.worker("w1").strategy("s1").write()
    quantlab("apply", "--fleet", "fleet", "--yes", cwd=tmp_path)
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "page-token").write_text("a-token-of-twenty-chars\n")
    port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "quantlab", "serve", "--fleet", "fleet", "--listen",
                                 f"127.0.0.1:{port}", "--token-file", "secrets/page-token"], cwd=tmp_path,
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=cli_env(),
                                start_new_session=True)
    fl.daemons.append(proc)
    wait_for(lambda: "Serving the fleet page" in log.read_text() or proc.poll() is not None, 20, what="serve")
    assert proc.poll() is None, log.read_text()

    def status(token: str | None) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/api/status", headers={"Authorization": f"Bearer {token}"} if token else {})
        code = conn.getresponse().status
        conn.close()
        return code
    assert status(None) == 401 and status("a-token-of-twenty-chars") == 200
    fl.stop_daemons()
