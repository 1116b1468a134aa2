"""Category 6, files in an instance's folder on a worker: a strategy runs as the agent's user in that
folder and can replace any of them (heartbeat.json, lease.json, status.json, spec.json, the pid
files, events.log, its checkpoint folder state/), and the agent's own files beside them (fence.json,
secrets/). The world places s1 and s2 on w1, neither running; each case makes one of s1's files
hostile and asks `status`, `plan` or `explain`. The answer is that instance's problem only, named
with its file: s1's row says what is wrong, s2's row on the same worker is as it always is, and
nothing crashes. Nothing on the hosts changes — not even the hostile file (kit.play).

What the agent does with such files while strategies run is in tests/integration/test_agent_hostile.py."""
from __future__ import annotations

import pytest

from tests.corpus.kit import FIFO, FOLDER, Edit, Link, cases_of, js, params, play

case = cases_of("instances")
S1 = "hosts/w1/instances/s1/"
NEIGHBOUR = ("│ s2", "│ w1", "the supervisor is not running (host restarted, or it was killed)")


def instance(sid: str, epoch: int) -> dict[str, str]:
    """An instance folder as a supervisor that was killed leaves it."""
    folder = f"hosts/w1/instances/{sid}/"
    return {folder + "status.json": js({"state": "running", "epoch": epoch, "specHash": "sha256:00", "restarts": 0}),
            folder + "heartbeat.json": js({"t": 1, "beats": 3, "errorCount": 0, "lastError": None}),
            folder + "spec.json": js({"epoch": epoch, "specHash": "sha256:00", "leaseTtlSeconds": 300}),
            folder + "events.log": js({"t": 1, "event": "start", "detail": f"epoch {epoch}"}) + "\n",
            folder + "output.log": "2024-01-01T00:00:00Z started\n",
            folder + "state/state.json": js({"position": 0})}


WORLD = {"state.json": Edit(lambda v: v.update(nextEpoch=3, placements={
            "s1": {"worker": "w1", "epoch": 1, "specHash": "sha256:00", "placedAt": 1},
            "s2": {"worker": "w1", "epoch": 2, "specHash": "sha256:00", "placedAt": 1}})),
         **instance("s1", 1), **instance("s2", 2)}


def row(problem: str) -> tuple[tuple[str, ...], ...]:
    """s1's row of `status` names the problem; s2's is untouched."""
    return (("│ s1", "│ w1", problem), NEIGHBOUR)


