"""The state file, its lock, the events log and plan files: real files and real processes, no mocks.

Child processes come from tests/helpers/state_child.py (run as a script, or forked from here where
hundreds of them are needed). They report on a pipe; the test never sleeps to synchronise with
them, it waits for their lines with deadlines.
"""
from __future__ import annotations

import dataclasses

import importlib.util
import json
import os
import random
import re
import select
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import traceback
import uuid
from pathlib import Path
from typing import Callable

import pytest

from quantlab.core.memory import HostClock, Launched, Memory, Placement
from quantlab.core.plan import ACTIONS, Action, Adopt, Blocked, Note, Plan, Queued, Waiting
from quantlab.edges.checkpointstore import CheckpointStore
from quantlab.edges.eventlog import EventLog
from quantlab.edges.store import LockHeld, StateError, StateStore
from quantlab.edges.planfile import read_plan, write_plan

HELPER_PATH = Path(__file__).resolve().parents[1] / "helpers" / "state_child.py"
_spec = importlib.util.spec_from_file_location("quantlab_test_state_child", HELPER_PATH)
child = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(child)

TEMP_NAME = re.compile(r"^\.state\.json\.tmp-\d+$")


# --- helpers ----------------------------------------------------------------------------------------

@pytest.fixture
def open_umask():
    """A permissive umask, so only the code's own modes keep files private."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def full_memory() -> Memory:
    return Memory(
        placements={
            "grid-btc-sub1": Placement("grid-btc-sub1", "worker-003", 7, "sha256:aa11", paused=True,
                                       placed_at=1_700_000_000_123,
                                       launched=Launched(file="sha256:ff00", heartbeat_ms=60000,
                                                         params={"symbol": "BTCUSDT", "grid": [20, 24],
                                                                 "note": "résumé ✓"},
                                                         scheduling={"autoRestart": True, "maxRestarts": 5})),
            "trend-eth-01": Placement("trend-eth-01", "worker-002", 3, "sha256:bb22"),
        },
        leases={"worker-003": 1_700_000_000_500, "worker-002": 1_700_000_000_400},
        restarts={"grid-btc-sub1": 2, "trend-eth-01": 0},
        last_seen={"worker-003": 1_700_000_001_000, "worker-002": 1_700_000_000_900},
        answered={"worker-003": 81_000, "worker-002": 80_900},
        clock_boot="0d7a0f1e-5b7c-4c2e-9a53-4c1ea1b6d3c1",
        host_clocks={"worker-003": HostClock("host-boot", 8123.25, 80_950)},
        reschedules={"trend-eth-01": (2, 70_000)},
        rr_cursor="worker-003",
        next_epoch=8,
        loop_renewal=1_700_000_000_777,
        host_events={"worker-003": 1_700_000_000_600},
        addresses={"worker-003": {"host": "jp-box-1", "port": 22, "user": "quant", "workdir": ".quantlab/w"}},
    )


class Lines:
    """Lines from a child's pipe, read with deadlines (select on the raw fd, no buffering surprises)."""

    def __init__(self, fd: int):
        self.fd, self.buf, self.eof = fd, b"", False

    def next(self, timeout: float = 10.0) -> str | None:
        """The next line; None at end of file. Fails the test if none comes in time."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            if self.eof:
                assert self.buf == b"", f"child left a partial line: {self.buf!r}"
                return None
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no line from the child within {timeout}s (got so far: {self.buf!r})")
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                chunk = os.read(self.fd, 65536)
                self.eof = not chunk
                self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode()

    def rest(self, timeout: float = 10.0) -> list[str]:
        out, deadline = [], time.monotonic() + timeout
        while (line := self.next(max(0.0, deadline - time.monotonic()))) is not None:
            out.append(line)
        return out


class Holder:
    """A real `python state_child.py hold-lock` process holding the state lock until released."""

    def __init__(self, state: Path, command: str):
        self.proc = subprocess.Popen([sys.executable, str(HELPER_PATH), "hold-lock", str(state), command],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.lines = Lines(self.proc.stdout.fileno())
        first = self.lines.next(10)
        assert first == f"locked {self.proc.pid}", first
        self.pid = self.proc.pid

    def release(self) -> None:
        self.proc.stdin.close()          # the child holds the lock until its stdin closes

    def finish(self) -> int:
        return self.proc.wait(10)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if not pipe.closed:
                pipe.close()


@pytest.fixture
def holders():
    started: list[Holder] = []

    def start(state: Path, command: str = "quantlab apply --yes") -> Holder:
        h = Holder(state, command)
        started.append(h)
        return h

    yield start
    for h in started:
        h.kill()


# --- round trip, lineage, serial ----------------------------------------------------------------

def test_round_trip_under_the_lock_loads_back_equal(tmp_path):
    path = tmp_path / "state.json"
    store = StateStore(path)
    with store.lock():
        assert store.load() == Memory()          # no file yet: an empty memory
        saved = store.save(full_memory())
    assert saved.serial == 1
    assert uuid.UUID(saved.lineage)               # a real uuid, set on the first save
    loaded = StateStore(path).load()
    assert loaded == saved
    assert loaded.placements["grid-btc-sub1"].launched.params["grid"] == [20, 24]
    assert loaded.placements["trend-eth-01"].launched is None
    raw = json.loads(path.read_text())
    assert raw["version"] == 2 and raw["serial"] == 1 and raw["lineage"] == saved.lineage


def test_lineage_is_set_once_and_serial_counts_content_changes_exactly(tmp_path):
    path = tmp_path / "state.json"
    store = StateStore(path)
    with store.lock():
        store.load()
        first = store.save(Memory(restarts={"a": 1}))
        assert first.serial == 1
        lineage = first.lineage
        # A memory without a lineage (e.g. the caller kept the object it passed in) keeps the file's.
        second = store.save(Memory(restarts={"a": 2}))
        assert (second.serial, second.lineage) == (2, lineage)
        # The serial the caller passes in means nothing: the store counts.
        third = store.save(Memory(lineage=lineage, serial=99, restarts={"a": 3}))
        assert (third.serial, third.lineage) == (3, lineage)
    # A later run (a new store, a new lock) goes on from the file.
    later = StateStore(path)
    with later.lock():
        memory = later.load()
        assert (memory.serial, memory.lineage) == (3, lineage)
        memory.next_epoch += 1
        fourth = later.save(memory)
    assert (fourth.serial, fourth.lineage) == (4, lineage)
    assert StateStore(path).load() == fourth


def test_saving_unchanged_content_neither_bumps_the_serial_nor_rewrites_the_file(tmp_path):
    path = tmp_path / "state.json"
    store = StateStore(path)
    with store.lock():
        store.load()
        saved = store.save(full_memory())
        before, data = path.stat(), path.read_bytes()
        again = store.save(saved)
        assert again == saved
        assert store.save(saved.copy()).serial == 1
    other = StateStore(path)                     # also after a fresh load, in a later run
    with other.lock():
        loaded = other.load()
        assert other.save(loaded).serial == 1
        assert other.save(dataclasses.replace(loaded.copy(), serial=0)).serial == 1
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (before.st_ino, before.st_mtime_ns, before.st_size)
    assert path.read_bytes() == data


def test_file_is_0600_and_its_folder_is_created_even_with_a_permissive_umask(tmp_path, open_umask):
    path = tmp_path / "fleet" / ".quantlab" / "state.json"
    store = StateStore(path)
    with store.lock():
        store.load()
        memory = store.save(full_memory())
        assert mode_of(path) == 0o600
        memory.restarts["grid-btc-sub1"] += 1
        store.save(memory)                        # a replacement keeps the mode
    assert mode_of(path) == 0o600
    assert mode_of(store.lock_path) == 0o600
    assert mode_of(path.parent) & 0o077 == 0      # the state folder is private too
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".state.json.tmp")] == []


# --- refusals ------------------------------------------------------------------------------------

VALID = {"version": 1, "lineage": "1b4e28ba-2fa1-11d2-883f-0016d3cca427", "serial": 3, "nextEpoch": 2,
         "placements": {"a": {"worker": "w1", "epoch": 1, "specHash": "sha256:00"}}}

REFUSED = {
    "corrupt-json": (b'{\n "version": 1,\n "serial": 3,\n oops\n}\n', [":4:", "not valid JSON", "backup"]),
    "truncated-json": (json.dumps(VALID, indent=1).encode()[:40], ["not valid JSON"]),
    "unknown-version": (json.dumps({**VALID, "version": 4}).encode(), ["unknown state format version 4"]),
    "no-version": (json.dumps({"serial": 3}).encode(), ["unknown state format version None"]),
    "array": (b"[1, 2, 3]\n", ["expected a JSON object"]),
    "string": (b'"state"\n', ["expected a JSON object"]),
    "placement-missing-epoch": (json.dumps({**VALID, "placements": {"a": {"worker": "w1", "specHash": "x"}}}).encode(),
                                ["malformed state", "epoch"]),
    "placement-not-object": (json.dumps({**VALID, "placements": {"a": 5}}).encode(), ["malformed state"]),
    "placements-a-list": (json.dumps({**VALID, "placements": [{"worker": "w1"}]}).encode(), ["malformed state"]),
    "placement-bad-epoch": (json.dumps({**VALID, "placements": {"a": {"worker": "w", "epoch": "seven",
                                                                       "specHash": "x"}}}).encode(),
                            ["malformed state"]),
    "serial-infinite": (json.dumps(VALID).replace('"serial": 3', '"serial": 1e999').encode(), ["left untouched"]),
    "not-utf8": (b'{"version": 1, "lineage": "\xff\xfe"}', ["left untouched"]),
    "deeply-nested": (b"[" * 100_000 + b"]" * 100_000, ["left untouched"]),
}


@pytest.mark.parametrize("content,expected", REFUSED.values(), ids=REFUSED.keys())
def test_a_file_this_version_cannot_read_is_refused_and_left_byte_for_byte(tmp_path, content, expected):
    path = tmp_path / "state.json"
    path.write_bytes(content)
    path.chmod(0o600)
    before = path.stat()
    store = StateStore(path)
    with pytest.raises(StateError) as info:
        store.load()
    message = str(info.value)
    assert message.startswith(str(path))
    assert "move it away" in message          # what to do
    for words in expected:
        assert words in message, message
    # Nothing can overwrite it afterwards either, not even a save under the lock.
    with store.lock():
        with pytest.raises(StateError, match="left untouched"):
            store.save(Memory(restarts={"x": 1}))
    assert path.read_bytes() == content
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns, stat.S_IMODE(after.st_mode)) == \
        (before.st_ino, before.st_mtime_ns, 0o600)


def test_a_world_writable_state_file_is_refused_and_left_byte_for_byte(tmp_path):
    path = tmp_path / "state.json"
    content = json.dumps(VALID).encode()
    path.write_bytes(content)
    path.chmod(0o666)
    store = StateStore(path)
    with pytest.raises(StateError) as info:
        store.load()
    message = str(info.value)
    assert message.startswith(str(path))
    assert "world-writable" in message and f"chmod 600 {path}" in message
    with store.lock():
        with pytest.raises(StateError):
            store.save(Memory(restarts={"x": 1}))
    assert path.read_bytes() == content and mode_of(path) == 0o666
    path.chmod(0o600)                             # once fixed as the message says, it loads
    assert store.load().serial == 3


def test_a_save_takes_the_write_lock_and_never_overwrites_what_another_process_wrote(tmp_path):
    """Writing needs only the short write lock (a daemon renewing while `apply` acts), and a store
    never writes over a file it did not read last: the other process's change would be lost."""
    path = tmp_path / "state.json"
    first, second = StateStore(path), StateStore(path)
    first.load()
    second.load()
    saved = first.save(full_memory())                   # takes the write lock itself
    with pytest.raises(StateError, match="not the one this run read"):
        second.save(Memory(restarts={"x": 1}))
    assert json.loads(path.read_text())["serial"] == saved.serial
    again = second.load()
    assert second.save(dataclasses.replace(again, restarts={"x": 1})).serial == saved.serial + 1
    with first.writing():                               # held for a write: the other waits, bounded
        started = time.monotonic()
        with pytest.raises(StateError, match="write lock"):
            with second.writing(timeout=0.2):
                pass
        assert time.monotonic() - started < 5
    assert mode_of(second.write_lock_path) == 0o600

