"""`apply` on a PostgreSQL state: while a reconcile daemon leads, the confirmed plan is handed to it
and carried out there (if it is not stale); with no daemon, apply leads for its own run, so two at
once cannot both act."""
from __future__ import annotations

import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import wait_for


def leading_with_room_to_rebalance(daemon_fleet, pg_dsn: str, tmp_path) -> Path:
    """A daemon that leads, s1 and s2 running on w1, and an empty w2 added: a rebalance would move one,
    which the loop never does on its own. The daemon's log."""
    daemon_fleet.worker("w1").strategy("s1").strategy("s2").write()
    log = tmp_path / "daemon.log"
    daemon_fleet.spawn("reconcile", "--state", pg_dsn, log=log)
    wait_for(lambda: "took the lead in term 1" in log.read_text(), 20, "the daemon to lead")
    daemon_fleet.beating("s1", beats=1)
    daemon_fleet.beating("s2", beats=1)
    daemon_fleet.worker("w2").write()
    return log


def test_apply_while_a_daemon_leads_hands_its_plan_to_the_leader(daemon_fleet, pg_dsn, tmp_path):
    log = leading_with_room_to_rebalance(daemon_fleet, pg_dsn, tmp_path)
    done = daemon_fleet.ql("apply", "--yes", "--rebalance", "--output", "json", "--state", pg_dsn)
    report = done.json()
    assert report["ok"] and [o["action"] for o in report["outcomes"]] == ["move"], done.describe()
    assert "the plan is handed to it once confirmed" in done.stderr
    moved = report["outcomes"][0]["strategy"]
    assert "plan handed over by" in log.read_text()
    events = daemon_fleet.ql("events", "--output", "json", "--state", pg_dsn).json()
    moves = [e for e in events if e.get("strategy") == moved and e["event"] == "move"]
    assert len(moves) == 1 and "handed over by" in moves[0]["actor"] and moves[0]["to"] == "w2", moves
    beat = daemon_fleet.workdir("w2") / "instances" / moved / "heartbeat.json"
    wait_for(lambda: beat.exists() and daemon_fleet.runner_counts() == {"s1": 1, "s2": 1}, 15, f"{moved} beating on w2")


def test_a_stale_handed_plan_is_refused_and_nothing_is_done(daemon_fleet, pg_dsn, tmp_path):
    leading_with_room_to_rebalance(daemon_fleet, pg_dsn, tmp_path)
    from quantlab.app.applying import PlanChanged
    from quantlab.app.controller import Controller, default_state_path
    from quantlab.app.handover import apply_or_hand_over
    from quantlab.core.planner import PlanOptions
    ctl = Controller(daemon_fleet.root, default_state_path(daemon_fleet.root), state_dsn=pg_dsn)
    asked = []

    def confirm(plan) -> bool:
        asked.append([a.action for a in plan.actions])
        daemon_fleet.ql("stop-all", "--yes", "--state", pg_dsn)        # what the plan was made from changes
        return True
    try:
        with pytest.raises(PlanChanged, match="another run placed, moved or stopped strategies"):
            apply_or_hand_over(ctl, PlanOptions(rebalance=True), confirm=confirm)
    finally:
        ctl.close()
    assert asked == [["move"]]
    events = daemon_fleet.ql("events", "--output", "json", "--state", pg_dsn).json()
    assert not [e for e in events if e["event"] == "move"], "the stale plan moved nothing"


def test_two_applies_with_no_daemon_one_leads_the_other_refuses(daemon_fleet, pg_dsn, tmp_path):
    daemon_fleet.worker("w1").strategy("s1").write()
    daemon_fleet.ql("apply", "--yes", "--state", pg_dsn)
    daemon_fleet.beating("s1", beats=1)
    daemon_fleet.strategy("s2").write()
    # The first apply holds the lead while a person reads its plan (its terminal, unanswered).
    from tests.support import cli_env
    person, terminal = pty.openpty()
    first = subprocess.Popen([sys.executable, "-m", "quantlab", "apply", "--fleet", str(daemon_fleet.root), "--state", pg_dsn],
                             stdin=terminal, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=cli_env())
    try:
        import psycopg

        def leads() -> bool:
            with psycopg.connect(pg_dsn) as conn:
                row = conn.execute("SELECT holder FROM quantlab_leader").fetchone()
            return bool(row and row[0] and f"pid {first.pid} " in row[0])
        wait_for(leads, 20, "the first apply to lead")
        second = daemon_fleet.ql("apply", "--yes", "--state", pg_dsn, check=None)
        assert second.returncode == 1 and "leads (term" in second.output and "wait for it to finish" in \
            second.output, second.describe()
        assert daemon_fleet.runner_counts() == {"s1": 1}, "nothing was started by either"
    finally:
        first.kill()
        first.wait(10)
        os.close(person)
        os.close(terminal)
