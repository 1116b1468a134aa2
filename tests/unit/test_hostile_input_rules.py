"""The pure rules behind "bad input gets a clear error": text from hosts, strategies and people made
safe for a terminal, events of odd types skipped or shown as text, files written where a person
said replacing only a regular file (and leaving nothing behind), the page's --listen checked, and
durations bounded so the loop cannot spin. The same cases through the real CLI are in
tests/integration/test_hostile_inputs.py."""
from __future__ import annotations

import io
import json
import os
import re
import stat
from pathlib import Path

import pytest
from rich.console import Console
from rich.text import Text

from quantlab.edges.atomicfile import NotARegularFile, atomic_write
from quantlab.edges.fleetfiles import load_fleet
from quantlab.core.plan import Plan
from quantlab.face.render import escape, event_line, one_line, status_tables, terminal_safe
from quantlab.core.spec import FleetInvalid, FleetSettings
from quantlab.edges.eventlog import EventLog, event_problem
from quantlab.edges.planfile import write_plan
from quantlab.face.web.server import ServeRefused, parse_listen

ESC = "\x1b"


def plain(markup: str) -> str:
    return Text.from_markup(markup).plain


# --- text for the terminal -------------------------------------------------------------------------

@pytest.mark.parametrize("raw,shown", [
    ("\x1b]0;title\x07", "\\x1b]0;title\\x07"),
    ("\x1b[2J\x1b[31mred", "\\x1b[2J\\x1b[31mred"),
    ("csi\x9b1m del\x7f nul\x00 cr\r", "csi\\x9b1m del\\x7f nul\\x00 cr\\r"),
    ("abc\u202edcba\u2066x\u2069", "abc\\u202edcba\\u2066x\\u2069"),
    ("lone \ud800 surrogate", "lone \\ud800 surrogate"),
])
def test_control_characters_are_shown_as_escapes(raw, shown):
    assert terminal_safe(raw) == shown
    assert one_line(raw) == shown


def test_newlines_stay_in_messages_but_never_in_a_value():
    assert terminal_safe("one\ntwo\tthree") == "one\ntwo\tthree"
    assert one_line("one\ntwo\tthree") == "one\\ntwo\tthree"


@pytest.mark.parametrize("text", ["plain text", "grid-btc → w1 (load 1/4)", "👩‍💻 ok", "日本語", "[red]x[/]"])
def test_ordinary_text_is_left_as_it_is(text):
    assert terminal_safe(text) == text
    assert plain(escape(text)) == text


def test_escape_keeps_markup_out_and_the_value_on_one_line():
    hostile = "[bold]\x1b[2Jnot bold[/]\nnext"
    assert plain(escape(hostile)) == "[bold]\\x1b[2Jnot bold[/]\\nnext"
    assert plain(escape(["a", 1])) == "['a', 1]"


def _row(**fields):
    worker = {"id": "w1", "host": "local", "region": None, "status": "idle", "runningStrategies": [],
              "maxStrategies": 4, "cpu": None, "memory": None, "lastSeen": 0, "cordoned": False, "drain": False,
              "error": None, "containment": None, "clockSkewMs": None}
    strategy = {"id": "s1", "status": "running", "healthy": True, "workerId": "w1", "heartbeatAgeMs": 100,
                "errorCount": 1, "restarts": 0, "revision": None, "upToDate": True, "desiredSpecHash": "h",
                "leaseLeftSeconds": None, "problems": [], "lastError": None, "reason": None, "note": None}
    worker.update(fields.get("worker", {}))
    strategy.update(fields.get("strategy", {}))
    return {"workers": [worker], "strategies": [strategy]}


def _printed(renderables) -> str:
    buffer = io.StringIO()
    console = Console(file=buffer, width=250, highlight=False, color_system=None)
    for r in renderables:
        console.print(r)
    return buffer.getvalue()


def test_status_cells_from_hosts_and_strategies_stay_in_their_row_and_print_as_text():
    report = _row(worker={"containment": "[/oops] \x1b[5m", "error": "ssh: refused\nsecond line"},
                  strategy={"lastError": "boom\x1b]0;pwned\x07\nat line 2", "revision": "[bold]abc"})
    printed = _printed(status_tables(report, 0))
    assert ESC not in printed and "\x07" not in printed
    rows = [line for line in printed.splitlines() if line.startswith("│ s1")]
    assert len(rows) == 1 and "boom\\x1b]0;pwned\\x07\\nat line 2" in rows[0], printed
    assert "[bold]abc" in rows[0]
    worker_row = [line for line in printed.splitlines() if line.startswith("│ w1")]
    assert len(worker_row) == 1 and "[/oops] \\x1b[5m" in worker_row[0] and "refused\\nsecond" in worker_row[0]


