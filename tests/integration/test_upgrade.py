"""An in-place upgrade from the previous release, end to end on `host: local` workers.

Fleets upgrade in place: the supervisors the previous release started keep running under the new
controller and agent, and an upgrade alone never restarts or fences a strategy. This test starts a
fleet with the previous release's own code (extracted from the repository's history), then hands it
to the release in this tree and checks, while the new reconcile loop runs for longer than a lease:

- the same runner and supervisor processes run (nothing restarted), and no instance logs anything
  but its original start (no `lease-expired`, `stopped`, `restart` ...);
- the new agent renews the old supervisors' leases: lease.json keeps the old format, its deadline
  keeps moving forward and never lapses, and the heartbeats keep coming;
- `status` shows every strategy running and healthy, `plan` has nothing to do, and the state file
  was migrated to the new format with the same placements and epochs;
- no command of the new release refuses anything or prints a traceback on the old state.

Then a deliberate change (one strategy's params), applied while the new loop runs, restarts only that
strategy, once, under the new release's keeper + supervisor pair and runner, while the two others keep
their old supervisors, agent and runner.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from harness import FleetDir, Proc, Result, alive, hold_for, processes, wait_for
from quantlab.edges.hosts import AGENT_PATH, RUNNER_PATH
from tests.support import cli_env

PREVIOUS_RELEASE = "cbd8d1f"
REPO = Path(__file__).resolve().parents[2]
NEW_AGENT = os.path.basename(AGENT_PATH)      # agent-<content hash>.pyz

# Settings both releases accept: the previous release's schema refuses the new Fleet fields
# (reconcile.probeDeadlineSeconds, monitor.controllerRestartSeconds ...), so those keep their new
# defaults (probe deadline 0.5 s at this interval, a controller restart of 10 s), and the lease obeys
# the new lease rule with them: at least (10 + 0.5 + 1) / 0.95 = 12.2 s.
INTERVAL_S = 0.5
LEASE_TTL_S = 15.0
HEARTBEAT_MS = 500          # the supervisor restarts a runner silent for 3 x this: give a busy machine room
STRATEGIES = ("alpha", "beta", "gamma")
CHANGED = "alpha"           # the one whose params change after the upgrade
# What an instance may log in its events.log: only its start. Anything else (lease-expired, stopped,
# restart, error, instance-problem) means the upgrade disturbed it.
QUIET_EVENTS = {"start"}
# Events (the controller's or copied from the hosts) that must not appear for a strategy the upgrade
# alone touched.
DISTURBING_EVENTS = {"lease-expired", "stopped", "stop", "restart", "move", "error", "strategy-error"}


# --- the previous release ----------------------------------------------------------------------------

def history_problem() -> str | None:
    """Why the previous release cannot be taken from this repository's history, or None."""
    if shutil.which("git") is None:
        return "git is not installed"
    found = subprocess.run(["git", "-C", str(REPO), "cat-file", "-e", f"{PREVIOUS_RELEASE}^{{commit}}"],
                           capture_output=True, text=True)
    if found.returncode != 0:
        return (f"commit {PREVIOUS_RELEASE} (the previous release) is not in {REPO}'s history "
                f"(a shallow clone? fetch with --unshallow): {found.stderr.strip()}")
    return None


@pytest.fixture
def previous_release(tmp_path) -> Path:
    """The previous release's package and schemas, extracted into tmp_path/previous. Its
    schemas.py finds the schemas in the folder above the package, as in a source checkout."""
    problem = history_problem()
    if problem is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{problem}; CI=true, so this is a failure, not a skip")
        pytest.skip(problem)
    root = tmp_path / "previous"
    root.mkdir()
    archive = subprocess.Popen(["git", "-C", str(REPO), "archive", PREVIOUS_RELEASE,
                                "quantlab", "schemas", "pyproject.toml"], stdout=subprocess.PIPE)
    subprocess.run(["tar", "-x", "-C", str(root)], stdin=archive.stdout, check=True)
    archive.stdout.close()
    assert archive.wait() == 0, "git archive failed"
    assert (root / "schemas" / "fleet.schema.json").is_file() and (root / "quantlab" / "host" / "agent.py").is_file()
    return root


