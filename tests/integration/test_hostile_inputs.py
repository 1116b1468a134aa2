"""Bad input to the real CLI gets a clear error, and nothing is lost or started by mistake: `--out`
where no file can go, a token file that is a FIFO, a port that does not exist, terminal escape
sequences from a strategy or a person, lines of the events log that are not events, and durations
so short they would spin the loop. No case may print a traceback or hang (`DEADLINE`)."""
from __future__ import annotations

import http.client
import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

from harness import DEADLINE, REPO, FleetDir, Result, check, ql, runner_counts, tree, wait_for
from tests.support import cli_env, free_port

ESC = "\x1b"


def quiet_fleet(root: Path) -> FleetDir:
    """A valid fleet with one `local` worker and no strategies: nothing to start."""
    return FleetDir(root).worker("w1").write()


# --- 1. --out where no file can go ------------------------------------------------------------------

def _folder(path: Path) -> Path:
    path.mkdir()
    (path / "keep.txt").write_text("mine\n")
    return path


def _fifo(path: Path) -> Path:
    os.mkfifo(path)             # nobody reads it: replacing it loses a pipe someone set up
    return path


def _device(path: Path) -> Path:
    try:                        # made like /dev/null, in a folder of the test's own
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("creating a device needs root (CAP_MKNOD)")
    return path


def _under_a_file(path: Path) -> Path:
    path.write_text("a file, not a folder\n")
    return path / "plan.json"


OUT_KINDS: list[tuple[Callable[[Path], Path], tuple[str, ...]]] = [
    (_folder, ("is a directory", "plan.json")),
    (_fifo, ("is a FIFO", "not a regular file")),
    (_device, ("is a character device", "not a regular file")),
    (_under_a_file, ("Not a directory",)),
]
OUT_IDS = ["directory", "fifo", "device", "under-a-file"]


@pytest.mark.parametrize("command", [("plan",), ("state", "pull")], ids=["plan", "state-pull"])
@pytest.mark.parametrize("make,says", OUT_KINDS, ids=OUT_IDS)
def test_out_where_no_file_can_go_is_refused_and_leaves_nothing(reaper, tmp_path, command, make, says):
    fleet = quiet_fleet(tmp_path / "fleet")
    fleet.ql("apply", "--yes")                  # a state for `state pull` to copy
    out = make(tmp_path / "out")
    before = tree(tmp_path)
    result = ql(*command, "--fleet", fleet.root, "--out", out)
    if command == ("state", "pull"):
        says = tuple(s.replace("plan.json", "state.json") for s in says)
    check(result, 1, f"--out {out}", *says, "nothing was written")
    assert tree(tmp_path) == before, "something was left behind (a temporary copy?) or replaced"


def test_a_plan_saved_over_an_older_plan_file_still_replaces_it(reaper, tmp_path):
    fleet = quiet_fleet(tmp_path / "fleet")
    out = tmp_path / "plan.json"
    out.write_text("an older plan\n")
    ql("plan", "--fleet", fleet.root, "--out", out)
    assert json.loads(out.read_text())["formatVersion"] == 1
    assert sorted(os.listdir(tmp_path)) == ["fleet", "plan.json"]


# --- 2. serve: a token file that is a FIFO, a port that does not exist --------------------------------

@pytest.mark.parametrize("option", ["--token-file", "--tls-cert"])
def test_serve_refuses_a_fifo_for_a_file_without_hanging(reaper, tmp_path, option):
    fleet = quiet_fleet(tmp_path / "fleet")
    fifo = _fifo(tmp_path / "secret")
    extra = ["--tls-key", str(tmp_path / "secret")] if option == "--tls-cert" else []
    result = ql("serve", "--fleet", fleet.root, "--listen", f"127.0.0.1:{free_port()}", option, fifo, *extra)
    check(result, 2, f"{option} {fifo} is a FIFO, not a regular file")
    assert stat.S_ISFIFO(fifo.lstat().st_mode)


