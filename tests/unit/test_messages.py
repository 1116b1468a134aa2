"""Words that must match the facts: chat icons, numbers in /metrics, how a runner ended, who does
not answer."""
from __future__ import annotations

from quantlab.host.agent.qlagent.supervisor import exit_words
from quantlab.edges.notify.chats import chat_text
from quantlab.core.status import not_answering
from quantlab.core.plan import Note, Plan
from quantlab.face.web.metrics import _number


def test_a_strategy_error_is_not_told_with_an_info_icon():
    assert chat_text({"kind": "strategy-error", "strategy": "s1", "message": "gave up"}).startswith("🔴")
    assert chat_text({"kind": "lease-expired", "strategy": "s1", "message": "x"}).startswith("⚠️")
    assert chat_text({"kind": "not-deployed", "message": "x"}).startswith("🔴")


def test_metrics_print_what_was_measured_not_float_noise():
    assert _number(2.4210000000000003) == "2.421"
    assert _number(0.1 + 0.2) == "0.3" and _number(3.0) == "3" and _number(1e-7) == "1e-07"
    assert _number("nan") == "NaN" and _number(None) is None


def test_a_runner_killed_by_a_signal_is_said_by_the_signal_name():
    assert exit_words(-9) == "runner was killed by SIGKILL"
    assert exit_words(-15) == "runner was killed by SIGTERM"
    assert exit_words(3) == "runner exited with code 3"


def test_workers_not_answering_are_named():
    assert not_answering(["w3"]) == "1 not answering: w3"
    assert not_answering([f"w{i}" for i in range(7)]) == "7 not answering: w0, w1, w2, w3, w4 and 2 more"


def test_a_plan_with_only_notes_does_not_read_as_nothing_to_say():
    plan = Plan(fleet_revision=None, fleet_dirty=False, fleet_hash="sha256:x", lineage=None, state_serial=0,
                actions=(), notes=(Note("s1", "w1", "w1 no longer fits"),))
    assert plan.summary() == "No changes. 1 note."