def old_quantlab(release: Path, *args: Any, check: int | None = 0, timeout: float = 60.0) -> Result:
    """`python -m quantlab ARGS` of the previous release (its code first on the path, run from its folder)."""
    argv = [sys.executable, "-m", "quantlab", *map(str, args)]
    env = {**cli_env(), "PYTHONPATH": str(release)}
    started = time.monotonic()
    done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=release)
    result = Result(argv, done.returncode, done.stdout, done.stderr, time.monotonic() - started)
    if check is not None:
        assert result.returncode == check, f"expected exit {check} (previous release)\n{result.describe()}"
    return result


# --- what the new release says ----------------------------------------------------------------------

def assert_accepted(output: str, what: str) -> None:
    """The new release took the old fleet as it is: no traceback, no refusal, no state complaint."""
    for bad in (r"Traceback", r"refus", r"state format", r"malformed state", r"left untouched"):
        assert not re.search(bad, output, re.IGNORECASE), f"{what} printed {bad!r}:\n{output}"


def new_ql(fleet: FleetDir, command: str, *args: Any, check: int | None = 0) -> Result:
    result = fleet.ql(command, *args, check=check)
    assert_accepted(result.output, f"quantlab {command}")
    return result


# --- what runs on the "hosts" ------------------------------------------------------------------------

def boottime() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def supervise_processes(fleet: FleetDir, sid: str) -> list[Proc]:
    """The `supervise` processes of one instance: one for the previous release's supervisor, two (the
    keeper and the supervisor proper, in the keeper's process group) for the new one's."""
    idir = str(fleet.idir(sid))
    return [p for p in processes(fleet.marker) if "supervise" in p.argv and idir in p.argv]


def kept_agents(fleet: FleetDir) -> list[int]:
    """The kept agents of the new release (`agent-<hash>.pyz serve`; their children name themselves
    ql-COMMAND, so they are told apart by their name)."""
    out = []
    for p in processes(fleet.marker):
        if p.argv[-1:] == ("serve",) and any(part.endswith(NEW_AGENT) for part in p.argv):
            try:
                if not Path(f"/proc/{p.pid}/comm").read_text().startswith("ql-"):
                    out.append(p.pid)
            except OSError:
                continue
    return out


def supervisor_agent(fleet: FleetDir, sid: str) -> set[str]:
    """The names of the agent files the instance's supervise processes run (agent-<content hash>.py
    of the previous release, .pyz since the agent is a zip application)."""
    return {os.path.basename(arg) for p in supervise_processes(fleet, sid) for arg in p.argv
            if arg.endswith((".py", ".pyz"))}


def runner_file(fleet: FleetDir, sid: str) -> str:
    """The runner the instance was started with (agent/runner-<content hash>.mjs)."""
    return fleet.read_json(sid, "spec.json")["runnerFile"]


def supervisor_log(fleet: FleetDir, sid: str) -> str:
    return (fleet.idir(sid) / "supervisor.log").read_text(errors="replace")


def instance_events(fleet: FleetDir, sid: str) -> list[str]:
    return [e.get("event") for e in fleet.host_events(sid)]


def snapshot(fleet: FleetDir, sid: str) -> dict[str, Any]:
    """What must not change across the upgrade: the processes, the placement and its epoch."""
    placed = fleet.placement(sid)
    return {"runner": fleet.runner_pid(sid), "supervisor": fleet.supervisor_pid(sid),
            "worker": placed["worker"], "epoch": placed["epoch"], "specHash": placed["specHash"]}


def lease(fleet: FleetDir, sid: str) -> dict[str, Any]:
    found = fleet.read_json(sid, "lease.json")
    assert found is not None, f"{sid} has no readable lease.json"
    return found