def test_serve_refuses_a_port_that_does_not_exist(reaper, tmp_path):
    fleet = quiet_fleet(tmp_path / "fleet")
    result = ql("serve", "--fleet", fleet.root, "--listen", "127.0.0.1:99999")
    check(result, 2, "--listen 127.0.0.1:99999", "65535")


# --- 3. terminal escape sequences from a strategy and from a person --------------------------------------

# Sets the window title, clears the screen and turns the text red; then a second line.
HOSTILE = r"\u001b]0;pwned\u0007\u001b[2J\u001b[31mred\u009b1m\nsecond line"
HOSTILE_JS = """
let thrown = false;
export async function st_init(ctx) {}
export async function st_heartbeat(ctx) {
  if (!thrown) { thrown = true; throw new Error("%s"); }
}
export async function st_exit(ctx) {}
""" % HOSTILE
HOSTILE_TEXT = json.loads(f'"{HOSTILE}"')
REASON = "maintenance\x1b]52;c;Y3VybCBldmlsLnNo\x07\x1b[1A\nfake line"


def assert_terminal_safe(result: Result) -> None:
    shown = result.describe().encode("unicode_escape").decode()
    assert result.returncode in (0, 2), shown
    assert "Traceback" not in result.output, shown
    for ch in (ESC, "\x07", "\x9b"):
        assert ch not in result.output, f"{ch!r} printed raw\n{shown}"


def test_escape_sequences_from_a_strategy_and_a_reason_are_shown_not_obeyed(fleet, tmp_path):
    (fleet.root / "strategies" / "hostile.mjs").write_text(HOSTILE_JS)
    fleet.worker("w1").strategy("s1", file="strategies/hostile.mjs").strategy("s2").write()
    fleet.apply("--target", "s1")
    wait_for(lambda: fleet.strategy_status("s1")["lastError"], 20, "s1's lastError")
    fleet.ql("suspend", "--target", "s2", "--reason", REASON)

    status = ql("status", "--fleet", fleet.root)
    assert_terminal_safe(status)
    assert "\\x1b]0;pwned\\x07\\x1b[2J\\x1b[31mred\\x9b1m\\nsecond" in status.stdout, status.describe()
    note_rows = [line for line in status.stdout.splitlines() if "pwned" in line]
    assert len(note_rows) == 1 and "second" in note_rows[0], f"the note left its row\n{status.describe()}"
    assert "fake line" in status.stdout and "\\x1b]52;c;" in status.stdout, status.describe()

    plan = ql("plan", "--fleet", fleet.root)
    assert_terminal_safe(plan)
    assert "\\x1b]52;c;Y3VybCBldmlsLnNo\\x07\\x1b[1A\\nfake line" in plan.stdout, plan.describe()

    events = ql("events", "--fleet", fleet.root)
    assert_terminal_safe(events)
    assert "\\x1b]52;c;" in events.stdout, events.describe()
    assert not [line for line in events.stdout.splitlines() if line.startswith("fake line")], events.describe()

    # JSON stays exact: the text as the strategy and the person wrote it (json escapes it).
    status_json = ql("status", "--fleet", fleet.root, "--output", "json")
    assert ESC not in status_json.stdout
    s1 = next(s for s in status_json.json()["strategies"] if s["id"] == "s1")
    assert s1["lastError"] == HOSTILE_TEXT
    suspended = [e for e in fleet.events() if e["event"] == "suspended"]
    assert suspended and suspended[-1]["detail"] == f"s2: {REASON}", suspended


# --- 4. lines of the events log that are not events -------------------------------------------------

GOOD = [{"t": 1_700_000_000_000, "event": "start", "strategy": "s1", "worker": "w1", "actor": "apply",
         "outcome": "ok", "reason": "new"},
        # free text fields may hold anything: shown as text
        {"t": 1_700_000_001_000, "event": "note", "actor": "someone", "detail": {"nested": [1, 2]}, "reason": 5}]
