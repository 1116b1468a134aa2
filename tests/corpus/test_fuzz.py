"""Generated hostile input (hypothesis) for the readers the corpus drives through the CLI: each
returns a valid result or raises its module's own clean error — the one the CLI turns into a message
(FleetInvalid for the fleet's files, StateError for the state and plan files, ValueError for a plan
file's content or --since) — and the host agent's readers of instance files never raise at all,
whatever the bytes. Nothing may hang: every example has a deadline.

Bounded to stay fast: 80 examples a property, each with a deadline."""
from __future__ import annotations

import json
import string
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from quantlab.host.agent.qlagent import fence, probe
from quantlab.host.agent.qlagent.base import HEARTBEAT_FIELDS, LEASE_FIELDS, check_fields, load_checked
from quantlab.host.agent.qlagent.procs import live_pid
from quantlab.core.memory import MemoryFormatError
from quantlab.core.plan import Plan
from quantlab.face.render import parse_since
from quantlab.core.spec import Fleet, FleetInvalid
from quantlab.core.spec.inputs import FleetFile, StrategyFile
from quantlab.core.spec.loader import build_fleet, parse_fleet
from quantlab.edges.eventlog import EventLog, event_problem
from quantlab.edges.store import StateError, StateStore
from quantlab.edges.checkpointstore import checked_checkpoint
from quantlab.edges.planfile import read_plan
from quantlab.face.web.server import ServeRefused, parse_listen
from tests.corpus.kit import FLEET_YAML, STRATEGIES_YAML, WORKERS_YAML

# A few milliseconds per example: the deadline is for a hang, with room for a busy machine.
FUZZ = settings(max_examples=80, deadline=5000,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# --- values --------------------------------------------------------------------------------------------

NAMES = ["apiVersion", "kind", "id", "host", "workdir", "strategyFile", "params", "requirements", "api",
         "capabilities", "maxStrategies", "supportedApis", "scheduling", "heartbeatMs", "desiredState",
         "reconcile", "intervalSeconds", "monitor", "leaseTtlSeconds", "policy", "metadata", "region"]
KEYS = st.one_of(st.sampled_from(NAMES), st.text(max_size=12))
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=40),
                    st.sampled_from(["quantlab/v1", "Worker", "Strategy", "Fleet", "local", "w1", "s1", "paper",
                                     "strategies/s1.mjs", "../x.mjs", "/etc/passwd", "-1", ".nan", "1e999"]))
JSON = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                     st.dictionaries(KEYS, inner, max_size=5)), max_leaves=25)
BASE_TEXT = FLEET_YAML + "---\n" + WORKERS_YAML.replace("../hosts", "/nonexistent") + "---\n" + STRATEGIES_YAML


@st.composite
def mutated(draw: st.DrawFn, text: str) -> bytes:
    """`text` with a few bytes inserted, replaced or removed at places hypothesis picks."""
    raw = text.encode()
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(raw)))
        cut = draw(st.integers(0, 8))
        put = draw(st.one_of(st.binary(max_size=8), st.sampled_from(
            [b"&a ", b"*a", b"\t", b"---\n", b"{", b"[", b"!!binary ", b"\xff", b": ", b"\n  ", b"<<: *a\n"])))
        raw = raw[:at] + put + raw[at + cut:]
    return raw


# --- the fleet's files -----------------------------------------------------------------------------------

def load(files: dict[str, bytes]) -> Fleet:
    """The loader on these YAML files (path -> bytes), every strategy file found and fine."""
    root = Path("/fleet")
    parsed = parse_fleet(root, [FleetFile(rel, f"{root}/{rel}", data=data) for rel, data in files.items()], [])
    found = {w: StrategyFile(path=root / w, rel=w, sha256="0" * 64) for w in parsed.strategy_files()}
    return build_fleet(parsed, found)


def loads_or_says_why(files: dict[str, bytes]) -> None:
    try:
        fleet = load(files)
    except FleetInvalid as exc:
        assert exc.problems, "FleetInvalid without a problem"
        for problem in exc.problems:
            assert problem.file.startswith("/fleet") and len(problem.message) <= 1000, problem
        return
    assert isinstance(fleet, Fleet)


@FUZZ
@given(st.text(max_size=400))
def test_fleet_loader_on_any_text(text):
    loads_or_says_why({"fleet.yaml": text.encode("utf-8", "surrogatepass")})


@FUZZ
@given(st.binary(max_size=400))
def test_fleet_loader_on_any_bytes(data):
    loads_or_says_why({"fleet.yaml": data})


@FUZZ
@example(b"")
@given(mutated(BASE_TEXT))
def test_fleet_loader_on_a_valid_fleet_with_a_few_bytes_changed(data):
    loads_or_says_why({"fleet.yaml": data})


@FUZZ
@given(st.lists(st.dictionaries(KEYS, JSON, max_size=8), min_size=1, max_size=3),
       st.sampled_from(["Strategy", "Worker", "Fleet"]))
