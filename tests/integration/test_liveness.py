"""Liveness on `local` workers: nothing holds the state lock while a person decides, and a step of the
controller's wall clock fails nothing over early (leases are judged on its boot-time clock)."""
from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import time

import pytest

from harness import PYTHON, REPO, cli_env, wait_for
from quantlab.edges.clock import Clock, wall_ms
from quantlab.app.controller import Controller, default_state_path
from quantlab.edges.hosts import Hosts, host_key
from quantlab.app.loop import ReconcileLoop
from quantlab.core.planner import PlanOptions
from quantlab.edges.transport.base import TransportError
from quantlab.edges.transport.local import LocalTransport


class Terminal:
    """`quantlab ARGS` with a pseudo-terminal on stdin and stdout, as a person runs it."""

    def __init__(self, *args: str):
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen([PYTHON, "-m", "quantlab", *args], stdin=slave, stdout=slave, stderr=slave,
                                     env=cli_env(), cwd=REPO, start_new_session=True)
        os.close(slave)
        self.text = ""

    def read_until(self, marker: str, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while marker not in self.text:
            left = deadline - time.monotonic()
            assert left > 0, f"no {marker!r} within {timeout:g}s; the terminal shows:\n{self.text}"
            ready, _, _ = select.select([self.master], [], [], left)
            if ready:
                try:
                    self.text += os.read(self.master, 4096).decode(errors="replace")
                except OSError:              # the other side closed
                    break
        return self.text

    def type(self, line: str) -> None:
        os.write(self.master, (line + "\n").encode())

    def finish(self, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            assert time.monotonic() < deadline, f"still running after {timeout:g}s:\n{self.text}"
            ready, _, _ = select.select([self.master], [], [], 0.1)
            if ready:
                try:
                    self.text += os.read(self.master, 4096).decode(errors="replace")
                except OSError:
                    pass
        return self.proc.returncode

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        os.close(self.master)


@pytest.fixture
def terminal():
    made: list[Terminal] = []

    def start(*args: str) -> Terminal:
        made.append(Terminal(*args))
        return made[-1]
    yield start
    for t in made:
        t.close()


def test_apply_asks_with_the_lock_released_and_acts_only_on_what_it_showed(fleet, terminal):
    fleet.worker("w1").strategy("solo").write()
    asking = terminal("apply", "--fleet", str(fleet.root))
    asking.read_until("Apply 1 action(s)?")
    # While the person decides, the loop keeps its lifeline: a reconcile takes the state lock (and,
    # here, starts the strategy itself).
    ran = fleet.ql("reconcile", "--once")
    assert "start solo w1: ok" in ran.stdout, ran.describe()
    asking.type("y")
    assert asking.finish() == 1
    assert "another run placed, moved or stopped strategies while apply waited" in asking.text, asking.text
    assert fleet.runner_counts() == {"solo": 1}

    # Nothing changed meanwhile: the plan shown is carried out.
    fleet.strategy("pair").write()
    again = terminal("apply", "--fleet", str(fleet.root))
    again.read_until("Apply 1 action(s)?")
    again.type("y")
    assert again.finish() == 0, again.text
    assert "Apply complete: 1 done, 0 failed." in again.text
    wait_for(lambda: fleet.runner_counts() == {"solo": 1, "pair": 1}, 15, what="both runners")


class Silent(LocalTransport):
    """A host that refuses every connection (nothing it is asked ever runs)."""

    def run(self, argv, stdin=b"", timeout=30.0):
        raise TransportError(self.name, "connection refused (test)")

    def open(self, argv, deadline):
        raise TransportError(self.name, "connection refused (test)")


def test_a_wall_clock_step_forward_fails_nothing_over_early(fleet):
    """The controller's wall clock jumps an hour ahead while a worker is silent: its strategy waits
    out the lease measured on the boot-time clock, instead of moving at once (two copies)."""
    fleet.worker("w1", user="silentops").worker("w2").strategy("solo").write()
    ctl = Controller(fleet.root, default_state_path(fleet.root))
    ctl._hosts = Hosts(ctl.load_fleet(), transport_factory=lambda key: LocalTransport())
    ReconcileLoop(ctl, log=lambda line: None).tick()
    placed = fleet.placement("solo")["worker"]
    ctl.close()

    stepped = Clock(wall=lambda: wall_ms() + 3_600_000)
    ctl = Controller(fleet.root, default_state_path(fleet.root), clock=stepped)
    loaded = ctl.load_fleet()
    silent = next(w for w in loaded.workers.values() if w.id == placed)
    ctl._hosts = Hosts(loaded, transport_factory=lambda key: Silent() if key == host_key(silent) else LocalTransport())
    with ctl.ledger.hold(loaded.settings.monitor.lease_ttl_s):
        gathered = ctl.renew(loaded)
        result = ctl.plan(loaded, ctl.ledger.memory, gathered, PlanOptions())
    ctl.close()
    assert not gathered.observed.workers[placed].reachable
    assert result.actions == (), result.actions
    [waiting] = result.waiting
    assert waiting.strategy == "solo" and waiting.worker == placed
    assert waiting.seconds_left is None or waiting.seconds_left > loaded.settings.monitor.lease_ttl_s / 2, waiting


# At its first beat, replaces its heartbeat file with valid JSON that is not an object, and never
# returns from st_heartbeat (so the runner does not write the file again).
HOSTILE_JS = r"""
import fs from 'node:fs';
export async function st_init(ctx) {}
export async function st_heartbeat(ctx) {
  fs.writeFileSync(process.env.QUANTLAB_HEARTBEAT_FILE + '.x', '[1, 2, 3]');
  fs.renameSync(process.env.QUANTLAB_HEARTBEAT_FILE + '.x', process.env.QUANTLAB_HEARTBEAT_FILE);
  setInterval(() => {}, 1000);
  await new Promise(() => {});
}
export async function st_exit(ctx) {}
"""


def test_a_hostile_heartbeat_file_is_its_instance_problem_alone(fleet):
    """Through the whole controller: the host still answers, the healthy strategy beside it keeps its
    runner, and `status`, `events` and a notice say what is wrong with the hostile one."""
    (fleet.root / "strategies" / "hostile.mjs").write_text(HOSTILE_JS)
    told = fleet.root.parent / "told.jsonl"
    script = fleet.root.parent / "notify.py"
    script.write_text("import sys\nopen(sys.argv[1], 'a').write(sys.stdin.read() + '\\n')\n")
    fleet.settings["notify"] = {"command": [PYTHON, str(script), str(told)]}
    fleet.worker("w1").strategy("calm").strategy("hostile", heartbeat_ms=3000, file="strategies/hostile.mjs",
                                                maxRestarts=0).write()
    fleet.apply()
    fleet.beating("calm")
    calm_pid = fleet.runner_pid("calm")
    wait_for(lambda: (h := fleet.read_json("hostile", "heartbeat.json")) is not None and isinstance(h, list), 20,
             what="the hostile heartbeat file")

    def said() -> dict | None:
        fleet.ql("reconcile", "--once", check=None)
        hostile = fleet.strategy_status("hostile")
        return hostile if hostile.get("problems") else None
    hostile = wait_for(said, 20, interval=0.2, what="status to show the hostile instance's problem")
    assert any("heartbeat.json" in p for p in hostile["problems"]), hostile
    status = fleet.status()
    worker = next(w for w in status["workers"] if w["id"] == "w1")
    assert worker["status"] == "busy" and worker["error"] is None, worker     # the host still answers
    calm = next(s for s in status["strategies"] if s["id"] == "calm")
    assert calm["status"] == "running" and calm["healthy"] and fleet.runner_pid("calm") == calm_pid, calm
    assert any(e.get("kind") == "instance-problem" and e.get("strategy") == "hostile"
               for e in fleet.events("--strategy", "hostile")), "no instance-problem event"
    notices = [json.loads(line) for line in told.read_text().splitlines()]
    assert any(n["kind"] == "instance-problem" and n["strategy"] == "hostile" for n in notices), notices


def test_a_new_lease_ttl_restarts_the_copies_started_with_another(fleet):
    """Each supervisor enforces the lease it was started with, so a changed leaseTtlSeconds is a
    restart in place (same epoch), after which nothing more is to do."""
    fleet.worker("w1").strategy("solo").write()
    fleet.apply()
    fleet.beating("solo", beats=1)
    before = (fleet.runner_pid("solo"), fleet.placement("solo")["epoch"])
    fleet.settings["monitor"]["leaseTtlSeconds"] = 200
    fleet.write()
    [action] = fleet.plan()["actions"]
    assert (action["action"], action["cause"]) == ("restart", "lease-changed"), action
    assert "leaseTtlSeconds 300 → 200" in action["reason"]
    fleet.apply()
    pid = wait_for(lambda: (p := fleet.runner_pid("solo")) not in (None, before[0]) and p, 15,
                   what="the copy restarted under the new lease")
    assert fleet.placement("solo")["epoch"] == before[1] and pid != before[0]
    assert json.loads((fleet.idir("solo") / "spec.json").read_text())["leaseTtlSeconds"] == 200
    fleet.beating("solo", beats=1)
    assert fleet.plan()["actions"] == []