BAD_LINES = ['[1, 2, 3]', '42', '"text"', 'null', '{"t": "abc", "event": "start"}',
             '{"t": 1700000000500, "event": ["start"]}', '{"t": 1e400, "event": "start"}',
             '{"t": 1700000000600, "event": "start", "strategy": {"id": "s1"}}', '{"t": true, "event": "x"}',
             '{"t": 99999999999999999999, "event": "start"}', '{not json', '{"t": null, "event": "start"}']


def test_lines_of_the_events_log_that_are_not_events_are_skipped_and_said_once(reaper, tmp_path):
    fleet = quiet_fleet(tmp_path / "fleet")
    log = fleet.state_path.with_name("events.jsonl")
    log.parent.mkdir(parents=True)
    lines = [json.dumps(GOOD[0]), *BAD_LINES, json.dumps(GOOD[1])]
    log.write_text("\n".join(lines) + "\n")
    before = log.read_bytes()

    shown = ql("events", "--fleet", fleet.root)
    check(shown, 0, f"skipped {len(BAD_LINES)} lines", f"{log}:2: a JSON array, not an event object")
    assert shown.stderr.count("skipped") == 1, shown.describe()
    assert "start" in shown.stdout and "{'nested': [1, 2]}" in shown.stdout, shown.describe()

    as_json = ql("events", "--fleet", fleet.root, "--output", "json")
    check(as_json, 0)
    assert as_json.json() == GOOD
    for args in (("--since", "2000-01-01T00:00:00"), ("--strategy", "s1")):
        check(ql("events", "--fleet", fleet.root, *args), 0)

    port = free_port()
    page = subprocess.Popen([sys.executable, "-m", "quantlab", "serve", "--fleet", str(fleet.root), "--listen",
                             f"127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, env=cli_env(), cwd=REPO, start_new_session=True)
    fleet.daemons.append(page)
    try:
        def answer() -> tuple[int, bytes] | None:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                conn.request("GET", "/api/events", headers={"Host": f"127.0.0.1:{port}"})
                got = conn.getresponse()
                return got.status, got.read()
            except OSError:
                return None
        status, body = wait_for(answer, DEADLINE, "the fleet page to answer /api/events")
    finally:
        fleet.stop_daemons()
    assert status == 200, body
    assert json.loads(body) == GOOD
    assert log.read_bytes() == before, "reading the events log changed it"


# --- 5. durations so short they would spin the loop -------------------------------------------------

@pytest.mark.parametrize("section,field,value", [
    ("reconcile", "intervalSeconds", 0.0001), ("reconcile", "probeDeadlineSeconds", 0.01),
    ("ssh", "connectTimeoutSeconds", 0.001), ("ssh", "commandTimeoutSeconds", 0.05),
])
def test_a_duration_that_would_spin_the_loop_is_refused_and_starts_nothing(fleet, section, field, value):
    fleet.settings[section][field] = value
    fleet.worker("w1").strategy("s1").write()
    for command in (("validate",), ("reconcile", "--once"), ("apply", "--yes")):
        result = ql(*command, "--fleet", fleet.root)
        check(result, 1, "fleet.yaml:", f"{section}.{field}: {value:g} is too small (must be at least 0.1)")
    assert not runner_counts(fleet.marker), "a strategy was started from a fleet that does not validate"
    assert not fleet.state_path.exists() or fleet.placement("s1") is None


def test_the_shortest_durations_the_schema_allows_validate(reaper, tmp_path):
    fleet = quiet_fleet(tmp_path / "fleet")
    fleet.settings["reconcile"].update(intervalSeconds=0.1, probeDeadlineSeconds=0.1)
    fleet.settings["ssh"].update(connectTimeoutSeconds=0.1, commandTimeoutSeconds=0.1)
    check(ql("validate", "--fleet", fleet.write().root), 0, "is valid")
