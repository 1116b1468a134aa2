"""Containment: nothing a strategy starts outlives it.

The strategy below spawns, in st_heartbeat, three children whose argv[0] carries a marker (the test's
tmp dir, a kind, and the pid of the runner that started them): a plain child, a detached one (node
calls setsid for it) and a double-forked grandchild (`bash -c "(exec -a MARK sleep 1000) &"`, whose
parent exits at once). Every life writes, first thing in st_init, the marked processes it finds still
alive: those would be a previous life's leftovers, running beside it.

The agent is driven directly (see test_agent_hostile.py for `AgentHost`); `reaper` (conftest.py)
kills whatever mentions the tmp dir at teardown and fails the test if anything was left.
"""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from test_agent_hostile import AgentHost, agent_host  # noqa: F401 - the fixture is used by name
from tests.support import alive, hold_for, processes, wait_for

SPAWNER = r"""
import fs from 'node:fs';
import { spawn } from 'node:child_process';

const mark = (ctx, kind) => `${ctx.params.mark}-${kind}-${process.pid}`;

function marked(prefix) {
  const found = [];
  for (const pid of fs.readdirSync('/proc').filter((name) => /^\d+$/.test(name))) {
    let argv;
    try { argv = fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8'); } catch { continue; } // zombies have none
    if (argv.startsWith(prefix)) found.push(argv.split('\0')[0]);
  }
  return found;
}

let spawned = false;
const pause = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

export function st_init(ctx) {
  fs.appendFileSync(ctx.params.lives, JSON.stringify({ pid: process.pid, left: marked(ctx.params.mark) }) + '\n');
}

export async function st_heartbeat(ctx) {
  if (!spawned) {
    spawned = true;
    spawn('sleep', ['1000'], { argv0: mark(ctx, 'plain'), stdio: 'ignore' });
    spawn('sleep', ['1000'], { argv0: mark(ctx, 'setsid'), stdio: 'ignore', detached: true }).unref();
    spawn('bash', ['-c', `(exec -a ${mark(ctx, 'grand')} sleep 1000) &`], { stdio: 'ignore' });
    for (let i = 0; i < 200 && marked(`${ctx.params.mark}-`).filter((a) => a.endsWith(`-${process.pid}`)).length < 3; i++) {
      await pause(10);
    }
    fs.appendFileSync(ctx.params.lives, JSON.stringify({ pid: process.pid, spawned: true }) + '\n');
  }
  switch (ctx.params.mode) {
    case 'crash': process.exit(1);
    case 'hang': await new Promise(() => setInterval(() => {}, 1000)); break;
    case 'busy': for (;;) {} // eslint-disable-line no-empty
    default: break;
  }
}

export function st_exit(ctx) {
  fs.appendFileSync(ctx.params.lives, JSON.stringify({ pid: process.pid, exited: true }) + '\n');
}
"""

KINDS = ("plain", "setsid", "grand")


class Spawner:
    """One instance of the strategy above, and the marked processes it leaves."""

    def __init__(self, host: AgentHost, mode: str, heartbeat_ms: int = 200, **scheduling):
        self.host = host
        self.workdir = host.workdir("wa")
        self.mark = str(host.root / "mark")
        self.lives_file = host.root / "lives.jsonl"
        host.start(self.workdir, "spawner", SPAWNER, heartbeat_ms=heartbeat_ms,
                   params={"mode": mode, "mark": self.mark, "lives": str(self.lives_file)}, **scheduling)

    def lives(self) -> list[dict]:
        try:
            return [json.loads(line) for line in self.lives_file.read_text().splitlines()]
        except OSError:
            return []

    def children(self) -> dict[int, set[str]]:
        """Runner pid -> kinds of its marked children alive now (zombies do not count)."""
        found: dict[int, set[str]] = {}
        for proc in processes(self.mark + "-"):
            name = proc.argv[0] if proc.argv else ""
            if name.startswith(self.mark + "-"):
                kind, _, runner = name[len(self.mark) + 1:].rpartition("-")
                found.setdefault(int(runner), set()).add(kind)
        return found

    def spawned(self, runner: int) -> bool:
        return set(KINDS) <= self.children().get(runner, set())

    def runner(self) -> int | None:
        return self.host.pid(self.workdir, "spawner", "runner.pid")

    def supervisors(self) -> tuple[int, int]:
        """(keeper, supervisor proper): the pid in supervisor.pid and its child running `supervise`."""
        keeper = self.host.pid(self.workdir, "spawner")
        assert keeper is not None
        child = wait_for(lambda: [p.pid for p in processes("supervise") if p.pid != keeper
                                  and _ppid(p.pid) == keeper], 5, what="the supervisor below its keeper")
        return keeper, child[0]

    def status(self) -> dict:
        return json.loads((self.host.folder(self.workdir, "spawner") / "status.json").read_text())


