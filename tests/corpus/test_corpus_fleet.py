"""Category 1, the fleet directory: files that do not parse, expand, nest or grow without bound, bytes
that are not UTF-8, documents of the wrong shape, ids that collide or break the pattern, strategy
files that leave the fleet directory or are not files, and entries that cannot be read. Every
problem is named FILE:LINE with what to do; `validate`, `plan` and `apply` exit 1; nothing on the
hosts changes and the state stays as it was (kit.play)."""
from __future__ import annotations

import pytest

from tests.corpus.kit import (FIFO, FLEET_YAML, FOLDER, STRATEGIES_YAML, WORKERS_YAML, Link, Sparse, Unreadable,
                              cases_of, params, play)

case = cases_of("fleet")
FROZEN = "nothing was changed"


def strategy(id: str = "s9", **fields: str) -> str:
    """A Strategy document (YAML) with these fields over a valid one."""
    doc = {"apiVersion": "quantlab/v1", "kind": "Strategy", "id": id, "strategyFile": "strategies/s1.mjs",
           "requirements": "{api: paper}", **fields}
    return "".join(f"{key}: {value}\n" for key, value in doc.items())


def s1(old: str, new: str) -> str:
    """strategies.yaml with one change in s1 (its first document)."""
    assert old in STRATEGIES_YAML
    return STRATEGIES_YAML.replace(old, new, 1)


def fleet(old: str, new: str) -> str:
    assert old in FLEET_YAML
    return FLEET_YAML.replace(old, new, 1)


# Each level repeats the one below 9 times: 9^7 values from 60 lines (a "billion laughs").
BOMB = "".join(f"  {c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdef", "bcdefg"))
BOMB = "  a: &a [x, x, x, x, x, x, x, x, x]\n" + BOMB