def disturbance(fleet: FleetDir, before: dict[str, dict[str, Any]], sids=STRATEGIES) -> str | None:
    """What shows that a strategy in `sids` was disturbed, or None while each runs the processes it
    ran before the upgrade, its lease (still its epoch's) has not lapsed, and its instance logged
    nothing but its start."""
    for sid in sids:
        was = before[sid]
        if not (alive(was["runner"]) and fleet.runner_pid(sid) == was["runner"]):
            return f"{sid}: runner {was['runner']} no longer runs (now {fleet.runner_pid(sid)})"
        if not (alive(was["supervisor"]) and fleet.supervisor_pid(sid) == was["supervisor"]):
            return f"{sid}: supervisor {was['supervisor']} no longer runs (now {fleet.supervisor_pid(sid)})"
        events = instance_events(fleet, sid)
        if set(events) - QUIET_EVENTS:
            return f"{sid}: its instance logged {events}"
        current = fleet.read_json(sid, "lease.json")
        if current is None or current.get("epoch") != was["epoch"] or current.get("deadline", 0) <= boottime():
            return f"{sid}: lease {current} lapsed or is not epoch {was['epoch']}'s (boottime {boottime():.3f})"
    return None


def undisturbed(fleet: FleetDir, before: dict[str, dict[str, Any]], sids=STRATEGIES) -> bool:
    problem = disturbance(fleet, before, sids)
    assert problem is None, problem
    return True


def assert_running_healthy(fleet: FleetDir, sids=STRATEGIES) -> None:
    report = {s["id"]: s for s in new_ql(fleet, "status", "--output", "json").json()["strategies"]}
    for sid in sids:
        assert report[sid]["status"] == "running" and report[sid]["healthy"] is True, report[sid]


def assert_nothing_to_do(fleet: FleetDir) -> None:
    planned = new_ql(fleet, "plan", "--detailed-exitcode", check=None)
    assert planned.returncode == 0, f"the new plan wants changes after the upgrade\n{planned.describe()}"


# --- the test -----------------------------------------------------------------------------------------

def fleet_both_releases_accept(fleet: FleetDir) -> FleetDir:
    fleet.settings = {
        "apiVersion": "quantlab/v1", "kind": "Fleet", "policy": "load-based",
        "reconcile": {"intervalSeconds": INTERVAL_S},
        "monitor": {"workerOfflineAfterSeconds": 30, "leaseTtlSeconds": LEASE_TTL_S, "autoRecover": True},
        "ssh": {"commandTimeoutSeconds": 30},
    }
    fleet.worker("w1", max_strategies=2).worker("w2", max_strategies=2)
    for sid in STRATEGIES:
        fleet.strategy(sid, {"token": "before"}, heartbeat_ms=HEARTBEAT_MS)
    return fleet.write()


