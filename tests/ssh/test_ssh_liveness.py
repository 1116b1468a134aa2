"""Liveness over real sshd hosts: nothing but a host's own silence stops its strategies.

The reconcile daemon runs with a short lease. One of three hosts freezes (every sshd process of it,
kept connections included): the strategies on the two healthy hosts keep their processes — their
leases are renewed on time although every round has a host that does not answer — and the frozen
host's strategies heartbeat on the healthy hosts within the documented failover bound, never two
copies at once. Then the whole machine freezes (its supervisors and runners too) while an agent is
in the middle of a renewal: when it resumes after the strategies moved, the late renewal grants
nothing and no old copy beats again.
"""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from sshfleet import proc_info, processes, wait_for
from tests.support import hold_for

pytestmark = pytest.mark.ssh

INTERVAL = 1.0          # sshfleet's reconcile interval
DEADLINE = 0.5          # probeDeadlineSeconds (short_lease)
TTL = 4.0               # obeys the lease rule: max(2 x 1, 0.5) + 0.5 + 1 + 5 % = 3.7 s
STOP = 1.0              # the strategies' stopTimeoutSeconds
MARGIN = 1.0 + 0.05 * TTL
# README, "The lease rule": a host that goes silent right after a renewal was sent holds that lease
# for up to deadline + TTL; the copy there then gets its stop timeout and the margin; the next round
# notices (an interval, plus a deadline for the silent host) and starts the replacement, whose start
# (supervisor, node, st_init, first heartbeat) gets START_S here on a busy 2-core machine.
START_S = 4.0
FAILOVER_BOUND = DEADLINE + TTL + STOP + MARGIN + INTERVAL + DEADLINE + START_S


# Notes the wall-clock ms at which each st_heartbeat call begins, so a test can tell a call made
# after a host resumed from one that was under way when it froze; and notes each st_exit.
CALLS_JS = r"""
import fs from 'node:fs';
import path from 'node:path';
const calls = path.join(process.env.QUANTLAB_STATE_DIR, 'calls.log');
export async function st_init(ctx) {}
export async function st_heartbeat(ctx) { fs.appendFileSync(calls, `${Date.now()}\n`); }
export async function st_exit(ctx) { fs.appendFileSync(calls, 'exit\n'); }
"""


def three_hosts(ssh_fleet, tmp_path):
    fl = ssh_fleet(3, connect_timeout=1, command_timeout=3)
    fl.short_lease(TTL, offline_after=1)
    (fl.dir / "strategies" / "calls.mjs").write_text(CALLS_JS)
    for n in (1, 2, 3):
        fl.worker(f"w-{n}", f"host-0{n}", region="JP", max_strategies=4)
    for n in range(1, 7):
        fl.strategy(f"s-{n}", region="JP", stopTimeoutSeconds=STOP, file="strategies/calls.mjs")
    fl.write()
    daemon = fl.spawn("reconcile", log=tmp_path / "daemon.log")
    placed = wait_for(lambda: len(p := fl.placements()) == 6 and p, 30, "all six strategies placed")
    fl.wait_runners(placed, timeout=30)
    return fl, daemon, placed


def heartbeat(fl, wid: str, sid: str) -> dict | None:
    try:
        return json.loads((fl.instance_dir(wid, sid) / "heartbeat.json").read_text())
    except (OSError, ValueError):
        return None


def lease_deadline(fl, wid: str, sid: str) -> float | None:
    try:
        return json.loads((fl.instance_dir(wid, sid) / "lease.json").read_text()).get("deadline")
    except (OSError, ValueError):
        return None