CASES = [
    # --- YAML that does not parse ---
    case("yaml-unclosed-flow-sequence", ["validate"], 1,
         ("{fleet}/workers.yaml:18: YAML syntax error", "did not find expected ',' or ']'"),
         setup={"fleet/workers.yaml": WORKERS_YAML + "---\napiVersion: quantlab/v1\nkind: Worker\nid: [w3\n"}),
    case("yaml-bad-indentation", ["apply", "--yes"], 1,
         ("{fleet}/fleet.yaml:6: YAML syntax error: while parsing a block mapping", FROZEN),
         setup={"fleet/fleet.yaml": FLEET_YAML + "   stray: indented\n"}),
    case("tab-indentation", ["validate"], 1,
         "{fleet}/fleet.yaml:5: YAML syntax error: while scanning for the next token; found character that "
         "cannot start any token (a tab character: YAML indents with spaces only)",
         setup={"fleet/fleet.yaml": fleet("reconcile: {intervalSeconds: 5}", "reconcile:\n\tintervalSeconds: 5")}),
    case("control-character", ["plan"], 1, "{fleet}/extra.yaml:2: YAML error: unacceptable character #x0007",
         setup={"fleet/extra.yaml": "apiVersion: quantlab/v1\nkind: \x07Worker\n"}),
    case("nul-byte", ["validate"], 1, "{fleet}/extra.yaml:1: YAML error: unacceptable character #x0000",
         setup={"fleet/extra.yaml": "apiVersion: quantlab/v1\x00\n"}),
    case("python-object-tag", ["apply", "--yes"], 1,
         ("{fleet}/extra.yaml:3: YAML syntax error: could not determine a constructor", FROZEN),
         setup={"fleet/extra.yaml": "apiVersion: quantlab/v1\nkind: Worker\nid: !!python/object/apply:os.system [id]\n"}),
    case("binary-value", ["validate"], 1, "{fleet}/strategies.yaml:5: YAML syntax error: binary values are not JSON data",
         setup={"fleet/strategies.yaml": s1("params: {symbol: BTCUSDT}", "params: {symbol: !!binary aGVsbG8=}")}),
    case("boolean-key", ["validate"], 1, "{fleet}/fleet.yaml:6: YAML syntax error: key 'on' reads as boolean True, "
                                         "not a string: quote it",
         setup={"fleet/fleet.yaml": FLEET_YAML + "on: true\n"}),
    case("duplicate-key", ["apply", "--yes"], 1,
         ("{fleet}/fleet.yaml:6: YAML: duplicate key 'policy' (first at line 3); keep one of them", FROZEN),
         setup={"fleet/fleet.yaml": FLEET_YAML + "policy: round-robin\n"}),
    # --- YAML that would expand, nest or grow without bound ---
    case("alias-bomb-in-params", ["apply", "--yes"], 1,
         ("{fleet}/extra.yaml:6: params: expands to more than 1,000,000 values in this file", "use fewer aliases"),
         setup={"fleet/extra.yaml": strategy(params="") + BOMB}),
    case("alias-bomb-alone", ["validate"], 1, "{fleet}/extra.yaml:1: lol: expands to more than 1,000,000 values",
         setup={"fleet/extra.yaml": "lol:\n" + BOMB}),
    case("deep-flow-nesting", ["plan"], 1, "{fleet}/extra.yaml:1: YAML syntax error: while increasing flow level; "
                                           "exceeded maximum nesting depth",
         setup={"fleet/extra.yaml": "a: " + "[" * 5000 + "]" * 5000 + "\n"}),
    case("deep-params", ["validate"], 1, "{fleet}/extra.yaml:6: params: nested deeper than 64 levels; flatten it",
         setup={"fleet/extra.yaml": strategy(params="{a: " * 100 + "1" + "}" * 100)}),
    case("five-megabyte-scalar", ["validate"], 1,
         (("{fleet}/extra.yaml:6: Strategy s9: name:", "… (5000014 characters)"),),     # clipped, not echoed
         setup={"fleet/extra.yaml": strategy(name="x" * 5_000_000)}),
    case("integer-of-5000-digits", ["validate"], 1,
         ("{fleet}/extra.yaml:6: YAML syntax error: integer '9999", "is too long to read; quote it or shorten it"),
         setup={"fleet/extra.yaml": strategy(heartbeatMs="9" * 5000)}),
    case("yaml-file-over-16-mib", ["apply", "--yes"], 1, ("{fleet}/big.yaml: larger than 16 MiB; split it", FROZEN),
         setup={"fleet/big.yaml": Sparse(17 * 2**20)}),
    case("params-over-96-kib", ["validate"], 1,
         "{fleet}/strategies.yaml:5: Strategy s1: params are 100,011 bytes as JSON, more than 96 KiB",
         setup={"fleet/strategies.yaml": s1("{symbol: BTCUSDT}", "{blob: '" + "x" * 100_000 + "'}")}),
    # --- bytes and encodings ---
    case("not-utf-8", ["validate"], 1, "{fleet}/extra.yaml:3: not valid UTF-8 (byte 0xff); save the file as UTF-8",
         setup={"fleet/extra.yaml": b"apiVersion: quantlab/v1\nkind: Strategy\nid: s\xff9\n"}),
    case("utf-16", ["plan"], 1, "{fleet}/fleet.yaml:1: not valid UTF-8 (byte 0xff)",
         setup={"fleet/fleet.yaml": FLEET_YAML.encode("utf-16")}),
    case("byte-order-mark-is-fine", ["validate"], 0, "{fleet} is valid: 2 strategies, 2 workers",
         setup={"fleet/fleet.yaml": "\ufeff" + FLEET_YAML}),
    # --- documents of the wrong shape ---
    case("empty-file", ["validate"], 1, "{fleet}/extra.yaml:1: empty file: add a document", setup={"fleet/extra.yaml": ""}),
    case("document-is-a-list", ["validate"], 1, "{fleet}/extra.yaml:1: document is a list; expected a mapping",
         setup={"fleet/extra.yaml": "- apiVersion: quantlab/v1\n- kind: Worker\n"}),
    case("wrong-type", ["apply", "--yes"], 1,
         "{fleet}/fleet.yaml:4: Fleet: reconcile.intervalSeconds: expected number, got string 'five'",
         setup={"fleet/fleet.yaml": fleet("intervalSeconds: 5", "intervalSeconds: five")}),
    case("nan-duration", ["validate"], 1, "{fleet}/fleet.yaml:4: YAML syntax error: '.nan' is not a JSON number; "
                                          "write a number or quote it",
         setup={"fleet/fleet.yaml": fleet("intervalSeconds: 5", "intervalSeconds: .nan")}),
    case("infinite-duration", ["validate"], 1, "{fleet}/fleet.yaml:5: YAML syntax error: '.inf' is not a JSON number",
         setup={"fleet/fleet.yaml": fleet("leaseTtlSeconds: 300", "leaseTtlSeconds: .inf")}),
    case("negative-duration", ["validate"], 1,
         "{fleet}/fleet.yaml:4: Fleet: reconcile.intervalSeconds: -5 is too small (must be at least 0.1)",
         setup={"fleet/fleet.yaml": fleet("intervalSeconds: 5", "intervalSeconds: -5")}),
    case("zero-heartbeat", ["validate"], 1,
         "{fleet}/strategies.yaml:4: Strategy s1: heartbeatMs: 0 is too small (must be at least 10)",
         setup={"fleet/strategies.yaml": s1("id: s1\n", "id: s1\nheartbeatMs: 0\n")}),
    case("unknown-kind", ["validate"], 1,
         "{fleet}/extra.yaml:2: unknown kind 'Stratgy' (did you mean 'Strategy'?); expected one of",
         setup={"fleet/extra.yaml": "apiVersion: quantlab/v1\nkind: Stratgy\nid: s9\n"}),
    case("unknown-api-version", ["validate"], 1,
         "{fleet}/extra.yaml:1: unknown apiVersion 'quantlab/v2'; expected quantlab/v1",
         setup={"fleet/extra.yaml": "apiVersion: quantlab/v2\nkind: Strategy\nid: s9\n"}),
    case("unknown-field", ["plan"], 1,
         "{fleet}/strategies.yaml:4: Strategy s1: unknown field 'heartbeatMS' (did you mean 'heartbeatMs'?)",
         setup={"fleet/strategies.yaml": s1("id: s1\n", "id: s1\nheartbeatMS: 500\n")}),
    case("two-fleet-documents", ["apply", "--yes"], 1,
         "{fleet}/fleet.yaml:2: more than one Fleet document: the first is at {fleet}/extra.yaml:2",
         setup={"fleet/extra.yaml": FLEET_YAML}),
    case("duplicate-worker-id", ["validate"], 1,
         "{fleet}/workers.yaml:3: duplicate Worker id 'w1': also defined at {fleet}/more.yaml:3; ids must be unique",
         setup={"fleet/more.yaml": WORKERS_YAML.split("---")[0]}),
    # --- ids ---
    case("id-uppercase-underscore", ["validate"], 1,
         "{fleet}/strategies.yaml:3: Strategy S_1: id: 'S_1' must be lowercase letters, digits and '-'",
         setup={"fleet/strategies.yaml": s1("id: s1", "id: S_1")}),
    case("id-too-long", ["validate"], 1, ("{fleet}/strategies.yaml:3:", "at most 63 characters"),
         setup={"fleet/strategies.yaml": s1("id: s1", "id: " + "a" * 64)}),
    # A newline in an id must not split the problem's line (the second half would pass for a problem).
    case("id-with-a-newline", ["validate"], 1,
         ("{fleet}/strategies.yaml:3: Strategy 's1\\nx.yaml:1: fine': id: 's1\\nx.yaml:1: fine' must be lowercase",),
         setup={"fleet/strategies.yaml": s1("id: s1", 'id: "s1\\nx.yaml:1: fine"')}),
    # --- strategy files ---
    case("strategy-file-dotdot", ["apply", "--yes"], 1,
         "{fleet}/strategies.yaml:4: Strategy s1: strategyFile '../outside.mjs' resolves outside the fleet "
         "directory ({world}/outside.mjs); keep strategy files inside it",
         setup={"fleet/strategies.yaml": s1("strategies/s1.mjs", "../outside.mjs"), "outside.mjs": "//\n"}),
    case("strategy-file-absolute", ["validate"], 1,
         "{fleet}/strategies.yaml:4: Strategy s1: strategyFile '/etc/hostname.mjs' must be relative to the fleet directory",
         setup={"fleet/strategies.yaml": s1("strategies/s1.mjs", "/etc/hostname.mjs")}),
    case("strategy-file-symlink-outside", ["apply", "--yes"], 1,
         "{fleet}/strategies.yaml:4: Strategy s1: strategyFile 'strategies/s1.mjs' resolves outside the fleet "
         "directory ({world}/outside.mjs)",
         setup={"outside.mjs": "//\n", "fleet/strategies/s1.mjs": Link("{world}/outside.mjs")}),
    case("strategy-file-is-a-directory", ["validate"], 1,
         "{fleet}/strategies.yaml:4: Strategy s1: strategyFile 'strategies/s1.mjs' is not a regular file but a directory",
         setup={"fleet/strategies/s1.mjs": FOLDER}),
    case("strategy-file-is-a-fifo", ["apply", "--yes"], 1,
         "{fleet}/strategies.yaml:4: Strategy s1: strategyFile 'strategies/s1.mjs' is not a regular file but a FIFO",
         setup={"fleet/strategies/s1.mjs": FIFO}),
    case("strategy-file-missing", ["validate"], 1,
         "{fleet}/strategies.yaml:4: Strategy s1: strategyFile 'strategies/gone.mjs' not found; "
         "expected {fleet}/strategies/gone.mjs",
         setup={"fleet/strategies.yaml": s1("strategies/s1.mjs", "strategies/gone.mjs")}),
    case("strategy-file-dangling-symlink", ["validate"], 1,
         "{fleet}/strategies.yaml:4: Strategy s1: strategyFile 'strategies/s1.mjs' not found (broken symlink)",
         setup={"fleet/strategies/s1.mjs": Link("nowhere.mjs")}),
    case("strategy-file-in-hidden-folder", ["validate"], 1,
         "{fleet}/strategies.yaml:4: Strategy s1: strategyFile '.secret/s1.mjs' is inside the hidden folder '.secret'",
         setup={"fleet/strategies.yaml": s1("strategies/s1.mjs", ".secret/s1.mjs"), "fleet/.secret/s1.mjs": "//\n"}),
    # --- entries of the fleet directory ---
    case("yaml-that-cannot-be-read", ["apply", "--yes"], 1,
         ("{fleet}/extra.yaml: cannot read: Permission denied; check its permissions", FROZEN),
         setup={"fleet/extra.yaml": Unreadable(strategy())}),
    case("yaml-symlink-outside", ["validate"], 1,
         "{fleet}/extra.yaml: symlink points outside the fleet directory; copy the file in instead",
         setup={"elsewhere.yaml": strategy(), "fleet/extra.yaml": Link("{world}/elsewhere.yaml")}),
    case("yaml-is-a-fifo", ["plan"], 1, "{fleet}/extra.yaml: is a FIFO (named pipe), not a regular file; remove it",
         setup={"fleet/extra.yaml": FIFO}),
    case("hidden-folders-are-skipped", ["validate"], 0, "{fleet} is valid: 2 strategies, 2 workers",
         setup={"fleet/.drafts/broken.yaml": "kind: [", "fleet/strategies/.x.yaml": b"\xff\xfe"}),
    # status still answers, from the state file and the hosts, under a banner that names the problem
    case("status-while-invalid", ["status"], 0,
         ("The fleet does not validate (1 problem)", "{fleet}/workers.yaml:6: Worker w1: capabilities.maxStrategies: "
                                                     "expected integer, got number 1.5"),
         setup={"fleet/workers.yaml": WORKERS_YAML.replace("maxStrategies: 4", "maxStrategies: 1.5", 1)}),
]


@pytest.mark.parametrize("case", params(CASES))
def test_fleet_directory(case, world, tmp_path, request):
    play(case, world, tmp_path, request)
