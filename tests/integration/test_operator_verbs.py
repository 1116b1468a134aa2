"""The operator's verbs beyond plan and apply: `retry` (a strategy in error starts again with a fresh
restart budget, while the loop runs, recorded in the events) and `logs --since/--grep` (filtered on
the host)."""
from __future__ import annotations

import datetime

from harness import wait_for


def test_retry_starts_a_strategy_in_error_again_while_the_loop_runs(fleet, tmp_path):
    down = tmp_path / "exchange-down"
    down.write_text("")
    fleet.worker("w1").strategy("s1", {"throwWhile": str(down)}, heartbeat_ms=100, maxErrors=0, maxRestarts=1)
    fleet.strategy("s2").write()
    fleet.spawn("reconcile", log=tmp_path / "loop.log")
    wait_for(lambda: (s := fleet.host_status("s1")) and s.get("state") == "error", 20, what="s1 in error")
    epoch = fleet.placement("s1")["epoch"]

    refused = fleet.ql("retry", "s2", check=1)
    assert "s2 is running on w1, not in error" in refused.output, refused.describe()
    unknown = fleet.ql("retry", "nosuch", check=1)
    assert "unknown strategy nosuch" in unknown.output, unknown.describe()

    down.unlink()                                    # the exchange is back: no commit needed to try again
    asked = fleet.ql("retry", "s1", "--reason", "exchange back")
    assert "s1 on w1: to be started again" in asked.output, asked.describe()
    placed = wait_for(lambda: (p := fleet.placement("s1")) and p["epoch"] > epoch and p, 20,
                      what="s1 started again under a new epoch")
    assert placed["worker"] == "w1"
    fleet.beating("s1", beats=3)
    status = fleet.strategy_status("s1")
    assert status["status"] == "running" and status["restarts"] == 0, status
    retried = [e for e in fleet.events("--strategy", "s1") if e.get("event") == "retry"]
    assert len(retried) == 1 and "exchange back" in retried[0]["detail"] and "retry" in retried[0]["actor"]
    assert "retry" not in fleet.state(), "the request stays after it was carried out"


def test_logs_since_and_grep_are_filtered_on_the_host(fleet):
    fleet.worker("w1").strategy("s1", {"logBeats": True}, heartbeat_ms=100).write()
    fleet.apply()
    fleet.beating("s1", beats=5)
    # The cut: just after the newest whole line so far (each line starts with its UTC time, in ms).
    written = (fleet.idir("s1") / "output.log").read_text()
    last = written[:written.rindex("\n")].rsplit("\n", 1)[-1][:24]
    cut = datetime.datetime.fromisoformat(last.replace("Z", "+00:00")) + datetime.timedelta(milliseconds=1)
    fleet.beating("s1", beats=3)
    everything = fleet.ql("logs", "s1").stdout.splitlines()
    assert any("started, epoch" in line for line in everything)
    newer = fleet.ql("logs", "s1", "--since", cut.isoformat()).stdout.splitlines()
    assert len(newer) >= 3 and all(line[:24] > last for line in newer), (last, newer)
    assert not any("started, epoch" in line for line in newer), "a line before the cut was kept"
    beats = fleet.ql("logs", "s1", "--grep", r"beat [0-9]+ epoch", "-n", "2").stdout.splitlines()
    assert len(beats) == 2 and all("beat" in line for line in beats), beats
    assert fleet.ql("logs", "s1", "--grep", "no such line").stdout == ""
    bad = fleet.ql("logs", "s1", "--grep", "(", check=1)
    assert "is not a regular expression" in bad.output


def test_help_shows_plain_placeholders_and_an_unknown_strategy_is_named_as_such(fleet):
    from harness import quantlab

    for command in ("logs", "explain", "init", "retry", "apply"):
        usage = quantlab(command, "--help").stdout.splitlines()[0]
        assert "{" not in usage and usage == usage.rstrip(), usage
    assert quantlab("logs", "--help").stdout.splitlines()[0].endswith("logs [OPTIONS] STRATEGY")
    fleet.worker("w1").strategy("s1").write()
    fleet.apply()
    unknown = fleet.ql("logs", "nosuch", check=1)
    assert "unknown strategy nosuch" in unknown.output and "never been placed" not in unknown.output