@pytest.mark.slow
def test_running_fleet_upgrades_in_place(fleet, previous_release, tmp_path):
    fleet_both_releases_accept(fleet)
    old_quantlab(previous_release, "validate", "--fleet", fleet.root)
    new_ql(fleet, "validate")

    # --- the previous release starts the fleet -------------------------------------------------------
    old_quantlab(previous_release, "apply", "--yes", "--fleet", fleet.root)
    for sid in STRATEGIES:
        fleet.beating(sid)
    assert fleet.state()["version"] == 1, "the previous release writes state format 1"
    old_agents = {sid: supervisor_agent(fleet, sid) for sid in STRATEGIES}
    for sid, agent in old_agents.items():
        assert len(supervise_processes(fleet, sid)) == 1, f"{sid}: the previous release runs one supervisor process"
        assert len(agent) == 1 and NEW_AGENT not in agent, f"{sid} does not run the previous release's agent: {agent}"
    old_runners = {sid: runner_file(fleet, sid) for sid in STRATEGIES}
    before = {sid: snapshot(fleet, sid) for sid in STRATEGIES}
    assert all(before[sid]["runner"] and before[sid]["supervisor"] for sid in STRATEGIES), before
    undisturbed(fleet, before)

    # --- one pass of the new release on the old state -----------------------------------------------
    once = new_ql(fleet, "reconcile", "--once")
    problem = disturbance(fleet, before)
    assert problem is None, f"{problem}\n{once.describe()}"
    assert (fleet.workdir("w1") / AGENT_PATH).is_file() or (fleet.workdir("w2") / AGENT_PATH).is_file(), \
        "the new agent was not shipped beside the old one"
    state = fleet.state()
    assert state["version"] == 2 and state.get("clockBoot"), f"state not migrated: {json.dumps(state)[:500]}"
    assert {sid: (p["worker"], p["epoch"], p["specHash"]) for sid, p in state["placements"].items()} == \
        {sid: (b["worker"], b["epoch"], b["specHash"]) for sid, b in before.items()}
    renewed_once = {sid: lease(fleet, sid) for sid in STRATEGIES}
    for sid in STRATEGIES:
        # The fields the previous release's supervisor reads are all there (it drops the others: the
        # renewal's proof and not-after, which only a supervisor given a key at start checks).
        assert {"epoch", "deadline", "expiresAt"} <= set(renewed_once[sid]), renewed_once[sid]
    assert_running_healthy(fleet)
    assert_nothing_to_do(fleet)

    # --- the new reconcile loop, for longer than a lease ----------------------------------------------
    daemon_log = tmp_path / "reconcile.log"
    daemon = fleet.spawn("reconcile", log=daemon_log)
    beats_before = {sid: fleet.heartbeat(sid)["beats"] for sid in STRATEGIES}
    hold_for(1.25 * LEASE_TTL_S, lambda: daemon.poll() is None and undisturbed(fleet, before),
             "the old supervisors running undisturbed under the new reconcile loop", interval=0.2)
    # The previous release made a call of its own for everything; the new loop asks through kept
    # agents (`serve`, of the new agent), which keep answering round after round.
    served = kept_agents(fleet)
    assert served, "the new loop does not ask the hosts through a kept agent"
    hold_for(2.0, lambda: set(served) <= set(kept_agents(fleet)), "the same kept agents across rounds")
    for sid in STRATEGIES:
        renewed = lease(fleet, sid)
        assert renewed["epoch"] == before[sid]["epoch"], (sid, renewed)
        # Renewed all along: a lease left alone would have lapsed a TTL after the pass above.
        assert renewed["deadline"] > renewed_once[sid]["deadline"] + LEASE_TTL_S, (sid, renewed_once[sid], renewed)
        assert renewed["expiresAt"] > renewed_once[sid]["expiresAt"] + LEASE_TTL_S * 1000, (sid, renewed)
        beat = fleet.beating(sid)
        assert beat["beats"] > beats_before[sid] + LEASE_TTL_S * 1000 / HEARTBEAT_MS, (sid, beats_before, beat)
    assert_running_healthy(fleet)
    assert_nothing_to_do(fleet)
    state = fleet.state()
    assert {sid: (p["worker"], p["epoch"]) for sid, p in state["placements"].items()} == \
        {sid: (b["worker"], b["epoch"]) for sid, b in before.items()}

    assert_accepted(daemon_log.read_text(), "quantlab reconcile")
    undisturbed(fleet, before)
    recorded = new_ql(fleet, "events", "--output", "json").json()
    disturbing = [e for e in recorded if e.get("strategy") in STRATEGIES and e["event"] in DISTURBING_EVENTS]
    assert not disturbing, disturbing

    # --- a deliberate change restarts only that strategy, under a new-style supervisor ----------------
    # Applied while the loop runs (it may roll the change out itself: either way only one restart).
    fleet.strategies[CHANGED]["params"] = {"token": "after"}
    fleet.write()
    applied = new_ql(fleet, "apply", "--yes", "--lock-timeout", 20)
    unchanged = [sid for sid in STRATEGIES if sid != CHANGED]
    wait_for(lambda: (p := fleet.recorded(CHANGED, "params.json")) and p.get("token") == "after", 15,
             what=f"{CHANGED} to run with its new params")
    fleet.beating(CHANGED)
    restarted = snapshot(fleet, CHANGED)
    assert restarted["runner"] != before[CHANGED]["runner"] and not alive(before[CHANGED]["runner"]), applied.describe()
    assert not alive(before[CHANGED]["supervisor"]), "the old supervisor of the changed strategy still runs"
    assert (restarted["worker"], restarted["epoch"]) == (before[CHANGED]["worker"], before[CHANGED]["epoch"])
    assert instance_events(fleet, CHANGED) == ["start", "stopped", "start"], fleet.host_events(CHANGED)
    pair = supervise_processes(fleet, CHANGED)
    assert len(pair) == 2 and {p.pgid for p in pair} == {restarted["supervisor"]}, \
        f"{CHANGED}: not a keeper + supervisor pair: {[(p.pid, p.pgid, p.cmdline) for p in pair]}"
    assert supervisor_agent(fleet, CHANGED) == {NEW_AGENT}
    assert runner_file(fleet, CHANGED) == RUNNER_PATH
    for sid in unchanged:
        assert len(supervise_processes(fleet, sid)) == 1 and supervisor_agent(fleet, sid) == old_agents[sid], sid
        assert runner_file(fleet, sid) == old_runners[sid] != RUNNER_PATH, sid
        assert supervisor_log(fleet, sid) == "", f"{sid}'s old supervisor complained:\n{supervisor_log(fleet, sid)}"
    undisturbed(fleet, before, unchanged)
    assert_running_healthy(fleet)
    assert_nothing_to_do(fleet)
    assert daemon.poll() is None, daemon_log.read_text()
    assert_accepted(daemon_log.read_text(), "quantlab reconcile")