def test_a_save_never_overwrites_a_version_it_did_not_read(tmp_path):
    path = tmp_path / "state.json"
    first = StateStore(path)
    with first.lock():
        first.load()
        first.save(Memory(restarts={"a": 1}))
    stale, fresh = StateStore(path), StateStore(path)
    stale_memory = stale.load()                       # read, then someone else writes
    with fresh.lock():
        memory = fresh.load()
        memory.restarts["a"] = 2
        assert fresh.save(memory).serial == 2
    data = path.read_bytes()
    with stale.lock():
        stale_memory.restarts["b"] = 1
        with pytest.raises(StateError, match="changed by another process") as info:
            stale.save(stale_memory)                  # would reuse serial 2 for different content
        assert str(path) in str(info.value)
        assert stale.load().serial == 2               # reading again makes it usable
        stale_memory = stale.load()
        stale_memory.restarts["b"] = 1
        assert stale.save(stale_memory).serial == 3
    never_loaded = StateStore(path)
    with never_loaded.lock():
        with pytest.raises(StateError):
            never_loaded.save(Memory(restarts={"fresh": 1}))
    assert StateStore(path).load().serial == 3
    assert path.read_bytes() != data


# --- the lock ------------------------------------------------------------------------------------

def test_lock_held_by_another_process_fails_at_once_naming_the_holder(tmp_path, holders):
    path = tmp_path / "state.json"
    before = time.time()
    holder = holders(path, "quantlab reconcile --once")
    after = time.time()
    t0 = time.monotonic()
    with pytest.raises(LockHeld) as info:
        with StateStore(path).lock():
            pytest.fail("took a lock another process holds")
    elapsed = time.monotonic() - t0
    assert elapsed < 0.5, f"took {elapsed:.3f}s to refuse"
    message = str(info.value)
    assert message.startswith(str(path))
    assert f"pid {holder.pid}" in message
    assert f"on {socket.gethostname()}" in message
    assert "quantlab reconcile --once" in message
    assert "--lock-timeout" in message
    since = re.search(r"since (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)", message)
    assert since, message
    started = time.mktime(time.strptime(since.group(1), "%Y-%m-%d %H:%M:%S"))
    assert before - 1 <= started <= after + 1
    assert isinstance(info.value, StateError)        # callers that catch StateError see it too
    holder.release()
    assert holder.lines.next() == "released" and holder.finish() == 0