CASES = [
    # --- heartbeat.json ---
    case("heartbeat-a-list", ["status"], 0, row("heartbeat.json: not a JSON object (list)"),
         setup={S1 + "heartbeat.json": "[1, 2]"}),
    case("heartbeat-over-64-kib", ["status"], 0, row("heartbeat.json: too large (100000 bytes, the limit is 65536)"),
         setup={S1 + "heartbeat.json": "x" * 100_000}),
    case("heartbeat-nan-time", ["status"], 0, row("heartbeat.json: t: expected a number >= 0, got NaN"),
         setup={S1 + "heartbeat.json": '{"t": NaN, "beats": 1}'}),
    case("heartbeat-5000-digit-beats", ["status"], 0, row("heartbeat.json: not valid JSON (Exceeds the limit"),
         setup={S1 + "heartbeat.json": '{"t": 1, "beats": ' + "9" * 5000 + "}"}),
    case("heartbeat-not-utf-8", ["status"], 0, row("heartbeat.json: not valid JSON ('utf-8' codec"),
         setup={S1 + "heartbeat.json": b'{"lastError": "\xff\xfe"}'}),
    case("heartbeat-deeply-nested", ["status", "-o", "json"], 0, '"heartbeat.json: not valid JSON (',
         setup={S1 + "heartbeat.json": "[" * 30_000 + "]" * 30_000}),
    case("heartbeat-a-fifo", ["status"], 0, row("heartbeat.json: not a regular file (fifo)"),
         setup={S1 + "heartbeat.json": FIFO}),
    case("heartbeat-link-to-dev-zero", ["status"], 0, row("heartbeat.json: not a regular file (symlink)"),
         setup={S1 + "heartbeat.json": Link("/dev/zero")}),
    case("heartbeat-a-directory", ["explain", "s1"], 0, "w1", setup={S1 + "heartbeat.json": FOLDER}),
    # --- lease.json ---
    case("lease-deadline-as-text", ["status"], 0, row('lease.json: deadline: expected a number, got "never"'),
         setup={S1 + "lease.json": js({"epoch": 1, "deadline": "never"})}),
    case("lease-deadline-infinity", ["status"], 0, row("lease.json: deadline: expected a number, got Infinity"),
         setup={S1 + "lease.json": '{"epoch": 1, "deadline": 1e999}'}),
    case("lease-of-5000-digits", ["status"], 0, row("lease.json: not valid JSON (Exceeds the limit"),
         setup={S1 + "lease.json": '{"epoch": 1, "deadline": ' + "9" * 5000 + "}"}),
    # --- status.json and spec.json ---
    case("status-unknown-state", ["status"], 0, row('status.json: state: "hacked\\u001b[2J" is not a known state'),
         setup={S1 + "status.json": js({"state": "hacked\x1b[2J", "epoch": 1})}),
    case("status-epoch-true", ["status"], 0, row("status.json: epoch: expected an integer, got true"),
         setup={S1 + "status.json": js({"state": "running", "epoch": True})}),
    # A reason with escape sequences, rich markup and an emoji code: shown as written, escaped.
    case("status-reason-hostile-text", ["status"], 0,
         (("│ s1", "error", "\\x1b]0;pwn\\x07 :-1: [red]x[/]"), NEIGHBOUR),
         setup={S1 + "status.json": js({"state": "error", "epoch": 1, "reason": "\x1b]0;pwn\x07 :-1: [red]x[/]"})}),
    case("spec-lease-ttl-as-text", ["status"], 0, row('spec.json: leaseTtlSeconds: expected a number, got "x"'),
         setup={S1 + "spec.json": js({"leaseTtlSeconds": "x", "epoch": "y"})}),
    # --- pid files ---
    case("supervisor-pid-1", ["status"], 0, row("supervisor.pid: not a usable pid (1)"),
         setup={S1 + "supervisor.pid": "1 1\n"}),
    case("supervisor-pid-huge", ["status"], 0, row("supervisor.pid: not a usable pid (99999999999999999999999)"),
         setup={S1 + "supervisor.pid": "99999999999999999999999\n"}),
    case("runner-pid-negative", ["status"], 0, row("runner.pid: not '<pid> <start time>'"),
         setup={S1 + "runner.pid": "-1\n"}),
    # --- the instance folder itself ---
    case("instance-is-a-file", ["status"], 0, (("│ s1", "unknown", "s1: not a directory (regular file)"), NEIGHBOUR),
         setup={"hosts/w1/instances/s1": "not a folder\n"}),
    case("instance-is-a-file-left-alone", ["plan"], 0, ("note      s1", "on w1: left alone: not an instance folder"),
         setup={"hosts/w1/instances/s1": "not a folder\n"}),
    case("checkpoint-fifo-and-dev-zero", ["plan"], 0, (("start   s1", "→ w1", "not running on w1"),),
         setup={S1 + "state/pipe": FIFO, S1 + "state/zero": Link("/dev/zero"), S1 + "state/up": Link("../../..")}),
    # s1's lines that are not events are skipped; s2's event is shown as its supervisor wrote it
    case("events-log-junk", ["events"], 0, (("start", "s2", "w1", "supervisor@w1", "epoch 2"),),
         setup={S1 + "events.log": '[1]\n{"t": 1e999, "event": "x"}\n{"t": "x", "event": "start"}\n{"t": 5, "event": 7}\n'}),
    case("output-log-a-fifo", ["explain", "s1"], 0, "w1", setup={S1 + "output.log": FIFO}),
    # --- the agent's own files beside the instances ---
    case("fence-garbage", ["status"], 0, (("│ s1", "the supervisor is not running"), NEIGHBOUR),
         setup={"hosts/w1/agent/fence.json": '{"lineage": "x", "other": 1e999, "neg": -1, "big": ' + "9" * 5000 + "}"}),
    case("fence-a-fifo", ["plan"], 0, (("start   s1", "→ w1"),), setup={"hosts/w1/agent/fence.json": FIFO}),
    case("secrets-a-fifo", ["status"], 0, (NEIGHBOUR,), setup={"hosts/w1/secrets/acc.env": FIFO}),
    case("instances-folder-a-file", ["status"], 0, (("│ s2", "│ w1"),),
         setup={"hosts/w1/instances": "not a folder\n"}),
]


@pytest.mark.parametrize("case", params(CASES))
def test_instance_files(case, world, tmp_path, request):
    play(case, world, tmp_path, request)
