"""Category 5, command-line arguments: a bad value for each option that takes one, options and
commands that do not exist, ids nobody knows, and paths that are not what the option needs. A value
typer can judge is refused with exit 2 naming the option; what quantlab judges (ids, paths, times,
addresses) exits 1 — 2 for `serve`'s address, as `serve` does — saying what to give instead.
Nothing on the hosts changes and the state stays as it was (kit.play)."""
from __future__ import annotations

import pytest

from tests.corpus.kit import FOLDER, cases_of, params, play

case = cases_of("args")
INVALID = "Invalid value for"
SINCE = "use a duration like 10m, 2h, 3d or an ISO time"
UNKNOWN_TARGET = "no strategy or worker has this id in the fleet"

CASES = [
    # --- numbers ---
    case("max-moves-negative", ["plan", "--rebalance", "--max-moves", "-1"], 2,
         f"{INVALID} '--max-moves': Input should be greater than or equal to 0"),
    case("max-moves-not-a-number", ["apply", "--yes", "--max-moves", "many"], 2,
         f"{INVALID} '--max-moves': Input should be a valid integer"),
    case("lock-timeout-negative", ["apply", "--yes", "--lock-timeout", "-1"], 2, f"{INVALID} '--lock-timeout'"),
    case("lock-timeout-nan", ["reconcile", "--once", "--lock-timeout", "nan"], 2, f"{INVALID} '--lock-timeout'"),
    case("git-pull-interval-zero", ["reconcile", "--once", "--git-pull-interval", "0"], 2,
         f"{INVALID} '--git-pull-interval': Input should be greater than or equal to 1"),
    case("lines-negative", ["logs", "s1", "--lines", "-1"], 2, f"{INVALID} '--lines' / '-n'"),
    case("output-yaml", ["plan", "--output", "yaml"], 2, f"{INVALID} '--output' / '-o': Value error, 'yaml' is not "
                                                         "one of 'text', 'json'"),
    case("output-empty", ["status", "-o", ""], 2, f"{INVALID} '--output' / '-o'"),
    # --- options and commands that do not exist ---
    case("unknown-option", ["plan", "--dry-run"], 2, "No such option: --dry-run"),
    case("unknown-command", ["deploy"], 2, "No such command 'deploy'", raw=True),
    case("unknown-state-command", ["state", "rm"], 2, "No such command 'rm'", raw=True),
    case("flag-given-a-value", ["status", "--detailed-exitcode", "yes"], 2, "Got unexpected extra argument(s) (yes)"),
    # --- ids nobody knows ---
    case("target-unknown", ["plan", "--target", "zz"], 1,
         f"--target zz: {UNKNOWN_TARGET}, the state or on the hosts; `quantlab status` lists them"),
    case("target-empty", ["plan", "--target", ""], 1, f"--target : {UNKNOWN_TARGET}"),
    case("target-with-escape-sequences", ["plan", "--target", "s1\x1b[2J\x1b]0;x\x07"], 1,
         f"--target s1\\x1b[2J\\x1b]0;x\\x07: {UNKNOWN_TARGET}"),
    case("apply-target-unknown", ["apply", "--yes", "--target", "../w1"], 1, f"--target ../w1: {UNKNOWN_TARGET}",
         keeps="placements"),
    case("suspend-unknown", ["suspend", "--target", "zz", "--reason", "x"], 1,
         f"--target zz: {UNKNOWN_TARGET} or the state"),
    case("resume-unknown", ["resume", "--target", "zz"], 1, f"--target zz: {UNKNOWN_TARGET} or the state"),
    case("explain-unknown", ["explain", "zz"], 1, "zz is not a strategy of {fleet}; `quantlab status` lists them"),
    case("retry-unknown", ["retry", "zz", "s1"], 1, "unknown strategy zz: not in the fleet {fleet} nor its state"),
    case("retry-never-placed", ["retry", "s1"], 1,
         "s1 is not placed on any worker (see `quantlab status`): there is no copy in error to retry"),
    case("logs-unknown", ["logs", "../../etc/passwd"], 1, "unknown strategy ../../etc/passwd: not in the fleet"),
    case("logs-never-placed", ["logs", "s1"], 1, "s1 has never been placed on a worker, so it has no output yet"),
    # --- times and patterns ---
    case("since-garbage", ["events", "--since", "yesterday"], 1, f"--since 'yesterday': {SINCE}"),
    case("since-negative", ["events", "--since", "-5m"], 1, f"--since '-5m': {SINCE}"),
    case("since-superscript-digit", ["events", "--since", "²m"], 1, f"--since '²m': {SINCE}"),
    case("since-year-one", ["logs", "s1", "--since", "0001-01-01T00:00:00"], 1, f"--since '0001-01-01T00:00:00': {SINCE}"),
    case("since-400-digit-days", ["events", "--since", "1" + "0" * 400 + "d"], 0, "No events"),
    case("grep-not-a-regex", ["logs", "s1", "--grep", "(unclosed"], 1,
         "--grep '(unclosed' is not a regular expression: missing ), unterminated subpattern"),
    # --- confirmations ---
    case("apply-without-a-terminal", ["apply"], 1, "apply needs a confirmation: run it in a terminal, or pass --yes",
         keeps="placements"),
    case("stop-all-without-yes", ["stop-all"], 1, "stop-all stops every strategy of the fleet (the fleet files stay as "
                                                  "they are); pass --yes to do it"),
    # --- paths ---
    case("fleet-empty", ["validate", "--fleet", ""], 2, f"{INVALID} '--fleet': an empty path (an unset variable?)"),
    case("fleet-is-a-file", ["plan", "--fleet", "{state}"], 1,
         "{state}: fleet directory is not a directory; pass --fleet DIR or set QUANTLAB_FLEET"),
    case("fleet-missing", ["apply", "--yes", "--fleet", "{world}/nowhere"], 1,
         "{world}/nowhere: fleet directory not found; pass --fleet DIR"),
    case("state-is-a-directory", ["plan", "--state", "{world}/somewhere"], 1,
         "{world}/somewhere is a directory, not a regular file; quantlab keeps its state there",
         setup={"somewhere": FOLDER}),
    case("state-database-refuses", ["plan", "--state", "postgresql://nobody@127.0.0.1:1/quantlab"], 1,
         "cannot reach the state database postgresql://nobody@127.0.0.1:1/quantlab"),
    case("push-to-dash", ["state", "push", "-"], 1, "state push needs where the state goes"),
    case("push-onto-a-state", ["state", "push", "{state}"], 1, "{state} already holds a state (lineage"),
    case("push-into-a-directory", ["state", "push", "{hosts}"], 1, "{hosts} is a directory, not a regular file"),
    case("init-over-a-fleet", ["init", "{fleet}"], 1, "{fleet} already exists and is not empty; choose a new folder"),
    case("leader-without-postgresql", ["leader", "show"], 1, "leadership needs a PostgreSQL state"),
    # --- serve's address and files ---
    case("listen-without-port", ["serve", "--listen", "localhost"], 2,
         "--listen localhost: expected HOST:PORT, e.g. 127.0.0.1:8421"),
    # ':-1:' is not an emoji code: the address is shown as it was given
    case("listen-negative-port", ["serve", "--listen", "127.0.0.1:-1"], 2, "--listen 127.0.0.1:-1: expected HOST:PORT"),
    case("listen-beyond-loopback-without-token", ["serve", "--listen", "0.0.0.0:0"], 2,
         "--listen 0.0.0.0:0 is reachable beyond this machine: pass --token-file FILE"),
    case("token-file-missing", ["serve", "--listen", "127.0.0.1:0", "--token-file", "{world}/token"], 2,
         "--token-file {world}/token: No such file or directory"),
    case("token-too-short", ["serve", "--listen", "127.0.0.1:0", "--token-file", "{world}/token"], 2,
         "--token-file {world}/token: the token must be at least 16 characters", setup={"token": "secret\n"}),
    case("tls-cert-without-key", ["serve", "--listen", "127.0.0.1:0", "--tls-cert", "{state}"], 2,
         "pass both --tls-cert and --tls-key"),
    case("tls-files-not-pem", ["serve", "--listen", "127.0.0.1:0", "--tls-cert", "{state}", "--tls-key", "{state}"], 2,
         "cannot load --tls-cert/--tls-key"),
    case("reconcile-serve-bad", ["reconcile", "--once", "--serve", "8421"], 2,
         "--serve 8421: expected HOST:PORT, e.g. 127.0.0.1:8421"),
]


@pytest.mark.parametrize("case", params(CASES))
def test_arguments(case, world, tmp_path, request):
    play(case, world, tmp_path, request)