def test_fleet_loader_on_documents_of_any_shape(documents, kind):
    for doc in documents:
        doc.setdefault("apiVersion", "quantlab/v1")
        doc.setdefault("kind", kind)
    try:
        text = yaml.safe_dump_all(documents, allow_unicode=True)
    except yaml.YAMLError:
        return
    loads_or_says_why({"extra.yaml": text.encode("utf-8", "surrogatepass"), "base.yaml": BASE_TEXT.encode()})


# --- the state file and plan files ---------------------------------------------------------------------------

STATE = {"version": 2, "lineage": "11111111-2222-3333-4444-555555555555", "serial": 3, "nextEpoch": 2,
         "placements": {"s1": {"worker": "w1", "epoch": 1, "specHash": "sha256:00", "placedAt": 1}},
         "leases": {"w1": 5}, "answered": {"w1": 1}, "lastSeen": {"w1": 1}, "addresses": {"w1": {"host": "local"}},
         "hostClocks": {"w1": {"bootId": "b", "boottime": 1.5, "at": 1}}, "restarts": {"s1": 0}}


def state_like():
    """The shape of a real state with some fields replaced by anything."""
    return st.dictionaries(st.sampled_from(sorted(STATE) + ["fleetSettings", "suspended", "retry", "reschedules",
                                                            "alerts", "controllerTerm", "migratedTo", "loopSource"]),
                           JSON, max_size=4).map(lambda over: {**STATE, **over})


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def read_state(scratch: Path, data: bytes) -> None:
    path = scratch / "state.json"
    path.write_bytes(data)
    path.chmod(0o600)
    try:
        StateStore(path).load()
    except StateError as exc:
        assert str(path) in str(exc), exc


@FUZZ
@given(st.binary(max_size=300))
def test_state_reader_on_any_bytes(scratch, data):
    read_state(scratch, data)


@FUZZ
@given(st.one_of(JSON, state_like()))
def test_state_reader_on_json_of_any_shape(scratch, value):
    read_state(scratch, json.dumps(value).encode())


@FUZZ
@example({**STATE, "clockBoot": "another-boot", "fleetSettings": {"monitor": "x"}})
@given(state_like())
def test_a_state_that_reads_can_be_judged_on_this_boot(value):
    from quantlab.core.memory import Memory

    try:
        memory = Memory.from_json(value)
    except (MemoryFormatError, OverflowError):
        return
    memory.rebase(10_000, "this-boot", 30.0)


PLAN = {"formatVersion": 1, "fleetHash": "sha256:00", "lineage": None, "stateSerial": 0, "policy": "load-based",
        "actions": [{"action": "start", "strategy": "s1", "worker": "w1", "reason": "new", "cause": "new", "epoch": 1,
                     "specHash": "sha256:00"}], "nextEpoch": 2}


def plan_like():
    action = st.dictionaries(st.sampled_from(["action", "strategy", "worker", "from", "to", "cause", "epoch",
                                              "specHash", "paused", "reason"]), JSON, max_size=3)
    return st.one_of(
        st.dictionaries(st.sampled_from(sorted(PLAN) + ["queued", "waiting", "blocked", "notes", "adopt"]), JSON,
                        max_size=3).map(lambda over: {**PLAN, **over}),
        action.map(lambda over: {**PLAN, "actions": [{**PLAN["actions"][0], **over}]}))


@FUZZ
@given(st.one_of(JSON, plan_like()))
def test_plan_decoder_refuses_with_a_value_error_or_round_trips(value):
    try:
        plan = Plan.from_json(value)
    except ValueError:
        return
    assert Plan.from_json(json.loads(json.dumps(plan.to_json()))) == plan


@FUZZ
@given(st.binary(max_size=300))
def test_plan_file_reader_on_any_bytes(scratch, data):
    path = scratch / "plan.json"
    path.write_bytes(data)
    try:
        read_plan(path)
    except StateError as exc:
        assert str(path) in str(exc)


# --- what hosts send and what people type ------------------------------------------------------------------

@FUZZ
@given(st.one_of(JSON, st.fixed_dictionaries({"files": st.dictionaries(st.text(max_size=10), JSON, max_size=3)},
                                             optional={"hash": JSON, "t": JSON})))
def test_a_checkpoint_from_a_host_is_kept_checked_or_refused(value):
    kept, why = checked_checkpoint(value)
    assert (kept is None) != (why is None)


@FUZZ
@given(JSON)
def test_any_event_is_judged(value):
    assert event_problem(value) is None or isinstance(event_problem(value), str)


@FUZZ
@given(st.lists(st.one_of(st.binary(max_size=60), JSON.map(lambda v: json.dumps(v).encode())), max_size=8))
def test_events_log_reader_skips_what_is_not_an_event(scratch, lines):
    path = scratch / "events.jsonl"
    path.write_bytes(b"\n".join(lines))
    log = EventLog(path)
    events = list(log.read())
    assert all(event_problem(e) is None for e in events)
    assert len(events) + log.skipped <= len([line for line in b"\n".join(lines).split(b"\n") if line.strip()])