def test_what_the_previous_release_s_agent_answers_the_controller_understands(previous_release, tmp_path):
    """The answers of the previous release's agent, recorded live (its own file, its own request
    shape, a real supervisor): every result it gives is one the current controller's decoder accepts
    for that command, so a host still running the old agent is never taken to have done what it
    did not (protocol.answer_problem)."""
    from tests.support import kill_all

    from quantlab.host.agent.qlagent.protocol import answer_problem

    old_agent = previous_release / "quantlab" / "host" / "agent.py"
    workdir = tmp_path / "old-host"
    workdir.mkdir()
    (workdir / "s.js").write_text("// never run: the runner below is /bin/sleep\n")
    start = {"workdir": str(workdir), "strategy": "s1", "worker": "w1", "epoch": 3, "specHash": "sha256:aa",
             "file": "s.js", "runner": ["/bin/sleep", "60"], "runnerFile": "r.mjs", "params": {},
             "scheduling": {"stopTimeoutSeconds": 2}, "leaseTtlSeconds": 0, "heartbeatMs": 60_000}
    same = {"workdir": str(workdir), "strategy": "s1", "epoch": 3}

    def ask(command: str, request: dict[str, Any]) -> dict[str, Any]:
        done = subprocess.run([sys.executable, "-I", "-S", str(old_agent), command], input=json.dumps(request),
                              capture_output=True, text=True, timeout=30)
        assert done.stdout, f"{command}: no answer (exit {done.returncode}): {done.stderr}"
        return json.loads(done.stdout)

    try:
        recorded = [
            ("stop", ask("stop", same)),                                      # nothing there yet
            ("pause", ask("pause", same)),
            ("start", ask("start", {**start, "file": "gone.js"})),            # its file is missing
            ("start", ask("start", start)),
            ("start", ask("start", start)),                                   # the same copy again
            ("pause", ask("pause", same)),
            ("resume", ask("resume", same)),
            ("stop", ask("stop", {**same, "epoch": 2})),                      # an older copy's stop
            ("stop", ask("stop", {**same, "stopTimeoutSeconds": 2})),
        ]
    finally:
        kill_all(str(workdir))
    results = [(command, answer["result"]) for command, answer in recorded]
    assert results == [("stop", "not-running"), ("pause", "not-running"), ("start", "missing"),
                       ("start", "started"), ("start", "already-running"), ("pause", "paused"),
                       ("resume", "running"), ("stop", "epoch-mismatch"), ("stop", "stopped")], results
    for command, answer in recorded:
        assert answer_problem(command, answer) is None, (command, answer)
