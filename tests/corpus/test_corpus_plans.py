"""Category 4, saved plans (`apply PLANFILE`): a plan saved by `plan --out` from the world (it would
start s1 on w1), then tampered with — actions of unknown kinds, fields of the wrong type, a worker
or strategy the fleet does not have, another state's lineage, an older serial, other fleet files —
or replaced by what is not a plan. A plan file is carried out as it says, so what `plan --out`
cannot have written is refused before anything runs, naming the field; a stale plan is refused,
saying why. Nothing starts on the hosts and the state stays as it was (kit.play).

The plan files that are not regular files, the 70 MiB one and invalid JSON are in
tests/integration/test_cli_inputs.py (PLAN_FILES)."""
from __future__ import annotations

import pytest

from tests.corpus.kit import STRATEGIES_YAML, Edit, cases_of, params, play

case = cases_of("plans")
APPLY = ["apply", "{world}/plan.json", "--yes"]
NOT_A_PLAN = "{world}/plan.json: not a quantlab plan file"
REDO = "create one with `quantlab plan --out FILE`"
STALE = "saved plan is stale"


def plan(**fields):
    """The saved plan with these fields set."""
    return {"plan.json": Edit(lambda p: p.update(fields))}


def action(**fields):
    """The saved plan with these fields of its one action (start s1 on w1) set (None: removed)."""
    def change(p):
        for key, value in fields.items():
            if value is None:
                p["actions"][0].pop(key, None)
            else:
                p["actions"][0][key] = value
    return {"plan.json": Edit(change)}