def test_lock_timeout_shorter_than_the_hold_fails_after_about_that_time(tmp_path, holders):
    path = tmp_path / "state.json"
    holder = holders(path)
    t0 = time.monotonic()
    with pytest.raises(LockHeld) as info:
        with StateStore(path).lock(timeout=0.6):
            pytest.fail("took a lock another process holds")
    elapsed = time.monotonic() - t0
    assert 0.55 <= elapsed < 1.5, elapsed
    assert "after waiting 0.6s" in str(info.value) and f"pid {holder.pid}" in str(info.value)
    assert holder.proc.poll() is None                 # the holder was not disturbed


def test_lock_timeout_waits_and_succeeds_once_the_holder_releases(tmp_path, holders):
    path = tmp_path / "state.json"
    holder = holders(path)
    result: dict[str, object] = {}
    started = threading.Event()

    def waiter() -> None:
        store = StateStore(path)
        started.set()
        try:
            with store.lock(timeout=20):
                result["acquired_at"] = time.monotonic()
                memory = store.load()
                memory.restarts["after-wait"] = 1
                result["saved"] = store.save(memory)
        except BaseException as exc:               # reported to the main thread
            result["error"] = exc

    thread = threading.Thread(target=waiter, daemon=True)
    thread.start()
    assert started.wait(10)
    # While the child holds it the waiter keeps waiting (checked for a while, against a deadline).
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline:
        assert not result, result
        time.sleep(0.02)
    released_at = time.monotonic()
    holder.release()
    thread.join(20)
    assert not thread.is_alive(), "still waiting after the holder released"
    assert "error" not in result, result.get("error")
    assert result["acquired_at"] >= released_at
    assert result["acquired_at"] - released_at < 2.0
    assert result["saved"].serial == 1
    assert holder.lines.next() == "released" and holder.finish() == 0
    # The lock file now names this process.
    assert json.loads(StateStore(path).lock_path.read_text())["pid"] == os.getpid()