def _ppid(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def test_a_crashing_runner_leaves_nothing_behind(agent_host):
    """The runner exits on its own (process.exit(1) right after spawning): before the next life
    starts, nothing of the last one runs; at any moment, one life's children at most."""
    spawner = Spawner(agent_host, "crash", maxRestarts=2)

    def at_most_one_life() -> bool:
        lives = spawner.children()
        assert len(lives) <= 1, f"children of several lives at once: {lives}"
        return spawner.status()["state"] == "error"

    wait_for(at_most_one_life, 60, what="the strategy to end in error after 2 restarts", interval=0.02)
    lives = spawner.lives()
    inits = [life for life in lives if "left" in life]
    assert len(inits) == 3, lives
    assert all(life["left"] == [] for life in inits), f"a life started beside the last one's children: {lives}"
    assert len([life for life in lives if life.get("spawned")]) == 3, lives
    restarts = [e for e in agent_host.events(spawner.workdir, "spawner") if e["event"] == "restart"]
    assert [("runner exited with code 1" in e["detail"]) for e in restarts] == [True, True], restarts
    # The supervisor ended (error), and with it everything below it.
    wait_for(lambda: not processes(str(spawner.workdir)), 10, what="the supervisor to exit")
    assert spawner.children() == {}


def test_stop_leaves_nothing_behind(agent_host):
    spawner = Spawner(agent_host, "calm")
    runner = wait_for(spawner.runner, 20, what="a runner")
    wait_for(lambda: spawner.spawned(runner), 20, what="the three marked children")
    keeper, supervisor = spawner.supervisors()

    answer, took = agent_host.stop(spawner.workdir, "spawner", grace=2)
    assert answer["result"] == "stopped", answer
    assert spawner.children() == {}, "children survived the stop"
    assert not alive(runner) and not alive(keeper) and not alive(supervisor)
    assert {"pid": runner, "exited": True} in spawner.lives()       # st_exit ran
    assert took < 10, took


STOP_TIMEOUT = 2.0
SLACK = 3.0


@pytest.mark.parametrize("mode", ["hang", "busy"])
@pytest.mark.parametrize("victim", ["supervisor", "keeper"])
def test_a_killed_supervisor_takes_its_strategy_down(agent_host, mode, victim):
    """SIGKILL to the supervisor while st_heartbeat is stuck (a promise that never settles, or a busy
    loop, so st_exit cannot run): the runner and all its children are gone within the stop timeout
    plus a little. `supervisor`: the supervising process itself (its keeper ends what it left);
    `keeper`: the pid in supervisor.pid (the supervisor gets SIGTERM from the kernel and stops)."""
    # A long heartbeat: the supervisor must not restart the stuck runner before the kill.
    spawner = Spawner(agent_host, mode, heartbeat_ms=2000, stopTimeoutSeconds=STOP_TIMEOUT)
    runner = wait_for(spawner.runner, 20, what="a runner")
    wait_for(lambda: spawner.spawned(runner), 20, what="the three marked children")
    keeper, supervisor = spawner.supervisors()

    os.kill(keeper if victim == "keeper" else supervisor, signal.SIGKILL)
    killed_at = time.monotonic()
    wait_for(lambda: not spawner.children() and not alive(runner), STOP_TIMEOUT + SLACK,
             what="the runner and its children to be gone")
    gone_after = time.monotonic() - killed_at
    wait_for(lambda: not alive(keeper) and not alive(supervisor), SLACK, what="the keeper and supervisor to exit")
    assert gone_after <= STOP_TIMEOUT + SLACK
    status = spawner.status()
    assert status["state"] == "stopped", status
    assert ("killed by signal 9" if victim == "supervisor" else "keeper process") in status["reason"], status
    # Nothing is restarted behind the controller's back.
    hold_for(0.5, lambda: spawner.runner() == runner and not spawner.children(), "nothing started again")


def test_killing_keeper_and_supervisor_together_still_stops_the_runner(agent_host):
    """Both at once (their whole process group): the runner still gets SIGTERM from the kernel
    (PDEATHSIG) and runs st_exit. Its detached children have nobody above them any more; the next
    `stop` (or `start`) of the instance finds them by their environment and ends them."""
    spawner = Spawner(agent_host, "calm", stopTimeoutSeconds=STOP_TIMEOUT)
    runner = wait_for(spawner.runner, 20, what="a runner")
    wait_for(lambda: spawner.spawned(runner), 20, what="the three marked children")
    keeper, supervisor = spawner.supervisors()

    os.killpg(keeper, signal.SIGKILL)
    wait_for(lambda: not alive(runner), STOP_TIMEOUT + SLACK, what="the runner to stop")
    assert {"pid": runner, "exited": True} in spawner.lives()       # st_exit ran
    answer, _ = agent_host.stop(spawner.workdir, "spawner", grace=STOP_TIMEOUT)
    assert answer["result"] == "not-running", answer
    assert spawner.children() == {}, "the stop left the strategy's children running"