# --- events of odd types -------------------------------------------------------------------------------

GOOD = {"t": 1_700_000_000_000, "event": "start", "strategy": "s1", "worker": "w1", "actor": "apply"}


@pytest.mark.parametrize("event,why", [
    ([1, 2], "a JSON array, not an event object"),
    (42, "a JSON number, not an event object"),
    (None, "a JSON null, not an event object"),
    ({**GOOD, "t": "abc"}, "its time t is 'abc'"),
    ({**GOOD, "t": True}, "its time t is 'True'"),
    ({**GOOD, "t": float("inf")}, "its time t is 'inf'"),
    ({**GOOD, "t": float("nan")}, "its time t is 'nan'"),
    ({**GOOD, "t": -5}, "its time t is '-5'"),
    ({**GOOD, "t": 10 ** 20}, "not epoch milliseconds"),
    ({**GOOD, "t": None}, "its time t is 'None'"),
    ({**GOOD, "event": ["start"]}, "its event is a JSON array, not text"),
    ({**GOOD, "strategy": {"id": "s1"}}, "its strategy is a JSON object, not text"),
    ({**GOOD, "to": 5}, "its to is a JSON number, not text"),
])
def test_an_event_with_odd_types_is_not_an_event(event, why):
    problem = event_problem(event)
    assert problem is not None and why in problem, problem


@pytest.mark.parametrize("event", [GOOD, {**GOOD, "t": 1.5e12}, {**GOOD, "strategy": None}, {"n": 1}, {},
                                   {**GOOD, "detail": {"any": ["thing"]}, "reason": 5, "epoch": 3}])
def test_an_event_with_sane_names_and_time_is_one(event):
    assert event_problem(event) is None


@pytest.mark.parametrize("event", [
    {}, {"t": "abc"}, {"t": 10 ** 30, "event": 5}, {"t": float("nan")}, {"t": None, "actor": None},
    {**GOOD, "event": ["x"], "strategy": {"a": 1}, "worker": [1], "outcome": 3, "kind": ["k"], "revision": 7,
     "actor": {"x": 1}, "detail": {"d": 1}},
    {**GOOD, "from": ["a"], "to": {"b": 1}, "error": "line one\nline \x1b[2J two"},
])
def test_an_event_line_shows_any_field_type_as_text_on_one_line(event):
    line = plain(event_line(event))
    assert "\n" not in line and ESC not in line


def test_the_events_log_skips_what_is_not_an_event_and_names_the_first(tmp_path):
    log = EventLog(tmp_path / "events.jsonl")
    good = [GOOD, {**GOOD, "t": GOOD["t"] + 1, "detail": {"d": 1}}]
    (tmp_path / "events.jsonl.1").write_text(json.dumps(good[0]) + "\n" + '{"t": "abc", "event": "x"}\n')
    (tmp_path / "events.jsonl").write_text("\n[1]\n{cut\n" + json.dumps(good[1]) + "\n" + '"x"\n')
    assert list(log.read()) == good
    assert log.skipped == 4
    assert log.first_skipped == f"{tmp_path / 'events.jsonl.1'}:2: its time t is 'abc', not epoch milliseconds"
    (tmp_path / "events.jsonl.1").unlink()
    assert list(log.read()) == good[1:] and log.skipped == 3    # counted per read, not summed
    assert log.first_skipped == f"{tmp_path / 'events.jsonl'}:2: a JSON array, not an event object"


# --- files written where a person said ------------------------------------------------------------------

def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def _folder(path: Path) -> Path:
    path.mkdir()
    return path


@pytest.mark.parametrize("make,kind", [(_fifo, "a FIFO"), (_folder, "a directory")], ids=["fifo", "directory"])
def test_a_file_written_where_a_person_said_replaces_only_a_regular_file(tmp_path, make, kind):
    target = make(tmp_path / "out")
    with pytest.raises(NotARegularFile, match=re.escape(f"{target} is {kind}, not a regular file")):
        atomic_write(target, b"data", files_only=True)
    with pytest.raises(NotARegularFile):
        write_plan(target, Plan.from_json({"formatVersion": 1, "actions": []}))
    assert sorted(os.listdir(tmp_path)) == ["out"], "a temporary file was left behind"
    mode = target.lstat().st_mode
    assert kind == ("a FIFO" if stat.S_ISFIFO(mode) else "a directory" if stat.S_ISDIR(mode) else "a file"), \
        "it was replaced"