def test_a_killed_holder_leaves_no_stale_lock(tmp_path, holders):
    path = tmp_path / "state.json"
    holder = holders(path)
    holder.proc.send_signal(signal.SIGKILL)
    assert holder.finish() == -signal.SIGKILL
    t0 = time.monotonic()
    with StateStore(path).lock():
        pass
    assert time.monotonic() - t0 < 0.3


def test_a_nested_lock_attempt_fails_without_dropping_the_outer_lock(tmp_path):
    path = tmp_path / "state.json"
    store = StateStore(path)
    with store.lock():
        store.load()
        with pytest.raises(LockHeld, match=f"pid {os.getpid()}"):
            with store.lock():
                pytest.fail("flock is not reentrant across open files")
        assert store.save(Memory(restarts={"a": 1})).serial == 1


# --- crash safety --------------------------------------------------------------------------------

Spawned = tuple[int, int, Callable[[], int], Callable[[], None]]   # pid, output fd, wait, close


def fork_writer(path: Path) -> Spawned:
    """A forked child running the helper's write loop: as real as a spawned one, and fast to start."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:                                   # the child: never return into pytest
        code = 0
        try:
            os.close(read_end)
            child.write_loop(str(path), write_end)
        except BaseException:
            traceback.print_exc()
            code = 3
        finally:
            os._exit(code)
    os.close(write_end)

    def wait() -> int:
        _, status = os.waitpid(pid, 0)
        return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    return pid, read_end, wait, lambda: os.close(read_end)


def spawn_writer(path: Path) -> Spawned:
    """The helper script as a new python process."""
    proc = subprocess.Popen([sys.executable, str(HELPER_PATH), "write-loop", str(path)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    return proc.pid, proc.stdout.fileno(), lambda: proc.wait(10), proc.stdout.close


def kill_writers_at_random(path: Path, rounds: int, rng: random.Random, spawn, max_delay: float) -> dict:
    stats = {"in_flight": 0, "landed_unreported": 0, "temps": 0}
    lineage = key = None
    for round_no in range(rounds):
        pid, fd, wait, close = spawn(path)
        lines, status = Lines(fd), None
        try:
            ready = lines.next()
            assert ready is not None and ready.startswith("ready "), ready
            start = int(ready.split()[1])
            time.sleep(rng.uniform(0.0, max_delay))   # the random moment of the kill
            os.kill(pid, signal.SIGKILL)
            status = wait()
            assert status == -signal.SIGKILL, f"round {round_no}: the writer ended on its own ({status})"
            reported = lines.rest()
        finally:
            if status is None:                        # a failed check: never leave a writer running
                os.kill(pid, signal.SIGKILL)
                wait()
            close()
        # What the child said: "about N" then "wrote N", strictly in order from start + 1.
        wrote = about = start
        for line in reported:
            kind, n = line.split()
            if kind == "about":
                assert int(n) == wrote + 1 == about + 1, (round_no, reported)
                about = int(n)
            else:
                assert kind == "wrote" and int(n) == about, (round_no, reported)
                wrote = int(n)
        allowed = {wrote} | ({about} if about == wrote + 1 else set())
        memory = StateStore(path).load()             # must parse, whatever the moment of the kill
        found = memory.restarts.get("counter", 0)
        assert found in allowed, f"round {round_no}: file holds version {found}, child reported {reported}"
        if found:
            # The lease key is made once, with the lineage, and kept by every version after.
            assert memory == dataclasses.replace(child.version(found, lineage=memory.lineage, serial=found),
                                                 lease_key=memory.lease_key)
            lineage, key = lineage or memory.lineage, key or memory.lease_key
            assert memory.lineage == lineage and memory.lease_key == key is not None
        stats["in_flight"] += about == wrote + 1
        stats["landed_unreported"] += found == about != wrote
        # Only the state, its two locks and temp files the loader never reads.
        others = sorted(set(os.listdir(path.parent)) - {"state.json", "state.json.lock", "state.json.writing"})
        assert all(TEMP_NAME.match(name) for name in others), others
        stats["temps"] = len(others)
        stats["last"] = found
    return stats


def check_after_the_crashes(path: Path) -> None:
    store = StateStore(path)
    with store.lock():
        memory = store.load()
        last = memory.restarts["counter"]
        # A temp file holding a "newer" state is never taken for the state.
        decoy = path.with_name(".state.json.tmp-999999999")
        decoy.write_text(json.dumps(child.version(last + 100, memory.lineage, last + 100).to_json()))
        assert store.load().restarts["counter"] == last
        saved = store.save(child.version(last + 1, lineage=memory.lineage))
    assert saved.serial == last + 1
    assert StateStore(path).load() == saved


@pytest.mark.slow
def test_a_writer_killed_at_random_moments_leaves_the_last_or_the_next_version(tmp_path):
    path = tmp_path / "state.json"
    rng = random.Random(20_240_611)
    t0 = time.monotonic()
    spawned = kill_writers_at_random(path, 20, rng, spawn_writer, max_delay=0.02)   # new python processes
    forked = kill_writers_at_random(path, 230, rng, fork_writer, max_delay=0.012)   # forked: fast to start
    elapsed = time.monotonic() - t0
    # The kills did land while a write was in flight (most of a writer's time is spent saving).
    assert forked["in_flight"] >= 50 and forked["landed_unreported"] >= 5, forked
    # Most of the 230 writers got a version in before their kill (168 on a machine at load 8, ~220 idle).
    assert forked["last"] > 115, forked
    check_after_the_crashes(path)
    assert elapsed < 60, f"{elapsed:.1f}s"      # about 5s here; only a pathological slowdown fails
    print(f"250 kills in {elapsed:.1f}s: {spawned} {forked}")


# --- the events log ------------------------------------------------------------------------------

def test_events_round_trip_in_order(tmp_path, open_umask):
    log = EventLog(tmp_path / "events.jsonl")
    events = [{"t": 1, "type": "start", "strategy": "grid-btc", "worker": "worker-003"},
              {"t": 2, "type": "fault", "reason": "worker offline — lease 2m10s ✓", "nested": {"a": [1, 2]}},
              {"t": 3, "type": "stop"}]
    for event in events:
        log.append(event)
    assert list(log.read()) == events
    assert list(EventLog(tmp_path / "events.jsonl").read()) == events
    assert mode_of(tmp_path / "events.jsonl") == 0o600
    assert list(EventLog(tmp_path / "none.jsonl").read()) == []


@pytest.mark.parametrize("keep", [1, 3])
def test_events_rotate_at_the_size_cap_and_keep_that_many_files(tmp_path, open_umask, keep):
    path = tmp_path / "logs" / "events.jsonl"
    cap = 300
    log = EventLog(path, max_bytes=cap, keep=keep)
    appended = []
    for n in range(120):
        event = {"n": n, "pad": "x" * (n % 23)}
        line_len = len(json.dumps(event, sort_keys=True)) + 1
        size_before = path.stat().st_size if path.exists() else 0
        first_rotated = path.with_name("events.jsonl.1")
        had_rotated = first_rotated.read_bytes() if first_rotated.exists() else None
        log.append(event)
        appended.append(event)
        if size_before and size_before + line_len > cap:          # over the cap: rotated first
            assert path.stat().st_size == line_len
            assert first_rotated.stat().st_size == size_before
        else:                                                        # under it: appended in place
            assert path.stat().st_size == size_before + line_len
            assert (first_rotated.read_bytes() if first_rotated.exists() else None) == had_rotated
        assert path.stat().st_size <= cap
    rotated = [path.with_name(f"events.jsonl.{i}") for i in range(1, keep + 1)]
    assert all(p.exists() for p in rotated)
    assert not path.with_name(f"events.jsonl.{keep + 1}").exists()
    assert sorted(os.listdir(path.parent)) == sorted(["events.jsonl"] + [p.name for p in rotated])
    for file in rotated + [path]:
        assert mode_of(file) == 0o600
        assert file.stat().st_size <= cap
    got = list(log.read())                                           # oldest first, across files
    lines_on_disk = sum(len(f.read_bytes().splitlines()) for f in rotated + [path])
    assert len(got) == lines_on_disk < len(appended)
    assert got == appended[-len(got):]


def test_an_event_bigger_than_the_cap_does_not_rotate_an_empty_file(tmp_path):
    path = tmp_path / "events.jsonl"
    log = EventLog(path, max_bytes=50, keep=1)
    log.append({"n": 1})
    log.append({"n": 2, "pad": "z" * 40})        # rotates: {"n": 1} goes to events.jsonl.1
    path.write_bytes(b"")                         # emptied (e.g. truncated by an operator's logrotate)
    big = {"type": "fault", "detail": "y" * 200}
    log.append(big)                               # too big for any file, but the empty one is not rotated
    assert path.with_name("events.jsonl.1").read_bytes() == b'{"n": 1}\n'
    assert list(log.read()) == [{"n": 1}, big]
    log.append({"type": "small"})                 # the big one fills the file: now it rotates
    assert list(log.read()) == [big, {"type": "small"}]
    assert sorted(os.listdir(tmp_path)) == ["events.jsonl", "events.jsonl.1"]


def test_corrupt_event_lines_are_skipped(tmp_path):
    path = tmp_path / "events.jsonl"
    log = EventLog(path)
    log.append({"n": 1})
    cut = (json.dumps({"reason": "café"}, ensure_ascii=False) + "\n").encode()
    with open(path, "ab") as handle:
        handle.write(b'{"n": "truncated\n')
        handle.write(b"\xff\xfe\x00 not text\n")
        handle.write(cut[: cut.index("é".encode()) + 1] + b"\n")    # cut inside a UTF-8 character
        handle.write(b"42\n[1, 2]\n\n")                                # JSON, but not an event
    log.append({"n": 2})
    assert list(log.read()) == [{"n": 1}, {"n": 2}]


# --- plan files ----------------------------------------------------------------------------------

def every_kind_of_plan() -> Plan:
    actions = (
        Action("start", "grid-btc", "new in the fleet", "new", worker="worker-003", epoch=8,
               spec_hash="sha256:01"),
        Action("stop", "old-arb", "removed from fleet", "removed", worker="worker-005", epoch=2),
        Action("restart", "trend-eth", "params changed: grid 20 → 24", "spec-changed", worker="worker-002",
               epoch=9, spec_hash="sha256:02", paused=True),
        Action("move", "mart-sol", "worker-001 offline 2m10s", "worker-offline", source="worker-001",
               target="worker-004", epoch=10, spec_hash="sha256:03"),
        Action("pause", "scalp-bnb", "desired paused", "desired-paused", worker="worker-006", epoch=4),
        Action("resume", "scalp-eth", "desired running", "desired-running", worker="worker-006", epoch=5),
    )
    assert {a.action for a in actions} == set(ACTIONS)
    return Plan(
        actions=actions,
        queued=(Queued("arb-futu-eu", "no worker fits: region EU",
                       (("worker-007", "api: lacks futu"), ("worker-008", "capacity: full (4/4)"))),
                Queued("lonely", "no workers")),
        waiting=(Waiting("scalp-ada", "worker-006", "offline 50s; lease may live 2m10s more", 130.5),
                 Waiting("scalp-dot", "worker-006", "unreachable", None)),
        blocked=(Blocked("mass-stop", "would stop 3 of 4 running strategies; pass --allow-mass-stop",
                         (Action("stop", "a", "removed", "removed", worker="w1", epoch=1),
                          Action("stop", "b", "removed", "removed", worker="w2", epoch=2))),),
        notes=(Note("grid-btc", "worker-003", "in error after 5 restarts"), Note("drain", None, "stuck")),
        adopt=(Adopt("orphan", "worker-009", 3, "sha256:04"), Adopt("orphan-2", "worker-009", 4, None)),
        fleet_hash="sha256:fleet", fleet_revision="3f9c2ab", fleet_dirty=True,
        lineage="1b4e28ba-2fa1-11d2-883f-0016d3cca427", state_serial=41,
        rr_cursor="worker-004", next_epoch=11, policy="round-robin",
    )


def test_plan_file_round_trip(tmp_path, open_umask):
    plan = every_kind_of_plan()
    path = tmp_path / "plans" / "next.plan.json"
    write_plan(path, plan)
    assert mode_of(path) == 0o600
    assert read_plan(path) == plan
    assert read_plan(str(path)) == plan
    write_plan(path, Plan())                       # overwriting an existing plan file
    assert read_plan(path) == Plan()
    assert mode_of(path) == 0o600


GARBAGE_PLANS = {
    "text": b"this is not a plan\n",
    "empty": b"",
    "not-utf8": b"\xff\xfe\x00\x01",
    "array": b"[1, 2, 3]",
    "number": b"42",
    "state-file": json.dumps(VALID).encode(),
    "future-version": b'{"formatVersion": 99}',
    "unknown-action": b'{"formatVersion": 1, "actions": [{"action": "explode", "strategy": "x"}]}',
    "action-not-object": b'{"formatVersion": 1, "actions": [5]}',
    "queued-without-strategy": b'{"formatVersion": 1, "queued": [{"reason": "x"}]}',
    "bad-adopt-epoch": b'{"formatVersion": 1, "adopt": [{"strategy": "s", "worker": "w", "epoch": "x"}]}',
    "infinite-serial": b'{"formatVersion": 1, "stateSerial": 1e999}',
}


@pytest.mark.parametrize("content", GARBAGE_PLANS.values(), ids=GARBAGE_PLANS.keys())
def test_reading_garbage_as_a_plan_raises_a_clear_state_error(tmp_path, content):
    path = tmp_path / "plan.json"
    path.write_bytes(content)
    with pytest.raises(StateError) as info:
        read_plan(path)
    message = str(info.value)
    assert message.startswith(f"{path}: not a quantlab plan file")
    assert "quantlab plan --out FILE" in message
    assert path.read_bytes() == content


def test_reading_a_missing_or_unreadable_plan_raises_a_clear_state_error(tmp_path):
    with pytest.raises(StateError, match="plan file not found"):
        read_plan(tmp_path / "nope.json")
    with pytest.raises(StateError, match="is a directory"):
        read_plan(tmp_path)                        # a folder
    fifo = tmp_path / "plan.fifo"
    os.mkfifo(fifo)                                # nobody ever writes to it: an open would block
    with pytest.raises(StateError, match="is a FIFO, not a regular file"):
        read_plan(fifo)
    with pytest.raises(StateError, match="is a character device"):
        read_plan(Path("/dev/zero"))               # never ends


def test_a_state_file_that_is_not_a_regular_file_is_refused_without_hanging(tmp_path):
    fifo = tmp_path / "state.json"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(StateError, match="is a FIFO, not a regular file.*move it away"):
        StateStore(fifo).load()
    lock = tmp_path / "other.json.lock"
    os.mkfifo(lock, 0o600)
    with pytest.raises(StateError, match="not a regular file"):
        with StateStore(tmp_path / "other.json").lock():
            pass


def test_checkpoints_of_strategies_gone_are_kept_for_the_retention_then_removed(tmp_path):
    folder = tmp_path / "checkpoints"
    store = CheckpointStore(folder)
    for sid in ("gone", "back", "kept"):
        store.save(sid, {"files": {}, "t": 0})
        os.utime(folder / f"{sid}.json", (1, 1))       # written long ago: that alone removes nothing
    now = time.time()
    week = 7 * 86400
    assert store.prune({"kept"}, now, week) == []        # first found gone: the week starts now
    assert sorted(p.name for p in folder.glob("*.gone")) == ["back.gone", "gone.gone"]
    assert store.prune({"kept", "back"}, now + week + 60, week) == ["gone"]   # `back` came back in time
    assert sorted(p.name for p in folder.iterdir()) == ["back.json", "kept.json"]
    assert store.prune(set(), now, week) == [] and store.prune(set(), now + week + 1, week) == ["back", "kept"]
    assert list(folder.iterdir()) == []
    assert CheckpointStore(tmp_path / "nowhere").prune(set(), now, week) == []


def test_a_suspension_is_saved_as_format_3_so_the_previous_release_refuses_the_file(tmp_path):
    path = tmp_path / "state.json"
    store = StateStore(path)
    with store.lock():
        store.load()
        memory = full_memory()
        memory.suspended = {"*": {"by": "ops@desk stop-all", "reason": "incident", "at": 1, "stopAll": True}}
        memory.rebalanced_at, memory.rebalanced = 5, ["s-1"]
        saved = store.save(memory)
    raw = json.loads(path.read_text())
    assert raw["version"] == 3 and raw["suspended"]["*"]["stopAll"] is True
    assert StateStore(path).load() == saved
    with store.lock():
        store.load()
        saved.suspended = {}
        store.save(saved)
    assert json.loads(path.read_text())["version"] == 2        # resumed: readable by the previous release again


def test_a_checkpoint_from_a_host_is_checked_before_it_is_kept():
    import base64
    import zlib

    from quantlab.edges.checkpointstore import CHECKPOINT_EXPANDED_CAP, checked_checkpoint

    def packed(files: dict[str, bytes], **extra) -> dict:
        return {"files": {k: base64.b64encode(zlib.compress(v)).decode() for k, v in files.items()}, "t": 1, **extra}

    def problem(checkpoint) -> str | None:
        return checked_checkpoint(checkpoint)[1]

    good = packed({"state.json": b'{"beats": 3}', "a/b.json": b"{}"}, hash="sha256:" + "0" * 64, extra="x" * 100)
    kept, why = checked_checkpoint(good)
    assert why is None and set(kept) == {"files", "hash", "t"} and kept["hash"] == good["hash"]
    assert checked_checkpoint(packed({"s": b"x"}, hash=["not", "a", "hash"]))[0]["hash"] is None
    bomb = packed({"state.json": b"\0" * (CHECKPOINT_EXPANDED_CAP + 1)})        # ~64 KiB compressed
    assert "decompressed" in problem(bomb)
    assert "bad entry" in problem(packed({"../escape": b"x"}))
    assert "bad entry" in problem(packed({"a": b"x", "./a": b"y"}))             # the same file twice
    assert "both a file and a folder" in problem(packed({"a": b"x", "a/b": b"y"}))
    assert "not base64" in problem({"files": {"a": "!!"}})
    assert "not zlib" in problem({"files": {"a": base64.b64encode(b"plain").decode()}})
    truncated = base64.b64encode(zlib.compress(b"x" * 1000)[:-4]).decode()
    assert "incomplete" in problem({"files": {"a": truncated}})
    assert problem({"files": []}) == "not a checkpoint"


def test_a_plan_file_with_an_unknown_cause_is_refused(tmp_path):
    """Causes are a closed set: execute and the guards decide by them, so a plan file naming one this
    release does not know is refused, never carried out by guesswork (as Terraform's planfile decoder)."""
    from quantlab.core.plan import Action, Plan
    from quantlab.edges.store import StateError
    from quantlab.edges.planfile import read_plan, write_plan

    path = tmp_path / "next.plan.json"
    write_plan(path, Plan(actions=(Action("stop", "a", "removed", "removed", worker="w", epoch=1),)))
    path.write_text(path.read_text().replace('"cause": "removed"', '"cause": "tidy-up"'))
    with pytest.raises(StateError, match="unknown cause 'tidy-up'"):
        read_plan(path)


def test_what_a_placement_was_launched_with_is_read_tolerantly():
    """A typed record the core reads by attribute; a field of another shape (an older or newer
    release, a hand edit) is left out instead of failing the state."""
    raw = {"file": "sha256:ab", "params": {"grid": 3}, "heartbeatMs": True, "scheduling": "fast",
           "account": 7, "worker": {"proxy": None}, "somethingNew": 1}
    launched = Launched.from_json(raw)
    assert launched == Launched(file="sha256:ab", params={"grid": 3}, worker={"proxy": None})
    assert launched.stop_timeout_s == 0.0 and Launched.from_json("garbage") is None
    assert Launched(scheduling={"stopTimeoutSeconds": 12}).stop_timeout_s == 12.0
    assert Launched.from_json(launched.to_json()) == launched


def test_a_save_writes_each_placement_as_it_is_now_while_unchanged_ones_are_encoded_once(tmp_path, monkeypatch):
    """The file's text is an entry per line, each placement's JSON kept from the save before when the
    placement is the same record (a memory copied for a change shares those it did not replace)."""
    from quantlab.core.memory import Memory, Placement
    from quantlab.edges import store as store_module
    from quantlab.edges.store import StateStore

    store = StateStore(tmp_path / "state.json")
    memory = Memory()
    for n in range(3):
        memory.placements[f"s{n}"] = Placement(f"s{n}", f"w{n}", n + 1, "sha256:" + "0" * 64)
    with store.lock():
        memory = store.save(memory)
    encoded = []
    real = store_module._ENTRY_ENCODER.encode
    monkeypatch.setattr(store_module, "_ENTRY_ENCODER",
                        type("Spy", (), {"encode": staticmethod(lambda v: encoded.append(v) or real(v))})())
    changed = memory.copy()
    changed.placements["s1"] = dataclasses.replace(changed.placements["s1"], worker="w9", epoch=7)
    with store.lock():
        store.save(changed)
    on_disk = json.loads((tmp_path / "state.json").read_text())
    assert on_disk["placements"]["s1"]["worker"] == "w9" and on_disk["placements"]["s1"]["epoch"] == 7
    assert on_disk["placements"]["s0"]["worker"] == "w0"
    assert on_disk == {**changed.content_json(), "serial": 2}
    assert [v for v in encoded if isinstance(v, dict) and "specHash" in v] == [changed.placements["s1"].to_json()]
    assert (tmp_path / "state.json").read_text().count("\n") > 10, "not an entry per line"