def boot_seconds() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def watch_failover(fl, placed: dict[str, str], lost: str, since: float, healthy_pids: dict[str, int]) -> float:
    """Poll until every strategy of worker `lost` heartbeats on another worker, checking at every poll
    that the healthy strategies keep their runner and that no strategy has two runners. Returns the
    seconds from `since` until the last of them heartbeat elsewhere."""
    moving = sorted(sid for sid, wid in placed.items() if wid == lost)
    arrived: dict[str, float] = {}
    deadline = time.monotonic() + FAILOVER_BOUND + 15
    while len(arrived) < len(moving):
        assert time.monotonic() < deadline, f"not all of {moving} moved off {lost}: {arrived}"
        # A stopped process (the frozen machine's) is paused, not running: it is not a copy until it resumes.
        runners = {sid: [p for p in procs if p.state != "T"] for sid, procs in fl.runners_by_strategy().items()}
        for sid, procs in runners.items():
            assert len(procs) <= 1, f"two copies of {sid}: {[p.cmdline for p in procs]}"
        for sid, pid in healthy_pids.items():
            assert [p.pid for p in runners.get(sid, [])] == [pid], f"{sid} on a healthy host lost its runner {pid}"
        for sid in moving:
            procs = runners.get(sid, [])
            where = procs[0].environ().get("QUANTLAB_WORKER_ID") if procs else None
            if sid not in arrived and where not in (None, lost):
                beat = heartbeat(fl, where, sid)
                if beat is not None and beat["t"] / 1000 > time.time() - 60:
                    arrived[sid] = time.monotonic() - since
        time.sleep(0.05)
    return max(arrived.values())


@pytest.mark.slow
def test_a_frozen_host_delays_no_renewal_and_its_strategies_move_within_the_bound(ssh_fleet, tmp_path):
    fl, daemon, placed = three_hosts(ssh_fleet, tmp_path)
    lost = "w-3"
    runners = fl.runners_by_strategy()
    healthy = {sid: runners[sid][0].pid for sid, wid in placed.items() if wid != lost}
    assert len(healthy) >= 3, placed

    frozen_at = time.monotonic()
    fl.hosts["host-03"].freeze()
    took = watch_failover(fl, placed, lost, frozen_at, healthy)
    assert took <= FAILOVER_BOUND, (f"replacements heartbeat {took:.1f}s after the freeze (bound "
                                    f"{FAILOVER_BOUND:.1f}s); the daemon said:\n{(tmp_path / 'daemon.log').read_text()}")

    # The healthy strategies were never fenced: their leases kept being renewed while every round
    # had a host that did not answer.
    for sid in healthy:
        events = (fl.instance_dir(placed[sid], sid) / "events.log").read_text()
        assert "lease-expired" not in events, events
    # The old copies fenced themselves before the replacements started.
    for sid in (s for s, w in placed.items() if w == lost):
        status = json.loads((fl.instance_dir(lost, sid) / "status.json").read_text())
        assert status["state"] == "stopped" and status["reason"].startswith("lease expired"), status

    # Thawed, the host answers again, and nothing runs twice.
    fl.hosts["host-03"].thaw()
    hold_for(3 * INTERVAL, lambda: all(len(p) == 1 for p in fl.runners_by_strategy().values())
             and len(fl.runners_by_strategy()) == 6, "one runner per strategy after the thaw")
    assert fl.stop(daemon, tmp_path / "daemon.log") == 0
    print(f"\n[timing] failover {took:.2f}s after the freeze (bound {FAILOVER_BOUND:.1f}s)")


def probe_or_not(info) -> bool | None:
    """A call of its own (`agent.pyz probe`) or a kept agent's child answering a probe (its comm is
    ql-probe); None for a kept agent's process not named yet (a child names itself right after the fork)."""
    if "probe" in info.argv:
        return True
    if "serve" not in info.argv:
        return False
    try:
        comm = Path(f"/proc/{info.pid}/comm").read_text().strip()
    except OSError:
        return False
    return comm == "ql-probe" if comm.startswith("ql-") else None


def catch_a_renewal(fl, host: str, timeout: float = 30.0) -> int:
    """The pid of an agent `probe` on `host`, caught as it starts (the daemon renews every interval).
    Only new pids are looked at, so a poll takes about a millisecond."""
    root = str(fl.hosts[host].workdir_root) + os.sep
    seen: set[int] = set()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) in seen:
                continue
            info = proc_info(int(entry))
            verdict = probe_or_not(info) if info is not None and root in info.cmdline else False
            if verdict:
                return info.pid
            if verdict is not None:
                seen.add(int(entry))
    raise AssertionError(f"no probe of {host} seen within {timeout:g}s")


