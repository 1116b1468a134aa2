"""Checkpoints travel in their own call each round, and only changed folders come back.

Real runners on a `local` worker write ctx.state each beat; `reconcile --once` copies checkpoints
after its renewals. The controller's copy is checked against what the runner had written before
the run began, and an unchanged folder is neither sent nor written again.
"""
from __future__ import annotations

import base64
import json
import zlib

from harness import wait_for


def copy_of(fleet, sid: str) -> dict:
    return json.loads((fleet.root / ".quantlab" / "checkpoints" / f"{sid}.json").read_text())


def beats_in(copy: dict) -> int:
    return int(json.loads(zlib.decompress(base64.b64decode(copy["files"]["state.json"])))["beats"])


def test_each_round_brings_the_copy_up_to_date(fleet):
    fleet.running("w1", ["s1"])
    for _ in range(3):
        # ctx.state is saved in the background after the beat that the heartbeat file already shows.
        before = wait_for(lambda: (fleet.recorded("s1", "state.json") or {}).get("beats"), 10,
                          what="s1's saved ctx.state to count a beat")
        fleet.ql("reconcile", "--once")
        # Never older than the run that copied it: at least what the runner had written before.
        assert beats_in(copy_of(fleet, "s1")) >= before
        fleet.beating("s1", beats=1)


def test_an_unchanged_folder_is_not_sent_or_written_again(fleet):
    fleet.worker("w1")
    fleet.strategy("quiet", desired="paused")       # st_init runs, no heartbeat changes ctx.state
    fleet.write()
    fleet.apply()
    wait_for(lambda: fleet.recorded("quiet", "ctx.json"), 10, what="quiet's st_init")
    fleet.ql("reconcile", "--once")
    path = fleet.root / ".quantlab" / "checkpoints" / "quiet.json"
    first = wait_for(lambda: path.exists() and path.stat(), 5, what="the first copy")
    copied_at = fleet.state()["checkpoints"]["quiet"]
    fleet.ql("reconcile", "--once")
    again = path.stat()
    assert (again.st_ino, again.st_mtime_ns) == (first.st_ino, first.st_mtime_ns), "an unchanged copy was rewritten"
    assert fleet.state()["checkpoints"]["quiet"] == copied_at, "the state records when the copy last changed"
    assert copy_of(fleet, "quiet")["hash"].startswith("sha256:")


def test_removing_a_reachable_worker_moves_its_strategies_with_their_final_checkpoint(fleet):
    fleet.running("w1", ["s1"])
    fleet.worker("w2").write()
    fleet.apply()
    old = fleet.idir("s1")
    del fleet.workers["w1"]
    fleet.write()
    plan = fleet.plan()
    assert [(a["action"], a["cause"]) for a in plan["actions"]] == [("move", "worker-leaving")], plan
    fleet.apply()
    assert fleet.placement("s1")["worker"] == "w2"
    fleet.beating("s1", beats=1)
    # The old copy stopped (not fenced) and its last state is the controller's copy: nothing lost.
    final = json.loads((old / "state" / "state.json").read_text())["beats"]
    assert json.loads((old / "status.json").read_text())["state"] == "stopped"
    assert beats_in(copy_of(fleet, "s1")) == final
    moves = [e for e in fleet.events() if e.get("event") == "move" and e.get("strategy") == "s1"]
    assert moves[-1]["from"] == "w1" and moves[-1]["cause"] == "worker-leaving" and moves[-1]["outcome"] == "ok"
    # Once it has left, the removed worker is gone from status too.
    assert [w["id"] for w in fleet.status()["workers"]] == ["w2"]


def test_a_strategy_removed_and_put_back_continues_from_its_final_checkpoint(fleet):
    """Its copy is kept "in case it comes back": the start that brings it back restores it, as a
    move would (a trading strategy's state holds its positions)."""
    fleet.running("w1", ["s1", "s2"])
    wait_for(lambda: (fleet.recorded("s1", "state.json") or {}).get("beats", 0) >= 30, 30,
             what="30 beats of s1, more than a new copy could count in the time it takes to look")
    old = fleet.idir("s1")
    spec = fleet.strategies.pop("s1")
    fleet.write()
    fleet.apply()
    wait_for(lambda: json.loads((old / "status.json").read_text())["state"] == "stopped", 10,
             what="the stopped copy's status")
    final = json.loads((old / "state" / "state.json").read_text())["beats"]
    fleet.strategies["s1"] = spec
    fleet.workers["w1"]["cordoned"] = True          # it comes back on another worker
    fleet.worker("w2").write()
    fleet.apply()
    assert fleet.placement("s1")["worker"] == "w2"
    # The new copy's folder holds the final checkpoint from its start, and its beats count on from there
    # (ctx.state is saved in the background after each beat: polled).
    assert (fleet.recorded("s1", "state.json") or {}).get("beats", 0) >= final, "started without its checkpoint"
    wait_for(lambda: (fleet.recorded("s1", "state.json") or {}).get("beats", 0) > final, 15,
             what="the new copy to count on from its restored state")


def test_a_copy_started_again_where_its_lease_ran_out_keeps_what_it_did_in_the_dark(fleet):
    """A host cut off for longer than the lease, back before a failover: the copy there stopped
    itself, and the start in its place finds its own folder, newer than the controller's copy
    (which is as old as the last round that heard the host). Nothing it counted is lost."""
    # The lease is long enough for a loaded machine's reconcile run to renew it before it ends, and
    # short enough to run out soon after: the copy then beats on "in the dark" until it stops.
    fleet.short_lease(8.0).worker("w1").strategy("s1").write()
    fleet.apply()
    fleet.beating("s1", beats=1)
    fleet.ql("reconcile", "--once")                   # the controller's copy, and the last renewal
    copied = beats_in(copy_of(fleet, "s1"))
    wait_for(lambda: (fleet.recorded("s1", "state.json") or {}).get("beats", 0) > copied + 3, 8,
             what="the copy on the host to beat past the controller's copy")
    stopped = wait_for(lambda: (s := fleet.host_status("s1")) and s["state"] == "stopped" and s, 15,
                       what="s1 to stop when its lease ran out (no loop renews it)")
    assert stopped["reason"].startswith("lease expired"), stopped
    final = fleet.recorded("s1", "state.json")["beats"]
    assert final > copied + 3, "the copy did not beat past the controller's copy"
    fleet.ql("reconcile", "--once")
    assert fleet.placement("s1")["worker"] == "w1"
    assert (fleet.recorded("s1", "state.json") or {}).get("beats", 0) >= final, "the host's folder was replaced"