@FUZZ
@example("1" + "0" * 400 + "d")
@example("0001-01-01T00:00:00")
@given(st.text(alphabet=string.digits + "smhd.-:+TZ ²٣", max_size=30))
def test_since_is_a_time_or_a_value_error_naming_the_option(text):
    try:
        assert isinstance(parse_since(text, 1_700_000_000_000), int)
    except ValueError as exc:
        assert "--since" in str(exc)


@FUZZ
@given(st.text(max_size=40))
def test_listen_is_an_address_or_refused(text):
    try:
        host, port = parse_listen(text)
    except ServeRefused as exc:
        assert "--listen" in str(exc)
        return
    assert 0 <= port <= 65535 and isinstance(host, str)


# --- the host agent's readers of an instance's files -----------------------------------------------------------

FILE_CONTENT = st.one_of(st.binary(max_size=200), JSON.map(lambda v: json.dumps(v).encode()),
                         st.dictionaries(st.sampled_from(sorted(HEARTBEAT_FIELDS) + sorted(LEASE_FIELDS) +
                                                         ["state", "restarts", "reason", "leaseTtlSeconds"]),
                                         JSON, max_size=6).map(lambda v: json.dumps(v).encode()))


def put(path: Path, data: bytes) -> None:
    if path.is_symlink() or path.exists():
        path.unlink()
    path.write_bytes(data)


@FUZZ
@given(FILE_CONTENT, FILE_CONTENT)
def test_agent_reads_heartbeat_and_lease_files_whatever_they_hold(scratch, beat, lease):
    folder = scratch / "instance"
    folder.mkdir(exist_ok=True)
    put(folder / "heartbeat.json", beat)
    put(folder / "lease.json", lease)
    problems: list[str] = []
    heard = probe.read_heartbeat(str(folder / "heartbeat.json"), problems)
    assert heard is None or isinstance(heard, dict)
    for name, fields in (("heartbeat.json", HEARTBEAT_FIELDS), ("lease.json", LEASE_FIELDS)):
        value, _, found = load_checked(str(folder / name), fields)
        assert value is None or set(value) <= set(fields)
        assert all(p.startswith(name + ": ") and isinstance(p, str) for p in found)
    assert all(isinstance(p, str) for p in problems)


@FUZZ
@given(FILE_CONTENT, FILE_CONTENT, FILE_CONTENT, st.binary(max_size=40), st.integers(-1, 2**40))
def test_agent_describes_an_instance_whatever_its_files_hold(scratch, status, beat, events, pid, since):
    folder = scratch / "described"
    folder.mkdir(exist_ok=True)
    for name, data in (("status.json", status), ("heartbeat.json", beat), ("lease.json", beat),
                       ("spec.json", status), ("events.log", events), ("supervisor.pid", pid), ("runner.pid", pid)):
        put(folder / name, data)
    described = probe.probe_instance(str(folder), "s1", since)
    json.dumps(described)                  # what the controller gets: JSON, whatever the files held
    assert isinstance(described["status"], str) and described["strategy"] == "s1"
    assert all(isinstance(p, str) and len(p) <= 200 for p in described.get("problems", []))


@FUZZ
@given(FILE_CONTENT, JSON)
def test_agent_fence_reads_any_file_and_any_request(scratch, stored, fenced):
    workdir = scratch / "fenced"
    (workdir / "agent").mkdir(parents=True, exist_ok=True)
    path = workdir / "agent" / fence.FENCE_FILE
    if path.exists():
        path.chmod(0o600)
    put(path, stored)
    seen = fence._read(str(path))
    assert all(isinstance(k, str) and isinstance(v, int) for k, v in seen.items())
    refusal, term = fence.admit(str(workdir), {"fence": fenced})
    assert refusal is None or isinstance(refusal, str)
    assert term is None or isinstance(term, int)


@FUZZ
@given(st.one_of(JSON, st.dictionaries(st.sampled_from(sorted(HEARTBEAT_FIELDS)), JSON, max_size=5)))
def test_agent_field_checks_on_any_value(value):
    clean, problems = check_fields(value, HEARTBEAT_FIELDS)
    assert clean is None or set(clean) <= set(HEARTBEAT_FIELDS)
    assert problems is not None and all(isinstance(p, str) for p in problems)


@FUZZ
@given(st.binary(max_size=60))
def test_agent_pid_files_whatever_they_hold(scratch, data):
    path = scratch / "some.pid"
    put(path, data)
    problems: list[str] = []
    pid = live_pid(str(path), problems)
    assert pid is None or isinstance(pid, int)
    assert all(p.startswith("some.pid: ") for p in problems)