def freeze_machine(fl, host: str, agent_pid: int) -> list[int]:
    """SIGSTOP the caught agent first, then every process of the host's workdirs (supervisors,
    runners) and its sshd: the machine as a paused VM would be. Returns the pids stopped."""
    os.kill(agent_pid, signal.SIGSTOP)
    stopped = [p.pid for p in processes(str(fl.hosts[host].workdir_root) + os.sep)]
    for pid in stopped:
        os.kill(pid, signal.SIGSTOP)
    fl.hosts[host].freeze()
    return [agent_pid, *stopped]


@pytest.mark.slow
def test_a_renewal_that_arrives_after_its_not_after_grants_nothing(ssh_fleet, tmp_path):
    fl, daemon, placed = three_hosts(ssh_fleet, tmp_path)
    lost = "w-3"
    on_lost = sorted(sid for sid, wid in placed.items() if wid == lost)
    runners = fl.runners_by_strategy()
    healthy = {sid: runners[sid][0].pid for sid, wid in placed.items() if wid != lost}

    agent = catch_a_renewal(fl, "host-03")
    frozen_at = time.monotonic()
    stopped = freeze_machine(fl, "host-03", agent)
    assert proc_info(agent) is not None and proc_info(agent).state == "T", "the agent was not caught in time"
    leases = {sid: lease_deadline(fl, lost, sid) for sid in on_lost}
    try:
        watch_failover(fl, placed, lost, frozen_at, healthy)
        # Resume only once every lease granted there ended more than a stop timeout ago (the
        # replacements run now, and the old copies' st_exit could only hurt them).
        wait_for(lambda: boot_seconds() > max(leases.values()) + STOP + 0.5, TTL + 5, "the old leases to end")
    finally:
        resumed_at, resumed_boot = time.time(), boot_seconds()
        for pid in stopped:
            try:
                os.kill(pid, signal.SIGCONT)
            except OSError:
                pass
        fl.hosts["host-03"].thaw()

    # The agent goes on with the renewal it was in: it is late, so it grants nothing; the supervisors
    # and runners find their lease over and stop without another beat.
    wait_for(lambda: proc_info(agent) is None or proc_info(agent).state == "Z", 10, "the late agent to finish")
    for sid in on_lost:
        # Unchanged; or written by a renewal frozen between its not-after check and its write (a
        # kept agent may have two in flight): that one ends at its not-after + TTL, before the host
        # resumed, and a supervisor resumed past its lease takes no later one anyway.
        deadline = lease_deadline(fl, lost, sid)
        assert deadline == leases[sid] or deadline < resumed_boot, \
            f"{sid}'s lease on the resumed host was extended past its resumption: {leases[sid]} -> {deadline}"
    root = str(fl.hosts["host-03"].workdir_root) + os.sep
    wait_for(lambda: not [p for p in fl.runners() if root in p.cmdline], STOP + 5, "the old runners to end")
    for sid in on_lost:
        idir = fl.instance_dir(lost, sid)
        log = idir / "state" / "calls.log"
        calls = log.read_text().split() if log.exists() else []
        # Its lease ended long before it resumed: no beat, and no st_exit either (that could cancel the
        # orders of the replacement, which trades by now).
        assert "exit" not in calls, f"{sid}'s st_exit ran on the resumed host, beside its replacement"
        assert all(int(t) < resumed_at * 1000 for t in calls), f"{sid}'s st_heartbeat was called on the resumed host"

        def fenced() -> bool:
            events = [json.loads(line) for line in (idir / "events.log").read_text().splitlines()]
            return any(e["event"] == "lease-expired" for e in events)
        wait_for(fenced, STOP + 5, f"{sid}'s supervisor on the resumed host to record that its lease expired")
    hold_for(2 * INTERVAL, lambda: {sid: len(p) for sid, p in fl.runners_by_strategy().items()} == {s: 1 for s in placed},
             "one runner per strategy after the thaw")
    assert fl.stop(daemon, tmp_path / "daemon.log") == 0