def test_a_write_that_fails_leaves_no_temporary_file(tmp_path):
    folder = _folder(tmp_path / "out")
    with pytest.raises(IsADirectoryError):
        atomic_write(folder, b"a whole state")           # without files_only, the rename itself fails
    assert sorted(os.listdir(tmp_path)) == ["out"]
    atomic_write(tmp_path / "file", b"old")
    atomic_write(tmp_path / "file", b"new", files_only=True)
    assert (tmp_path / "file").read_bytes() == b"new" and sorted(os.listdir(tmp_path)) == ["file", "out"]


# --- the page's --listen ------------------------------------------------------------------------------------

@pytest.mark.parametrize("listen,says", [
    ("127.0.0.1:99999", "port 99999 is out of range (at most 65535)"),
    ("127.0.0.1:65536", "out of range"),
    ("127.0.0.1:８４２１", "expected HOST:PORT"),
    ("ü" + "a" * 70 + ":8421", "is not a host name or address"),
    ("127.0.0.1", "expected HOST:PORT"),
])
def test_a_listen_address_that_cannot_be_bound_is_refused_in_words(listen, says):
    with pytest.raises(ServeRefused, match=re.escape(says)):
        parse_listen(listen)


@pytest.mark.parametrize("listen,address", [("127.0.0.1:0", ("127.0.0.1", 0)), ("[::1]:65535", ("::1", 65535)),
                                            ("localhost:8421", ("localhost", 8421))])
def test_a_listen_address_that_can_be_bound_is_parsed(listen, address):
    assert parse_listen(listen) == address


# --- durations the loop could spin on --------------------------------------------------------------------

WORKER = "apiVersion: quantlab/v1\nkind: Worker\nid: w1\nhost: local\ncapabilities: {maxStrategies: 1, supportedApis: [x]}\n"


@pytest.mark.parametrize("fleet_doc,line,says", [
    ("reconcile: {intervalSeconds: 0.0001}", 3, "reconcile.intervalSeconds: 0.0001 is too small (must be at least 0.1)"),
    ("reconcile: {intervalSeconds: 1, probeDeadlineSeconds: 0.01}", 3,
     "reconcile.probeDeadlineSeconds: 0.01 is too small (must be at least 0.1)"),
    ("ssh: {connectTimeoutSeconds: 0.001}", 3, "ssh.connectTimeoutSeconds: 0.001 is too small (must be at least 0.1)"),
    ("ssh: {commandTimeoutSeconds: 0}", 3, "ssh.commandTimeoutSeconds: 0 is too small (must be at least 0.1)"),
])
def test_a_duration_below_a_tenth_of_a_second_is_refused(tmp_path, fleet_doc, line, says):
    (tmp_path / "workers.yaml").write_text(WORKER)
    (tmp_path / "fleet.yaml").write_text(f"apiVersion: quantlab/v1\nkind: Fleet\n{fleet_doc}\n")
    with pytest.raises(FleetInvalid) as info:
        load_fleet(tmp_path)
    assert [(p.line, p.message) for p in info.value.problems] == [(line, f"Fleet: {says}")], info.value.problems


def test_the_shortest_durations_allowed_and_those_the_tests_use_load(tmp_path):
    (tmp_path / "workers.yaml").write_text(WORKER)
    for doc in ("reconcile: {intervalSeconds: 0.1, probeDeadlineSeconds: 0.1}\n"
                "ssh: {connectTimeoutSeconds: 0.1, commandTimeoutSeconds: 0.1}",
                "reconcile: {intervalSeconds: 0.5, probeDeadlineSeconds: 0.5}\n"
                "monitor: {controllerRestartSeconds: 0.5, leaseTtlSeconds: 10}"):
        (tmp_path / "fleet.yaml").write_text(f"apiVersion: quantlab/v1\nkind: Fleet\n{doc}\n")
        assert load_fleet(tmp_path).settings.reconcile_interval_s in (0.1, 0.5)


def test_settings_a_state_remembers_never_spin_the_loop():
    remembered = FleetSettings.from_snapshot({"reconcileIntervalSeconds": 0.0001, "probeDeadlineSeconds": 0.00001})
    assert remembered.reconcile_interval_s == 0.1 and remembered.probe_deadline_s == 0.1
    assert FleetSettings.from_snapshot({"reconcileIntervalSeconds": 0.5}).reconcile_interval_s == 0.5