CASES = [
    # --- actions that `plan --out` cannot have written ---
    case("unknown-action", APPLY, 1, (NOT_A_PLAN, "(unknown action 'explode')", REDO), setup=action(action="explode")),
    case("unknown-cause", APPLY, 1, (NOT_A_PLAN, "(unknown cause 'because' of start s1)"), setup=action(cause="because")),
    case("strategy-a-number", APPLY, 1, (NOT_A_PLAN, "actions[0]: strategy is a number 5, expected text"),
         setup=action(strategy=5)),
    case("strategy-missing", APPLY, 1, (NOT_A_PLAN, "actions[0]: strategy is missing, expected text"),
         setup=action(strategy=None)),
    case("worker-null", APPLY, 1, (NOT_A_PLAN, "actions[0]: worker is null, expected text"),
         setup={"plan.json": Edit(lambda p: p["actions"][0].update(worker=None))}),
    case("worker-a-list", APPLY, 1, (NOT_A_PLAN, 'actions[0]: worker is a list ["w1", "w2"], expected text'),
         setup=action(worker=["w1", "w2"])),
    case("epoch-as-text", APPLY, 1, (NOT_A_PLAN, 'actions[0]: epoch is text "one", expected an integer'),
         setup=action(epoch="one")),
    case("epoch-true", APPLY, 1, (NOT_A_PLAN, "actions[0]: epoch is a boolean true, expected an integer"),
         setup=action(epoch=True)),
    case("paused-as-text", APPLY, 1, (NOT_A_PLAN, 'actions[0]: paused is text "no", expected true or false'),
         setup=action(paused="no")),
    case("move-without-from-and-to", APPLY, 1, (NOT_A_PLAN, "actions[0]: from is missing, expected text"),
         setup=action(action="move", cause="rebalance")),
    case("action-null", APPLY, 1, (NOT_A_PLAN, "actions[0] is null, not an object"),
         setup={"plan.json": Edit(lambda p: p.update(actions=[None]))}),
    case("actions-an-object", APPLY, 1, (NOT_A_PLAN, "actions is an object"),
         setup=plan(actions={"start": "s1"})),
    case("blocked-action-of-an-unknown-kind", APPLY, 1, (NOT_A_PLAN, "(unknown action 'wipe')"),
         setup=plan(blocked=[{"guard": "mass-stop", "reason": "x", "actions": [{"action": "wipe", "cause": "removed"}]}])),
    case("adopt-epoch-as-text", APPLY, 1, (NOT_A_PLAN, 'adopt[0]: epoch is text "x", expected an integer'),
         setup=plan(adopt=[{"strategy": "s1", "worker": "w1", "epoch": "x"}])),
    case("note-a-number", APPLY, 1, (NOT_A_PLAN, "notes[0] is a number, not an object"), setup=plan(notes=[5])),
    case("queued-without-reason", APPLY, 1, (NOT_A_PLAN, "queued[0]: reason is missing, expected text"),
         setup=plan(queued=[{"strategy": "s1"}])),
    # --- provenance ---
    case("other-format-version", APPLY, 1, (NOT_A_PLAN, "(unknown plan formatVersion 2)"), setup=plan(formatVersion=2)),
    case("serial-as-text", APPLY, 1, (NOT_A_PLAN, 'stateSerial is text "3", expected an integer'),
         setup=plan(stateSerial="3")),
    case("serial-of-5000-digits", APPLY, 1, (NOT_A_PLAN, "integer string conversion"),
         then=lambda w: w.plan.write_text(w.plan.read_text().replace('"stateSerial": ', '"stateSerial": ' + "9" * 5000))),
    case("another-states-lineage", APPLY, 1,
         (STALE, "the state file is another one", "plan has 00000000-0000-0000-0000-000000000000",
          "Run `quantlab plan --out FILE` again"),
         setup=plan(lineage="00000000-0000-0000-0000-000000000000")),
    case("older-serial", APPLY, 1, (STALE, "the state changed since", "plan has 1)"), setup=plan(stateSerial=1)),
    case("other-fleet-files", APPLY, 1, (STALE, "the fleet files changed since"),
         setup=plan(fleetHash="sha256:" + "0" * 64)),
    case("fleet-edited-since", APPLY, 1, (STALE, "the fleet files changed since"),
         setup={"fleet/strategies.yaml": STRATEGIES_YAML + "# edited after the plan was saved\n"}),
    # --- what is not a plan at all ---
    case("a-json-list", APPLY, 1, (NOT_A_PLAN, "(the file is a list, not an object)"), setup={"plan.json": "[]"}),
    case("empty-file", APPLY, 1, (NOT_A_PLAN, "Expecting value"), setup={"plan.json": ""}),
    case("nan-serial", APPLY, 1, (NOT_A_PLAN, "stateSerial is a number NaN, expected an integer"),
         setup={"plan.json": '{"formatVersion": 1, "stateSerial": NaN, "actions": []}'}),
    case("deeply-nested", APPLY, 1, (NOT_A_PLAN, "maximum recursion depth exceeded"),
         setup={"plan.json": "[" * 100_000 + "]" * 100_000}),
    # 5 MB of notes, the last one not a note: read in full (under the 64 MiB cap), refused by name.
    case("five-megabytes-then-a-bad-note", APPLY, 1, (NOT_A_PLAN, "notes[100000] is a number, not an object"),
         setup=plan(notes=[{"strategy": "s1", "worker": "w1", "note": "n" * 20}] * 100_000 + [5])),
    case("state-file-given-as-plan", ["apply", "{state}", "--yes"], 1, ("{state}: not a quantlab plan file",)),
    # --- options that cannot change a saved plan ---
    case("target-with-a-saved-plan", [*APPLY, "--target", "s1"], 1,
         "--target and --rebalance shape a new plan and cannot change a saved one"),
    # Carried out as far as it goes: the strategy the action names is not in the fleet, so it fails
    # before reaching a host; the state records the outcome, no placement.
    case("strategy-not-in-the-fleet", APPLY, 1, (("✗ start zz w1: zz: strategy is not in the fleet any more"),),
         setup=action(strategy="zz"), keeps="placements"),
    case("worker-not-in-the-fleet", APPLY, 1, (("✗ start s1 w9: w9: worker is not in the fleet any more"),),
         setup=action(worker="w9"), keeps="placements"),
]


@pytest.mark.parametrize("case", params(CASES))
def test_saved_plan(case, world, tmp_path, request):
    play(case, world, tmp_path, request)
