"""Category 3, the state file (`--state`): text that is not JSON or not a state, values of the wrong
type or beyond any bound, other versions, and paths that are not a regular file. A state that
cannot be read is refused, named, and left as it was, with what to do; one that can be read but
holds oddities (a placement on a worker nobody knows, a negative serial) is shown, never a crash.
Nothing on the hosts changes (kit.play)."""
from __future__ import annotations

import socket

import pytest

from tests.corpus.kit import FIFO, FOLDER, Edit, Link, Sparse, World, cases_of, params, play

case = cases_of("state")
UNREADABLE = "it was left untouched"
AFRESH = "or move it away to start afresh"


def state(**fields):
    """The world's state file with these fields set (None: removed)."""
    def change(value):
        for key, new in fields.items():
            if new is None:
                value.pop(key, None)
            else:
                value[key] = new
    return Edit(change)


def placed(**fields):
    """The world's state with s1 placed on w1 (epoch 1), with these fields of the placement."""
    def change(value):
        value["placements"] = {"s1": {"worker": "w1", "epoch": 1, "specHash": "sha256:00", "placedAt": 1, **fields}}
        value["nextEpoch"] = 2
    return Edit(change)


def socket_at(world: World) -> None:
    world.state.unlink()
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(world.state))


CASES = [
    # --- not JSON, or not a state ---
    case("not-json", ["status"], 1, ("{state}:1: state file is not valid JSON (Expecting value)", UNREADABLE,
                                     "Restore it from a backup, or move it away"),
         setup={"state.json": "placements: {s1: w1}\n"}),
    case("truncated-json", ["apply", "--yes"], 1, ("{state}:1: state file is not valid JSON", UNREADABLE),
         setup={"state.json": '{"version": 2, "lineage": "x", "serial": 3, "placements": {"s1": {"wor'}),
    case("empty-file", ["plan"], 1, ("{state}:1: state file is not valid JSON", UNREADABLE),
         setup={"state.json": ""}),
    case("not-utf-8", ["state", "pull"], 1, ("{state}: 'utf-8' codec can't decode byte 0xff", UNREADABLE),
         setup={"state.json": b'{"version": 2, "lineage": "\xff"}'}),
    case("a-json-list", ["apply", "--yes"], 1, ("{state}: expected a JSON object", UNREADABLE, AFRESH),
         setup={"state.json": "[]"}),
    case("json-null", ["status"], 1, ("{state}: expected a JSON object", UNREADABLE), setup={"state.json": "null"}),
    case("deeply-nested", ["plan"], 1, ("{state}: maximum recursion depth exceeded", UNREADABLE),
         setup={"state.json": '{"version": 2, "lineage": "x", "serial": 1, "alerts": ' + "[" * 100_000 + "]" * 100_000 + "}"}),
    case("over-256-mib", ["apply", "--yes"], 1, "{state} is larger than 256 MiB (314572800 bytes); quantlab keeps "
                                               "its state there: move it away",
         setup={"state.json": Sparse(300 * 2**20)}),
    # --- versions ---
    case("newer-version", ["apply", "--yes"], 1,
         ("{state}: unknown state format version 9 (this quantlab reads 1, 2, 3); use a newer quantlab", UNREADABLE),
         setup={"state.json": state(version=9)}),
    case("version-as-text", ["status"], 1, "{state}: unknown state format version '2'",
         setup={"state.json": state(version="2")}),
    case("version-true", ["status"], 1, "{state}: unknown state format version True",
         setup={"state.json": state(version=True)}),
    # --- fields of the wrong type, or beyond any bound ---
    case("no-lineage", ["plan"], 1, ("{state}: malformed state: KeyError('lineage')", UNREADABLE),
         setup={"state.json": state(lineage=None)}),
    case("serial-as-text", ["apply", "--yes"], 1,
         ("{state}: malformed state: ValueError(\"invalid literal for int() with base 10: 'five'\")", UNREADABLE),
         setup={"state.json": state(serial="five")}),
    case("serial-of-5000-digits", ["status"], 1, ("{state}", UNREADABLE),
         setup={"state.json": '{"version": 2, "lineage": "x", "serial": ' + "9" * 5000 + "}"}),
    case("serial-nan", ["plan"], 1, ("{state}: malformed state: ValueError('cannot convert float NaN to integer')",
                                     UNREADABLE),
         setup={"state.json": '{"version": 2, "lineage": "x", "serial": NaN}'}),
    case("epoch-infinity", ["apply", "--yes"], 1, ("{state}: cannot convert float infinity to integer", UNREADABLE),
         setup={"state.json": state(nextEpoch=1e400)}),
    case("placements-a-list", ["plan"], 1,
         ("{state}: malformed state: AttributeError(\"'list' object has no attribute 'items'\")", UNREADABLE),
         setup={"state.json": state(placements=[{"s1": "w1"}])}),
    case("placement-as-text", ["status"], 1, ("{state}: malformed state: TypeError", UNREADABLE),
         setup={"state.json": state(placements={"s1": "w1"})}),
    case("epoch-as-text", ["apply", "--yes"], 1, ("{state}: malformed state: ValueError", "'one'", UNREADABLE),
         setup={"state.json": placed(epoch="one")}),
    case("lease-as-text", ["plan"], 1, ("{state}: malformed state: ValueError", "'soon'"),
         setup={"state.json": state(leases={"w1": "soon"})}),
    case("host-clock-as-text", ["status"], 1, ("{state}: malformed state: ValueError", "'fast'"),
         setup={"state.json": state(hostClocks={"w1": {"bootId": "b", "boottime": "fast", "at": 1}})}),
    case("reschedule-too-short", ["plan"], 1, ("{state}: malformed state: IndexError", UNREADABLE),
         setup={"state.json": state(reschedules={"s1": [1]})}),
    case("controller-term-as-text", ["apply", "--yes"], 1, ("{state}: malformed state: ValueError", UNREADABLE),
         setup={"state.json": state(controllerTerm="x")}),
    case("lease-ttl-not-a-number", ["status"], 1, ("{state}", UNREADABLE),
         setup={"state.json": state(clockBoot="another-boot", fleetSettings={"monitor": {"lease_ttl_s": "long"}})}),
    case("monitor-not-an-object", ["plan"], 1, ("{state}", UNREADABLE),
         setup={"state.json": state(clockBoot="another-boot", fleetSettings={"monitor": "x"})}),
    case("saved-at-as-text", ["status"], 1, ("{state}", UNREADABLE),
         setup={"state.json": state(clockBoot="another-boot", savedAt="noon", leases={"w1": 5})}),
    # --- read, and shown as they are ---
    case("placement-on-an-unknown-worker", ["plan"], 0, (("move", "s1", "w9 → w1", "w9 removed from fleet"),),
         setup={"state.json": placed(worker="w9")}),
    case("placement-of-an-unknown-strategy", ["status"], 0, (("zz", "w1"),),
         setup={"state.json": Edit(lambda v: v.update(placements={"zz": {"worker": "w1", "epoch": 1, "specHash": "x"}},
                                                      nextEpoch=2))}),
    case("negative-serial", ["plan"], 0, "state serial -3", setup={"state.json": state(serial=-3)}),
    case("lineage-a-number", ["state", "pull"], 0, '"lineage": 42', setup={"state.json": state(lineage=42)}),
    case("escape-sequences-in-an-id", ["status"], 0, "s1\\x1b[2J",
         setup={"state.json": Edit(lambda v: v.update(
             placements={"s1\x1b[2J": {"worker": "w1", "epoch": 1, "specHash": "x"}}, nextEpoch=2))}),
    # A suspension whose reason is not text (a hand edit): the plan says it is held, as text.
    case("suspension-reason-a-list", ["plan"], 0, ("everything suspended by ops: ['maintenance']",),
         setup={"state.json": state(version=3, suspended={"*": {"by": "ops", "reason": ["maintenance"], "at": 1}})}),
    case("loop-source-time-as-text", ["status"], 0, "Reconcile loop applies",
         setup={"state.json": state(loopSource={"kind": "working-tree", "revision": None, "at": "noon"})}),
    case("moved-away", ["apply", "--yes"], 1,
         "{state}: this state was moved to {world}/elsewhere.json by `quantlab state push`; no controller acts on it "
         "any more: pass --state {world}/elsewhere.json",
         setup={"state.json": state(migratedTo="{world}/elsewhere.json")}),
    # --- paths that are not a regular file ---
    case("world-writable", ["apply", "--yes"], 1, "{state}: state file is world-writable; refusing to trust it. "
                                                 "Check who changed it, then run: chmod 600 {state}",
         then=lambda w: w.state.chmod(0o666)),
    case("a-directory", ["status"], 1, "{state} is a directory, not a regular file; quantlab keeps its state there: "
                                       "move it away, or pass --state FILE for another place",
         setup={"state.json": FOLDER}),
    case("a-fifo", ["state", "pull"], 1, "{state} is a FIFO, not a regular file", setup={"state.json": FIFO}),
    case("a-socket", ["plan"], 1, "{state} is a socket, not a regular file", then=socket_at),
    case("symlink-loop", ["apply", "--yes"], 1, "{state}: cannot read the state file: Too many levels of symbolic links",
         setup={"state.json": Link("state.json")}),
    case("symlink-to-dev-null", ["status"], 1, "{state} is a character device, not a regular file",
         setup={"state.json": Link("/dev/null")}),
    case("symlink-to-a-directory", ["plan"], 1, "{state} is a directory, not a regular file",
         setup={"state.json": Link("{hosts}")}),
    case("under-a-file", ["plan", "--state", "{state}/state.json"], 1,
         "{state}/state.json: cannot read the state file: Not a directory"),
    case("dangling-symlink", ["plan"], 1, ("{state}", "broken symlink"),
         setup={"state.json": Link("{world}/unmounted/state.json")}),
]


@pytest.mark.parametrize("case", params(CASES))
def test_state_file(case, world, tmp_path, request):
    play(case, world, tmp_path, request)
