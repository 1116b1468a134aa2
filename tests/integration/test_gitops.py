"""The reconcile loop follows commits, not the working tree (real git: a bare origin and clones).

The fleet lives in `clone/fleet/` of a clone of `origin.git`; `quantlab reconcile --once` runs on it
as cron would. Each test checks what runs (the runner processes, the placements) and what the loop
said, after editing, committing, rebasing, pushing and force-pushing with the real git CLI.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from harness import FleetDir, alive, wait_for

GIT_ENV = {**os.environ, "GIT_AUTHOR_NAME": "ops", "GIT_AUTHOR_EMAIL": "ops@example.invalid",
           "GIT_COMMITTER_NAME": "ops", "GIT_COMMITTER_EMAIL": "ops@example.invalid",
           "GIT_CONFIG_GLOBAL": "/dev/null", "GIT_CONFIG_NOSYSTEM": "1"}


# A second strategy, as a teammate adds it to strategies.yaml
STRATEGY_S2 = ("---\napiVersion: quantlab/v1\nkind: Strategy\nid: s2\nstrategyFile: strategies/probe.mjs\n"
               "heartbeatMs: 300\nrequirements: {api: paper}\n"
               "scheduling: {restartDelay: 100, stopTimeoutSeconds: 2, initTimeoutSeconds: 5}\n")


def git(cwd: Path, *args: str, check: bool = True) -> str:
    done = subprocess.run(["git", *args], cwd=cwd, env=GIT_ENV, capture_output=True, text=True, timeout=30)
    if check:
        assert done.returncode == 0, f"git {' '.join(args)}: {done.stderr}"
    return done.stdout.strip()


def commit(repo: Path, message: str) -> str:
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "--short=12", "HEAD")


@pytest.fixture
def origin(tmp_path) -> Path:
    path = tmp_path / "origin.git"
    git(tmp_path, "init", "-q", "--bare", "-b", "main", str(path))
    return path


@pytest.fixture
def gitfleet(node, reaper, tmp_path, origin, request) -> FleetDir:
    """A FleetDir in clone/fleet/ of a clone of origin, with one worker and strategy s1, committed
    and pushed. The state folder is ignored by git, as the README asks."""
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(origin), str(clone))
    interval = request.node.get_closest_marker("interval")
    fl = FleetDir(clone / "fleet", **({"interval": interval.args[0]} if interval else {}))
    fl.worker("w1", max_strategies=8).strategy("s1", {"v": 1}).write()
    (clone / ".gitignore").write_text(".quantlab/\n")
    commit(clone, "fleet with s1")
    git(clone, "push", "-q", "-u", "origin", "main")
    fl.clone = clone          # type: ignore[attr-defined]
    yield fl


def once(fl: FleetDir, *args: str, check: int | None = 0):
    return fl.ql("reconcile", "--once", *args, check=check)


def test_the_loop_applies_commits_and_never_an_uncommitted_edit(gitfleet):
    fl, clone = gitfleet, gitfleet.clone
    first = git(clone, "rev-parse", "--short=12", "HEAD")
    once(fl)
    fl.beating("s1", beats=1)
    placed = fl.placement("s1")
    assert placed["revision"] == first
    pid = fl.runner_pid("s1")

    # An edit to the strategy's JavaScript and to its params, saved but not committed.
    js = fl.root / "strategies" / "probe.mjs"
    js.write_text(js.read_text() + "\n// half-written change\n")
    fl.strategies["s1"]["params"] = {"v": 2}
    fl.write()
    run = once(fl)
    assert "uncommitted changes the loop does not apply" in run.output, run.output
    assert "strategies/probe.mjs" in run.output and "strategies.yaml" in run.output, run.output
    assert fl.runner_pid("s1") == pid, "an uncommitted edit went live"
    assert fl.placement("s1")["specHash"] == placed["specHash"]
    assert "uncommitted changes" not in once(fl).output, "the notice is said once per change, not every run"

    # plan and apply act on the working tree, and say so.
    plan = fl.plan()
    assert plan["fleetDirty"] is True and [a["action"] for a in plan["actions"]] == ["restart"]
    assert "(working tree, uncommitted changes)" in fl.ql("plan").output

    # Committed, the change goes live, and the restart records the revision it came from.
    second = commit(clone, "s1: v2")
    once(fl)
    fl.beating("s1", beats=1)
    assert fl.runner_pid("s1") != pid
    assert fl.placement("s1")["revision"] == second
    restarts = [e for e in fl.events() if e.get("event") == "restart" and e.get("strategy") == "s1"]
    assert restarts and restarts[-1]["revision"] == second and restarts[-1]["dirty"] is False
    loop = fl.status()["loop"]
    assert loop["kind"] == "commits" and loop["ref"] == "refs/heads/main" and loop["revision"] == second
    assert f"last synced revision {second}" in fl.ql("status").output


def test_apply_of_uncommitted_changes_is_refused_while_a_loop_applies_commits(gitfleet):
    fl = gitfleet
    once(fl)
    once(fl)                                        # this one renews s1's lease: a loop runs
    fl.strategy("s2").write()                       # not committed
    refused = fl.apply(check=1)
    assert "uncommitted changes" in refused.output and "quantlab suspend" in refused.output, refused.output
    assert fl.placement("s2") is None
    # Suspended, the loop leaves s2 alone: a person may start it by hand from the working tree.
    fl.ql("suspend", "--target", "s2", "--reason", "trying s2 by hand")
    assert fl.placement("s2") is None and fl.apply().returncode == 0
    assert fl.placement("s2") is None, "a plain apply honours the suspension"
    fl.apply("--target", "s2")
    assert fl.placement("s2") is not None
    once(fl)
    assert fl.placement("s2") is not None, "the loop left the suspended s2 alone"

    # A clean tree at a commit the loop has not applied yet (a new local commit): the loop applies it.
    fl.strategy("s3").write()
    ahead = commit(gitfleet.clone, "s2 and s3")
    refused = fl.apply(check=1)
    assert f"is at {ahead}, not at" in refused.output, refused.output
    once(fl)
    assert fl.placement("s3")["revision"] == ahead


def test_a_change_of_source_stops_nothing_until_confirmed(gitfleet):
    fl = gitfleet
    # Run from the working tree (as before this release): s2 exists only in an uncommitted file.
    fl.strategy("s2").write()
    once(fl, "--working-tree")
    fl.beating("s2", beats=1)
    assert fl.state()["loopSource"]["kind"] == "working-tree"

    # The loop now reads commits, where s2 does not exist: its stop waits for a person.
    held = once(fl, check=1)
    assert "source-change" in held.output and "s2" in held.output and "--allow-source-change" in held.output, held.output
    assert fl.runner_pid("s2") is not None, "a strategy defined only in uncommitted files was stopped"
    assert once(fl, check=1).output.count("source-change") >= 1, "the guard holds until confirmed"
    assert fl.state()["loopSource"]["kind"] == "working-tree"

    once(fl, "--allow-source-change")
    assert fl.placement("s2") is None
    assert fl.state()["loopSource"]["kind"] == "commits"
    once(fl)                                         # confirmed once: the next runs need nothing


def test_the_loop_pauses_while_a_rebase_is_in_progress(gitfleet):
    fl, clone = gitfleet, gitfleet.clone
    once(fl)
    fl.beating("s1", beats=1)
    pid, spec_hash = fl.runner_pid("s1"), fl.placement("s1")["specHash"]
    # A rebase that stops on a conflict: the branch's commits are being rewritten.
    notes = clone / "notes.txt"
    notes.write_text("base\n")
    commit(clone, "notes")
    git(clone, "checkout", "-q", "-b", "topic")
    notes.write_text("topic\n")
    commit(clone, "topic notes")
    git(clone, "checkout", "-q", "main")
    notes.write_text("main\n")
    fl.strategies["s1"]["params"] = {"v": 3}
    fl.write()
    commit(clone, "main notes and s1 v3")
    git(clone, "checkout", "-q", "topic")
    git(clone, "rebase", "main", check=False)
    assert (clone / ".git" / "rebase-merge").exists() or (clone / ".git" / "rebase-apply").exists()
    before = fl.state()["loopRenewal"]

    run = once(fl, check=1)                          # nothing was reconciled: cron's wrapper hears of it
    assert "a rebase is in progress" in run.output and "renews leases" in run.output, run.output
    assert fl.runner_pid("s1") == pid and fl.placement("s1")["specHash"] == spec_hash, "main's s1 v3 went live"
    assert fl.state()["loopRenewal"] != before, "leases are renewed while paused"

    git(clone, "rebase", "--abort")
    git(clone, "checkout", "-q", "main")
    once(fl)
    fl.beating("s1", beats=1)
    assert fl.runner_pid("s1") != pid, "after the rebase, main's commit (s1 v3) is applied"


def test_git_pull_follows_the_upstream_fast_forward_only(gitfleet, tmp_path, origin):
    fl, clone = gitfleet, gitfleet.clone
    head, remote_ref = git(clone, "rev-parse", "HEAD"), git(clone, "rev-parse", "origin/main")
    # A teammate pushes s2 from their clone.
    mate = tmp_path / "mate"
    git(tmp_path, "clone", "-q", str(origin), str(mate))
    (mate / "fleet" / "strategies.yaml").write_text((fl.root / "strategies.yaml").read_text() + STRATEGY_S2)
    pushed = commit(mate, "add s2")
    git(mate, "push", "-q", "origin", "main")

    run = once(fl, "--git-pull")
    assert fl.placement("s2") is not None and fl.placement("s2")["revision"] == pushed, run.output
    assert fl.status()["loop"] == {**fl.status()["loop"], "kind": "upstream", "ref": "origin/main", "revision": pushed}
    # The operator's clone is untouched: no new commit checked out, no remote-tracking ref moved.
    assert git(clone, "rev-parse", "HEAD") == head and git(clone, "rev-parse", "origin/main") == remote_ref
    assert not (clone / "fleet" / "strategies.yaml").read_text().count("id: s2")

    # The teammate rewrites history: s2 gone, another commit in its place, force-pushed.
    git(mate, "reset", "-q", "--hard", "HEAD~1")
    (mate / "fleet" / "other.txt").write_text("rewritten\n")
    commit(mate, "rewritten")
    git(mate, "push", "-q", "-f", "origin", "main")
    refused = once(fl, "--git-pull", check=1)
    assert "refused" in refused.output and "diverged" in refused.output, refused.output
    assert fl.placement("s2") is not None, "a rewritten history changed what runs"
    notices = [e for e in fl.events() if e.get("kind") == "git-pull-refused"]
    assert len(notices) == 1
    once(fl, "--git-pull", check=1)
    assert len([e for e in fl.events() if e.get("kind") == "git-pull-refused"]) == 1, "told once"


def test_the_daemon_pulls_on_its_own_job(gitfleet, tmp_path, origin):
    fl, clone = gitfleet, gitfleet.clone
    log = tmp_path / "daemon.log"
    fl.spawn("reconcile", "--git-pull", "--git-pull-interval", "1", log=log)
    wait_for(lambda: fl.placement("s1"), 20, what="s1 placed from the pulled commit")
    mate = tmp_path / "mate"
    git(tmp_path, "clone", "-q", str(origin), str(mate))
    (mate / "fleet" / "strategies.yaml").write_text((mate / "fleet" / "strategies.yaml").read_text() + STRATEGY_S2)
    pushed = commit(mate, "add s2")
    git(mate, "push", "-q", "origin", "main")
    placed = wait_for(lambda: fl.placement("s2"), 20, what="s2 started from the pushed commit")
    assert placed["revision"] == pushed
    assert "applying the commits of origin/main (pulled)" in log.read_text()
    assert not (clone / "fleet" / "strategies.yaml").read_text().count("id: s2"), "the work tree was touched"


def test_a_broken_commit_changes_nothing_alerts_once_and_status_still_works(gitfleet):
    fl, clone = gitfleet, gitfleet.clone
    once(fl)
    fl.beating("s1", beats=1)
    pid = fl.runner_pid("s1")
    (fl.root / "strategies.yaml").write_text((fl.root / "strategies.yaml").read_text().replace("heartbeatMs", "heartbeatMz"))
    commit(clone, "typo")
    run = once(fl, check=1)
    assert "does not validate" in run.output and "heartbeatMz" in run.output, run.output
    once(fl, check=1)
    alerts = [e for e in fl.events() if e.get("kind") == "fleet-invalid"]
    assert len(alerts) == 1, alerts
    assert fl.runner_pid("s1") == pid

    # status, events and logs work from the state file and the hosts, under a banner.
    status = fl.ql("status", "--output", "json")
    report = status.json()
    assert [s["id"] for s in report["strategies"]] == ["s1"] and report["strategies"][0]["status"] == "running"
    assert any("heartbeatMz" in p for p in report["problems"])
    text = fl.ql("status")
    assert "does not validate" in text.output and "s1" in text.output
    assert fl.ql("events").output
    assert "does not validate" in fl.ql("logs", "s1").output
    plan = fl.ql("plan", check=1)
    assert "Reconciling is frozen" in plan.output

    git(clone, "revert", "--no-edit", "HEAD")
    once(fl)
    resolved = [e for e in fl.events() if e.get("kind") == "resolved" and e.get("alert") == "fleet-invalid"]
    assert len(resolved) == 1
    assert alive(pid)


# A probe deadline of 2 s (the interval's): the test reads the plan of a host that answers, and a busy
# machine can take longer than half a second to start the local agent.
@pytest.mark.interval(2.0)
def test_plan_says_what_a_pulling_loop_applies_and_that_apply_would_be_refused(gitfleet, tmp_path, origin):
    fl, clone = gitfleet, gitfleet.clone
    mate = tmp_path / "mate"
    git(tmp_path, "clone", "-q", str(origin), str(mate))
    (mate / "fleet" / "strategies.yaml").write_text((fl.root / "strategies.yaml").read_text() + STRATEGY_S2)
    pushed = commit(mate, "add s2")
    git(mate, "push", "-q", "origin", "main")
    once(fl, "--git-pull")                            # the loop now applies the teammate's commit
    once(fl, "--git-pull")                            # and renews its leases (cron's next run)

    # The operator's clone is behind: its plan would stop s2, which the loop just started.
    shown = fl.ql("plan")
    assert f"the loop applies origin/main at {pushed}" in shown.stdout, shown.describe()
    assert "apply would refuse this plan" in shown.stderr and "git pull" in shown.stderr, shown.describe()
    assert "Commit" not in shown.stderr, "a clean clone that is behind is told to commit"
    refused = fl.ql("apply", "--yes", check=1)
    assert "git pull" in refused.output and fl.placement("s2") is not None, refused.describe()
    git(clone, "pull", "-q")
    assert "apply would refuse" not in fl.ql("plan").stderr


def test_a_change_no_worker_can_take_is_said_in_the_log_status_and_a_notification(gitfleet):
    fl, clone = gitfleet, gitfleet.clone
    once(fl)
    fl.beating("s1", beats=1)
    pid = fl.runner_pid("s1")
    # New code together with a region no worker is in: nothing can deploy it.
    js = fl.root / "strategies" / "probe.mjs"
    js.write_text(js.read_text() + "\n// v2\n")
    fl.strategies["s1"]["requirements"]["region"] = "XX"
    fl.write()
    commit(clone, "s1 v2 for region XX")
    run = once(fl)
    assert "note: s1 on w1" in run.output and "1 note" in run.output, run.output
    notices = [e for e in fl.events() if e.get("kind") == "not-deployed"]
    assert len(notices) == 1 and "s1" in notices[0]["message"] and "previous version" in notices[0]["message"]
    once(fl)
    assert len([e for e in fl.events() if e.get("kind") == "not-deployed"]) == 1, "told once"
    assert fl.runner_pid("s1") == pid
    s1 = fl.strategy_status("s1")
    assert s1["upToDate"] is False and "no longer fits" in (s1.get("note") or ""), s1
