"""`quantlab apply` on `host: local` workers, end to end: real agents, supervisors and runners.

Each test writes its own small fleet in tmp_path; the `reaper` fixture kills whatever it started.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
import subprocess
import time
import zlib

import pytest

from harness import (
    alive,
    copy_example_fleet,
    proc_info,
    processes,
    quantlab,
    wait_for,
)

STRATEGY_KEYS = {"id", "status", "workerId", "startedAt", "errorCount", "lastError", "restarts", "revision"}
WORKER_KEYS = {"id", "status", "region", "runningStrategies", "cpu", "memory", "lastSeen"}


def test_example_fleet_applies_and_runs_healthy(node, reaper, tmp_path):
    fl = copy_example_fleet(tmp_path / "fleet")
    wanted = set(fl.strategies)
    assert len(wanted) == 5 and len(fl.workers) == 4
    # A fleet under git, as the spec expects: plans, placements and events carry the commit.
    (fl.root / ".gitignore").write_text(".quantlab/\n")
    git = ["git", "-C", str(fl.root), "-c", "user.name=t", "-c", "user.email=t@example.invalid",
           "-c", "commit.gpgsign=false"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "fleet"], check=True)
    commit = subprocess.run([*git, "rev-parse", "--short=12", "HEAD"], check=True, capture_output=True,
                            text=True).stdout.strip()

    # Without --yes and without a terminal, apply refuses before touching anything.
    refused = fl.ql("apply", check=1)
    assert "pass --yes" in refused.stderr, refused.describe()
    assert processes(fl.marker) == [], "apply without --yes started processes"
    assert not any(fl.instance_dirs(sid) for sid in wanted)

    done = fl.apply()
    assert "Apply complete: 5 done, 0 failed." in done.stdout, done.describe()

    # Every runner is a live node process of this fleet, and its heartbeat file advances.
    for sid in sorted(wanted):
        fl.beating(sid)
        info = proc_info(fl.runner_pid(sid))
        assert info is not None and info.state not in ("Z", "X")
        assert os.path.basename(info.argv[0]) == "node" and info.argv[1].endswith(".mjs"), info.argv
        assert info.environ()["QUANTLAB_STRATEGY_ID"] == sid
    assert fl.runner_counts() == {sid: 1 for sid in wanted}

    report = fl.status()
    assert {s["id"] for s in report["strategies"]} == wanted
    for s in report["strategies"]:
        assert STRATEGY_KEYS <= set(s), f"missing {STRATEGY_KEYS - set(s)} in {s}"
        assert s["status"] == "running" and s["healthy"] is True, s
        assert s["workerId"] in fl.workers
        assert isinstance(s["startedAt"], int) and s["startedAt"] > 1_600_000_000_000   # epoch ms
        assert s["errorCount"] == 0 and s["lastError"] is None and s["restarts"] == 0
        assert s["revision"] == commit, s
    assert {w["id"] for w in report["workers"]} == set(fl.workers)
    placed = {s["id"]: s["workerId"] for s in report["strategies"]}
    for w in report["workers"]:
        assert WORKER_KEYS <= set(w), f"missing {WORKER_KEYS - set(w)} in {w}"
        assert w["region"] == fl.workers[w["id"]]["metadata"]["region"]
        assert sorted(w["runningStrategies"]) == sorted(sid for sid, wid in placed.items() if wid == w["id"])
        assert w["status"] == ("busy" if w["runningStrategies"] else "idle")
        assert isinstance(w["cpu"], float) and isinstance(w["memory"], int) and isinstance(w["lastSeen"], int)
    # Placement honours the requirements: region, api and proxy.
    assert placed["trend-btc-eu"] == "worker-004"                       # the only EU worker
    assert placed["trend-eth-01"] == "worker-003"                       # the only US worker
    assert placed["grid-btc-sub1"] in ("worker-001", "worker-002")      # JP with the proxy

    # Converged: a second plan has nothing to do.
    again = fl.ql("plan", "--detailed-exitcode", check=0)
    assert "No changes." in again.stdout, again.describe()
    assert f"at {commit} (working tree, clean)" in again.stdout, again.describe()
    starts = [e for e in fl.events() if e.get("event") == "start" and e.get("outcome") == "ok"]
    assert sorted(e["strategy"] for e in starts) == sorted(wanted)
    assert {(e["revision"], e["dirty"]) for e in starts} == {(commit, False)}


def test_params_change_restarts_in_place_with_the_same_epoch(fleet):
    fleet.worker("w1").strategy("alpha", {"grid": 10}).strategy("beta", {"grid": 1}).write()
    fleet.apply()
    fleet.beating("alpha")
    fleet.beating("beta")
    before = fleet.placement("alpha")
    beta_pid = fleet.runner_pid("beta")
    alpha_pid = fleet.runner_pid("alpha")
    assert fleet.recorded("alpha", "params.json") == {"grid": 10}

    fleet.strategies["alpha"]["params"] = {"grid": 24}
    fleet.write()
    plan = fleet.plan()
    assert [(a["action"], a["strategy"], a["worker"]) for a in plan["actions"]] == [("restart", "alpha", "w1")]
    assert "params changed: grid 10 → 24" in plan["actions"][0]["reason"]

    fleet.apply()
    wait_for(lambda: fleet.recorded("alpha", "params.json") == {"grid": 24}, 10,
             what="the new params to reach alpha's runner")
    fleet.beating("alpha")
    after = fleet.placement("alpha")
    assert after["epoch"] == before["epoch"] and after["worker"] == before["worker"]
    assert fleet.recorded("alpha", "ctx.json")["epoch"] == before["epoch"]
    assert fleet.runner_pid("alpha") != alpha_pid and not alive(alpha_pid)
    assert len(fleet.lines("alpha", "exit.log")) == 1        # the old copy ran st_exit
    assert fleet.runner_pid("beta") == beta_pid               # the other strategy was not touched
    assert fleet.runner_counts() == {"alpha": 1, "beta": 1}
    fleet.ql("plan", "--detailed-exitcode", check=0)


def test_removed_strategy_stops_and_mass_stop_is_guarded(fleet):
    fleet.running("w1", ("s1", "s2", "s3", "s4"))

    # One of four removed: a plain stop, st_exit runs, the runner is gone.
    s4_pid = fleet.runner_pid("s4")
    del fleet.strategies["s4"]
    fleet.write()
    plan = fleet.plan()
    assert [(a["action"], a["strategy"]) for a in plan["actions"]] == [("stop", "s4")]
    assert plan["blocked"] == []
    fleet.apply()
    assert len(fleet.lines("s4", "exit.log")) == 1
    assert not alive(s4_pid)
    # The stop took the final checkpoint, after st_exit: what st_exit wrote is in the controller's copy.
    final = json.loads((fleet.root / ".quantlab" / "checkpoints" / "s4.json").read_text())
    assert zlib.decompress(base64.b64decode(final["files"]["exit.log"])).decode().count("\n") == 1
    # A checkpoint copy of a strategy gone from the fleet is kept a week (in case it comes back),
    # then the next run removes it and says so; the copies of strategies still wanted stay.
    copies = fleet.root / ".quantlab" / "checkpoints"
    copies.mkdir(exist_ok=True)
    for sid in ("s4", "s1"):
        (copies / f"{sid}.json").write_text('{"files": {}, "t": 0}')
    fleet.apply()                                            # the week starts: s4 found gone
    week_ago = time.time() - 7 * 86400 - 60
    os.utime(copies / "s4.gone", (week_ago, week_ago))
    fleet.apply()
    assert not (copies / "s4.json").exists() and (copies / "s1.json").exists()
    assert [e["strategy"] for e in fleet.events() if e["event"] == "checkpoint-removed"] == ["s4"]
    # Its output stays on the worker, and `logs` still shows it, saying that it is stopped.
    shown = fleet.ql("logs", "s4")
    assert "s4 is not running: its output on w1, up to its stop" in shown.stderr, shown.describe()
    assert "quantlab-supervisor: stopped:" in shown.stdout, shown.describe()
    assert fleet.host_status("s4")["state"] == "stopped"
    assert fleet.placement("s4") is None

    # All three that still run removed: refused as a whole, nothing stops.
    pids = {sid: fleet.runner_pid(sid) for sid in ("s1", "s2", "s3")}
    fleet.strategies.clear()
    fleet.write()
    plan = fleet.plan()
    assert plan["actions"] == []
    assert [b["guard"] for b in plan["blocked"]] == ["mass-stop"]
    assert sorted(a["strategy"] for a in plan["blocked"][0]["actions"]) == ["s1", "s2", "s3"]
    refused = fleet.apply(check=1)
    assert "mass-stop" in refused.stderr and "--allow-mass-stop" in refused.stderr, refused.describe()
    for sid, pid in pids.items():
        assert fleet.runner_pid(sid) == pid, f"{sid} was touched by a refused apply"
        assert fleet.lines(sid, "exit.log") == []

    # With --allow-mass-stop they all stop, each through st_exit.
    fleet.apply("--allow-mass-stop")
    for sid, pid in pids.items():
        assert not alive(pid)
        assert len(fleet.lines(sid, "exit.log")) == 1
    assert fleet.runner_counts() == {}
    assert fleet.state()["placements"] == {}


def test_refused_mass_stop_keeps_the_capacity_it_would_have_freed(fleet):
    fleet.worker("w1", max_strategies=3)
    for sid in ("s1", "s2", "s3"):
        fleet.strategy(sid)
    fleet.write()
    fleet.apply()
    # Two of three set to stopped (refused by the guard) while two new ones arrive: the new ones
    # must not take the slots of stops that are not going to happen.
    fleet.strategies["s1"]["desiredState"] = fleet.strategies["s2"]["desiredState"] = "stopped"
    fleet.strategy("n1").strategy("n2").write()
    plan = fleet.plan()
    assert [b["guard"] for b in plan["blocked"]] == ["mass-stop"]
    assert plan["actions"] == [], plan["actions"]
    assert sorted(q["strategy"] for q in plan["queued"]) == ["n1", "n2"]
    assert all("full" in q["reason"] for q in plan["queued"]), plan["queued"]
    fleet.apply(check=1)
    assert fleet.runner_counts() == {"s1": 1, "s2": 1, "s3": 1}

    fleet.apply("--allow-mass-stop")
    # A bound for a busy machine, not a timing claim: apply has carried both out when it returns.
    wait_for(lambda: fleet.runner_counts() == {"s3": 1, "n1": 1, "n2": 1}, 30,
             what=f"the stops, then the new strategies in the freed slots (runners: {fleet.runner_counts()})")
    assert {p["worker"] for s, p in fleet.state()["placements"].items() if s in ("n1", "n2")} == {"w1"}


def test_secrets_reach_the_runner_only_and_steer_placement(fleet):
    secret = "s3cr3t-" + hashlib.sha256(os.urandom(16)).hexdigest()[:24]
    # worker-a sorts first and would be chosen on a tie; only worker-b holds the account's secrets.
    fleet.worker("worker-a").worker("worker-b")
    fleet.strategy("keyed", {"envHash": ["API_KEY", "OTHER"], "symbol": "BTCUSDT"},
                   requirements={"account": "desk@paper-1", "credentials": True})
    fleet.strategy("nokey", {"symbol": "ETHUSDT"}, requirements={"account": "desk@paper-2", "credentials": True})
    fleet.write()
    secrets = fleet.workdir("worker-b") / "secrets"
    secrets.mkdir(parents=True)
    env_file = secrets / "desk@paper-1.env"
    env_file.write_text(f"# exchange keys\nexport API_KEY='{secret}'\nOTHER=plain\n")
    env_file.chmod(0o600)

    plan = fleet.plan()
    assert [(a["action"], a["strategy"], a["worker"]) for a in plan["actions"]] == [("start", "keyed", "worker-b")]
    assert [q["strategy"] for q in plan["queued"]] == ["nokey"]
    assert "no secrets/desk@paper-2.env" in plan["queued"][0]["reason"], plan["queued"]
    assert {r["reason"] for r in plan["queued"][0]["rejections"]} == {"credentials"}

    applied = fleet.apply()
    fleet.beating("keyed")
    digest = hashlib.sha256(secret.encode()).hexdigest()
    assert fleet.recorded("keyed", "env-hash.json") == {"API_KEY": digest,
                                                        "OTHER": hashlib.sha256(b"plain").hexdigest()}
    environ = proc_info(fleet.runner_pid("keyed")).environ()
    assert environ["API_KEY"] == secret

    # The value is nowhere but in the secrets file: not the state file, the events log, the agent's
    # files, the output log, nor anything the CLI prints.
    fleet.ql("logs", "keyed")
    printed = [applied.output, fleet.ql("status", "--output", "json").output, fleet.ql("status").output,
               fleet.ql("events", "--output", "json").output, fleet.ql("logs", "keyed").output,
               fleet.ql("plan", "--output", "json").output]
    for text in printed:
        assert secret not in text
    checked = 0
    for path in fleet.root.parent.rglob("*"):
        if path.is_file() and path != env_file:
            assert secret.encode() not in path.read_bytes(), f"the secret leaked into {path}"
            checked += 1
    assert fleet.state_path.exists() and (fleet.idir("keyed") / "output.log").exists() and checked > 10
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600


def test_hostile_params_reach_the_runner_verbatim(fleet, tmp_path):
    pwned = tmp_path / "pwned"
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep").write_text("still here")
    params = {
        "subst": f"$(touch {pwned})",
        "backticks": f"`touch {pwned}`",
        "quotes": "it's \"quoted\" \\ 'twice'",
        "semicolon": f"x; rm -rf {victim}; touch {pwned}",
        "newlines": f"line one\nline two\n\ttouch {pwned}\r\n",
        "dollar": "$HOME ${PATH} $((1+1)) %s %n {runner}",
        "glob": "* ? [a-z] ~root",
        "unicode": "日本語 ✓ \u202e",
        "nested": {"list": ["-rf", "--", f"|touch {pwned}", "&&", ">", "/dev/null"], "n": 1.5, "t": True,
                   "none": None},
    }
    fleet.worker("w1").strategy("hostile", params).write()
    fleet.apply()
    fleet.beating("hostile", beats=1)
    assert fleet.recorded("hostile", "params.json") == params
    assert json.loads(fleet.recorded("hostile", "ctx.json")["env"]["QUANTLAB_PARAMS"]) == params
    # Through every other command that touches the strategy, too.
    fleet.ql("status")
    fleet.ql("plan", "--detailed-exitcode")
    fleet.ql("logs", "hostile")
    assert not pwned.exists(), "a param was run by a shell"
    assert (victim / "keep").read_text() == "still here"


@pytest.mark.slow
def test_logs_init_and_filtered_events(fleet, tmp_path):
    token = "tok-" + hashlib.sha256(os.urandom(8)).hexdigest()[:12]
    fleet.worker("w1").strategy("talker", {"token": token}).strategy("quiet").write()
    fleet.apply()
    fleet.beating("talker", beats=1)
    fleet.beating("quiet", beats=1)

    logs = fleet.ql("logs", "talker")
    assert f"probe talker started, epoch {fleet.placement('talker')['epoch']}, token {token}" in logs.stdout
    assert token not in fleet.ql("logs", "quiet").stdout
    missing = fleet.ql("logs", "nobody", check=1)
    assert "unknown strategy nobody" in missing.stderr

    # An event from two hours ago (as an older run would have left it), then the filters.
    old = {"t": int(time.time() * 1000) - 2 * 3600 * 1000, "event": "start", "strategy": "talker",
           "worker": "w1", "actor": "someone@elsewhere apply", "outcome": "ok"}
    with open(fleet.root / ".quantlab" / "events.jsonl", "a") as handle:
        handle.write(json.dumps(old) + "\n")
    everything = fleet.events()
    assert {e.get("strategy") for e in everything} >= {"talker", "quiet"}
    talker = fleet.events("--strategy", "talker")
    assert talker and all(e["strategy"] == "talker" for e in talker)
    assert old in talker
    recent = fleet.events("--since", "1h", "--strategy", "talker")
    assert recent and all(e["strategy"] == "talker" for e in recent)
    assert old not in recent
    assert any(e["event"] == "start" and e.get("outcome") == "ok" for e in recent)
    assert fleet.events("--since", "1h", "--strategy", "nobody") == []
    assert "No events." in fleet.ql("events", "--strategy", "nobody").stdout
    assert fleet.ql("events", "--since", "yesterday-ish", check=1).returncode == 1

    # init writes a fleet that validates (and refuses to overwrite one).
    created = tmp_path / "new-fleet"
    quantlab("init", created)
    assert "is valid" in quantlab("validate", "--fleet", created).stdout
    again = quantlab("init", created, check=1)
    assert again.stderr.strip()


def test_requirements_change_moves_stopping_the_old_copy_first(fleet):
    fleet.worker("w-jp", region="JP").worker("w-us", region="US")
    fleet.strategy("mover", {"exitDelayMs": 500}, requirements={"region": "JP"}).write()
    fleet.apply()
    fleet.beating("mover")
    old_pid, old_epoch = fleet.runner_pid("mover"), fleet.placement("mover")["epoch"]
    old_dir = fleet.idir("mover")

    fleet.strategies["mover"]["requirements"]["region"] = "US"
    fleet.write()
    plan = fleet.plan()
    assert [(a["action"], a["strategy"], a["from"], a["to"]) for a in plan["actions"]] == \
        [("move", "mover", "w-jp", "w-us")]
    fleet.apply()
    placed = fleet.placement("mover")
    assert placed["worker"] == "w-us" and placed["epoch"] > old_epoch
    fleet.beating("mover")
    new_dir = fleet.idir("mover")
    assert new_dir != old_dir and not alive(old_pid)
    # The old copy ran st_exit (500 ms) and was confirmed stopped before the new one started.
    old_status = json.loads((old_dir / "status.json").read_text())
    new_status = fleet.host_status("mover")
    assert old_status["state"] == "stopped" and old_status["reason"] == "moving to w-us", old_status
    assert (old_dir / "state" / "exit.log").read_text().count("\n") == 1
    assert old_status["stoppedAt"] <= new_status["startedAt"], (old_status, new_status)
    assert fleet.recorded("mover", "ctx.json")["epoch"] == placed["epoch"]
    assert fleet.runner_counts() == {"mover": 1}


def test_move_carries_the_checkpoint_to_the_new_worker(fleet):
    fleet.worker("w-jp", region="JP").worker("w-us", region="US")
    fleet.strategy("mover", requirements={"region": "JP"}).write()
    fleet.apply()
    beats = fleet.beating("mover", beats=3)["beats"]
    fleet.strategies["mover"]["requirements"]["region"] = "US"
    fleet.write()
    fleet.apply()
    assert fleet.placement("mover")["worker"] == "w-us"
    fleet.beating("mover", beats=1)
    # ctx.state.beats counts every beat of the strategy across restarts and moves.
    state_file = fleet.idir("mover") / "state" / "state.json"
    wait_for(lambda: json.loads(state_file.read_text())["beats"] > beats, 10, what="a checkpoint past the moved one")


def test_saved_plan_applies_once_and_is_refused_when_stale(fleet, tmp_path):
    fleet.worker("w1").strategy("a").strategy("b").write()
    saved = tmp_path / "plan.json"
    shown = fleet.ql("plan", "--out", saved)
    assert f"quantlab apply {saved}" in shown.stdout
    assert json.loads(saved.read_text())["stateSerial"] == 0

    # The fleet changes after the plan was saved: refused, nothing started.
    fleet.strategy("c").write()
    stale = fleet.ql("apply", saved, "--yes", check=1)
    assert "saved plan is stale" in stale.stderr and "fleet files changed" in stale.stderr, stale.describe()
    assert fleet.runner_counts() == {}

    fleet.ql("plan", "--out", saved)
    fleet.ql("apply", saved, "--yes")
    fleet.beating("c", beats=1)
    assert fleet.runner_counts() == {"a": 1, "b": 1, "c": 1}
    # Applied once, the state moved on: applying the same file again is refused.
    again = fleet.ql("apply", saved, "--yes", check=1)
    assert "the state changed since" in again.stderr, again.describe()
    # A --target nothing knows is an error naming it, not an empty plan that looks converged.
    for command in (("plan",), ("apply", "--yes")):
        typo = fleet.ql(*command, "--target", "c", "--target", "cc", check=1)
        assert "--target cc: no strategy or worker" in typo.stderr, typo.describe()

    # A saved plan that a guard holds back can be applied with the guard lifted, and only that way.
    fleet.strategies.clear()
    fleet.write()
    fleet.ql("plan", "--out", saved)
    assert [b["guard"] for b in json.loads(saved.read_text())["blocked"]] == ["mass-stop"]
    refused = fleet.ql("apply", saved, "--yes", "--target", "a", check=1)
    assert "cannot change a saved one" in refused.stderr
    fleet.ql("apply", saved, "--yes", "--allow-mass-stop")
    wait_for(lambda: fleet.runner_counts() == {}, 10, what="every runner to stop")


def test_status_warns_when_the_state_folder_could_be_committed(fleet):
    fleet.worker("w1").strategy("s1").write()
    fleet.apply()
    subprocess.run(["git", "init", "-q", str(fleet.root)], check=True, timeout=30)
    warned = fleet.ql("status")
    assert "is not ignored by git" in warned.stderr and "`.quantlab/`" in warned.stderr, warned.describe()
    (fleet.root / ".gitignore").write_text(".quantlab/\n")
    quiet = fleet.ql("status")
    assert "not ignored by git" not in quiet.stderr, quiet.describe()


def test_suspend_holds_changes_while_leases_renew_and_resume_lifts_it(fleet):
    fleet.running("w1", ("s1", "s2", "s3"))
    s3_pid = fleet.runner_pid("s3")

    unknown = fleet.ql("suspend", "--target", "nope", check=1)
    assert "--target nope: no strategy or worker" in unknown.stderr, unknown.describe()
    fleet.ql("suspend", "--target", "s3", "--reason", "exchange maintenance")
    del fleet.strategies["s3"]
    fleet.write()

    # Held, on purpose: apply does nothing to s3, says so, and does not fail; its lease is renewed.
    lease = fleet.read_json("s3", "lease.json")
    held = fleet.ql("apply", "--yes")
    assert "Held, 1 action(s):" in held.stderr and "s3 suspended by" in held.stderr, held.describe()
    assert "exchange maintenance" in held.stderr
    assert fleet.runner_pid("s3") == s3_pid
    assert fleet.read_json("s3", "lease.json")["deadline"] > lease["deadline"]
    plan = fleet.plan()
    assert [b["guard"] for b in plan["blocked"]] == ["suspended"] and plan["actions"] == []
    status = json.loads(fleet.ql("status", "--output", "json").stdout)
    assert status["suspended"]["s3"]["reason"] == "exchange maintenance"
    assert "Suspended: s3 by" in fleet.ql("status").stdout

    lifted = fleet.ql("resume")
    assert "Resumed s3" in lifted.stdout, lifted.describe()
    fleet.apply()
    assert fleet.runner_pid("s3") is None
    events = [(e["event"], e.get("strategy")) for e in fleet.events() if e["event"] in ("suspended", "resumed")]
    assert events == [("suspended", "s3"), ("resumed", "s3")]


def test_stop_all_stops_everything_at_once_renews_nothing_and_resume_brings_it_back(fleet):
    fleet.running("w1", ("s1", "s2", "s3"))

    refused = fleet.ql("stop-all", check=1)
    assert "pass --yes" in refused.stderr and fleet.runner_counts() == {"s1": 1, "s2": 1, "s3": 1}

    # Every copy stops with st_exit although that is all of them (no mass-stop guard here).
    braked = fleet.ql("stop-all", "--yes", "--reason", "exchange incident")
    assert "Stopped 3 of 3" in braked.stdout, braked.describe()
    assert fleet.runner_counts() == {}
    for sid in ("s1", "s2", "s3"):
        assert len(fleet.lines(sid, "exit.log")) == 1, sid
    # Nothing comes back while it holds: a plan holds nothing to start either (everything suspended).
    plan = fleet.plan()
    assert plan["actions"] == [] and [b["guard"] for b in plan["blocked"]] == ["suspended"]
    assert "exchange incident" in plan["blocked"][0]["reason"]
    fleet.apply()
    assert fleet.runner_counts() == {}
    assert json.loads(fleet.ql("status", "--output", "json").stdout)["suspended"]["*"]["stopAll"] is True
    fleet.ql("suspend", "--reason", "still looking")      # another suspend keeps renewing nothing
    assert json.loads(fleet.ql("status", "--output", "json").stdout)["suspended"]["*"]["stopAll"] is True
    banner = fleet.ql("status").stdout
    assert "Stopped by stop-all" in banner and "no lease is renewed" in banner, banner
    assert "leases are renewed" not in banner, "status says leases are renewed while stop-all renews none"

    fleet.ql("resume")
    fleet.apply()
    for sid in ("s1", "s2", "s3"):
        fleet.beating(sid, beats=1)
    assert fleet.runner_counts() == {"s1": 1, "s2": 1, "s3": 1}


def test_explain_names_every_filter_and_what_would_change_it(fleet):
    fleet.worker("w-jp", region="JP").worker("w-us", region="US")
    fleet.strategy("us-only", requirements={"region": "US"}).strategy("eu-only", requirements={"region": "EU"})
    fleet.write()
    report = json.loads(fleet.ql("explain", "eu-only", "--output", "json").stdout)
    assert report["outcome"].startswith("queued: no worker fits"), report
    assert {w["worker"]: [r["filter"] for r in w["refusedBy"]] for w in report["workers"]} == \
        {"w-jp": ["region"], "w-us": ["region"]}
    assert report["workers"][0]["wouldFitIf"] == [
        "the worker's metadata.region is EU (or the strategy drops requirements.region)"]
    text = fleet.ql("explain", "us-only").stdout
    assert "start on w-us" in text and "fits    w-us" in text and "refused w-jp" in text, text
    missing = fleet.ql("explain", "nope", check=1)
    assert "nope is not a strategy of" in missing.stderr
