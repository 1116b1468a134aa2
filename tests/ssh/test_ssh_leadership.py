"""Several reconcile daemons on one PostgreSQL state, over real sshd hosts: exactly one leads; losing
it (kill -9, frozen, cut off from the database) hands the lead to a standby without a strategy
stopping or running twice, and a deposed leader's commands are refused by the hosts."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from sshfleet import SshFleet, wait_for

from tests.support import cli_env, free_port

pytestmark = pytest.mark.ssh

INTERVAL = 1.0
LEADER_LEASE = 3.0
# Covers a takeover (leader lease + two watch intervals + probe deadline + 1 s, see the lease rule)
# with room for a round or two whose renewals a busy machine made late: the rule's floor is 7.4 s.
TTL = 12.0
# A standby leads at most lease + two watch intervals after the leader's last renewal of the row,
# which it renewed at most one interval before it died; plus room for a busy machine.
TAKEOVER_BOUND = LEADER_LEASE + 2 * 1.0 + INTERVAL + 3.0


def db_query(dsn: str, sql: str, *args: Any) -> list[tuple]:
    """The rows; none before the first daemon made the tables."""
    import psycopg
    with psycopg.connect(dsn, autocommit=True) as conn:
        try:
            return conn.execute(sql, args).fetchall()
        except psycopg.errors.UndefinedTable:
            return []


def leader_row(dsn: str) -> tuple[str | None, int] | None:
    rows = db_query(dsn, "SELECT holder, term FROM quantlab_leader WHERE id = 1")
    return (rows[0][0], int(rows[0][1])) if rows else None


def led_by(dsn: str, daemon) -> bool:
    row = leader_row(dsn)
    return row is not None and row[0] is not None and f"pid {daemon.pid} " in row[0]


def leader_events(dsn: str) -> list[dict[str, Any]]:
    return [r[0] for r in db_query(dsn, "SELECT body FROM quantlab_events ORDER BY id") if r[0].get("event") == "leader"]


def fleet_on_three_hosts(ssh_fleet) -> SshFleet:
    fl = ssh_fleet(3, connect_timeout=1, command_timeout=5)
    fl.short_lease(TTL)
    fl.settings["reconcile"].update({"intervalSeconds": INTERVAL, "leaderLeaseSeconds": LEADER_LEASE,
                                     "probeDeadlineSeconds": INTERVAL})
    for i in (1, 2, 3):
        fl.worker(f"w{i}", f"host-0{i}", max_strategies=1)
    for sid in ("alpha", "beta", "gamma"):
        fl.strategy(sid, stopTimeoutSeconds=1)
    return fl.write()


class Watcher:
    """Runner processes per strategy, looked at again and again: never two of one strategy, and
    (with `same`) never another process than the one first seen."""

    def __init__(self, fl: SshFleet):
        self.fl = fl
        self.first: dict[str, int] = {}

    def look(self, same: bool = True) -> dict[str, int]:
        found = self.fl.runners_by_strategy()
        for sid, procs in found.items():
            assert len(procs) == 1, f"two copies of {sid} run at once: {[p.cmdline for p in procs]}"
        pids = {sid: procs[0].pid for sid, procs in found.items()}
        if same and self.first:
            assert pids == self.first, f"a strategy stopped or restarted: {self.first} -> {pids}"
        return pids

    def hold(self, seconds: float, same: bool = True) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.look(same)
            time.sleep(0.1)


def start_leading(fl: SshFleet, dsn: str, tmp_path: Path, count: int) -> tuple[list, list[Path], Watcher]:
    """`count` daemons; the first leads (started alone, then the others), every strategy runs."""
    logs = [tmp_path / f"daemon-{i}.log" for i in range(count)]
    daemons = [fl.spawn("reconcile", "--state", dsn, log=logs[0])]
    wait_for(lambda: led_by(dsn, daemons[0]), 20, "the first daemon to lead")
    placed = wait_for(lambda: (p := placements(dsn)) and len(p) == 3 and p, 30, "every strategy placed")
    fl.wait_runners(placed, timeout=30)
    for i in range(1, count):
        daemons.append(fl.spawn("reconcile", "--state", dsn, log=logs[i]))
    for log in logs[1:]:
        wait_for(lambda log=log: "standing by:" in log.read_text(), 20, f"{log.name} to stand by")
    watcher = Watcher(fl)
    watcher.first = watcher.look(same=False)
    assert set(watcher.first) == {"alpha", "beta", "gamma"}
    return daemons, logs, watcher


def placements(dsn: str) -> dict[str, str]:
    rows = db_query(dsn, "SELECT content FROM quantlab_state WHERE id = 1")
    return {sid: p["worker"] for sid, p in rows[0][0]["placements"].items()} if rows else {}


def describe(logs: list[Path]) -> str:
    return "\n".join(f"--- {log.name}\n{log.read_text()[-4000:]}" for log in logs)


@pytest.mark.slow
@pytest.mark.parametrize("count", [2, 3])
def test_kill_9_of_the_leader_hands_over_within_the_bound_and_nothing_stops(ssh_fleet, pg_dsn, tmp_path, count):
    fl = fleet_on_three_hosts(ssh_fleet)
    daemons, logs, watcher = start_leading(fl, pg_dsn, tmp_path, count)
    _, term = leader_row(pg_dsn)
    watcher.hold(2 * INTERVAL)

    os.killpg(daemons[0].pid, signal.SIGKILL)
    killed = time.monotonic()
    new = None
    while new is None:
        assert time.monotonic() - killed < TAKEOVER_BOUND, f"no standby led within {TAKEOVER_BOUND:g}s\n{describe(logs)}"
        watcher.look()
        new = next((d for d in daemons[1:] if led_by(pg_dsn, d)), None)
        time.sleep(0.1)
    took = time.monotonic() - killed
    assert leader_row(pg_dsn)[1] > term
    # The new leader's renewals keep every strategy on: hold for longer than a whole strategy lease.
    watcher.hold(TTL + 2)
    took_events = [e for e in leader_events(pg_dsn) if e["change"] == "took"]
    assert len({e["term"] for e in took_events}) == len(took_events) == 2, took_events
    for wid in ("w1", "w2", "w3"):
        fence = json.loads((fl.workdir(wid) / "agent" / "fence.json").read_text())
        assert max(fence.values()) == leader_row(pg_dsn)[1], (wid, fence)
    assert took <= TAKEOVER_BOUND


@pytest.mark.slow
def test_a_leader_frozen_past_its_lease_is_refused_by_the_hosts_once_resumed(ssh_fleet, pg_dsn, tmp_path):
    fl = fleet_on_three_hosts(ssh_fleet)
    daemons, logs, watcher = start_leading(fl, pg_dsn, tmp_path, 2)
    old, standby = daemons
    _, old_term = leader_row(pg_dsn)
    os.killpg(old.pid, signal.SIGSTOP)
    try:
        wait_for(lambda: watcher.look() and led_by(pg_dsn, standby), TAKEOVER_BOUND, "the standby to lead")
        watcher.hold(TTL + 2)                 # the new leader's renewals, not the frozen one's, keep them on
    finally:
        os.killpg(old.pid, signal.SIGCONT)
    wait_for(lambda: watcher.look() and "lost the lead" in logs[0].read_text(), 15,
             f"the resumed daemon to find it was deposed\n{describe(logs)}")
    watcher.hold(3 * INTERVAL)
    assert led_by(pg_dsn, standby)

    # What a frozen leader might still send — a stop, carrying its old term, with its own clock
    # saying it leads — is refused by the host, and nothing stops.
    from quantlab.app.controller import Controller, default_state_path
    from quantlab.core.plan import Action, Plan
    ghost = Controller(fl.dir, default_state_path(fl.dir), state_dsn=pg_dsn)
    ghost.read_memory(None)
    fleet = ghost.load_fleet()

    class Frozen:                                     # its view of itself when it stopped in mid-round
        last_term = old_term
        table = None

        @staticmethod
        def leading() -> bool:
            return True
    ghost.leader = Frozen()
    where = placements(pg_dsn)["alpha"]
    stop = Action("stop", "alpha", "the deposed leader's plan", "removed", worker=where, epoch=None)
    outcomes = ghost.execute(fleet, Plan(actions=(stop,), lineage=None, state_serial=0), "reconcile")
    ghost.close()
    assert not outcomes[0].ok and f"below term {old_term + 1}" in outcomes[0].detail, outcomes[0].detail
    watcher.hold(2)


@pytest.mark.slow
def test_a_leader_cut_off_from_the_database_with_a_host_only_it_reaches_never_makes_two(ssh_fleet, pg_dsn, pg_server,
                                                                                       tmp_path):
    from tests.tcp_proxy import TcpProxy

    fl = ssh_fleet(3, connect_timeout=1, command_timeout=5)
    fl.short_lease(TTL)
    fl.settings["reconcile"].update({"intervalSeconds": INTERVAL, "leaderLeaseSeconds": LEADER_LEASE,
                                     "probeDeadlineSeconds": INTERVAL})
    fl.worker("w1", "host-01", region="US", max_strategies=1).worker("w2", "host-02", region="US", max_strategies=1)
    fl.worker("w3", "host-03", region="JP", max_strategies=1)
    fl.strategy("alpha", region="US", stopTimeoutSeconds=1).strategy("beta", region="US", stopTimeoutSeconds=1)
    fl.strategy("gamma", region="JP", stopTimeoutSeconds=1).write()
    proxy = TcpProxy("127.0.0.1", pg_server.port)
    try:
        cut_dsn = pg_dsn.replace(f":{pg_server.port}/", f":{proxy.port}/")
        # The standby reaches host-03 nowhere: its copy of the fleet points it at a closed port.
        other = tmp_path / "standby-fleet"
        shutil.copytree(fl.dir, other, ignore=shutil.ignore_patterns(".quantlab"))
        config = Path(fl.ssh["config"]).read_text()
        host3 = fl.hosts["host-03"]
        blocked = config.replace(f"Port {host3.port}\n", f"Port {free_port()}\n")
        (other / "ssh_config").write_text(blocked)

        def standby_copy() -> None:
            text = (fl.dir / "fleet.yaml").read_text().replace(str(fl.ssh["config"]), str(other / "ssh_config"))
            (other / "fleet.yaml").write_text(text)
        standby_copy()

        logs = [tmp_path / "leader.log", tmp_path / "standby.log"]
        leader = fl.spawn("reconcile", "--state", cut_dsn, log=logs[0])
        wait_for(lambda: led_by(pg_dsn, leader), 20, "the first daemon to lead")
        placed = wait_for(lambda: (p := placements(pg_dsn)) and len(p) == 3 and p, 30, "every strategy placed")
        fl.wait_runners(placed, timeout=30)
        on_host3 = "gamma"
        assert placed[on_host3] == "w3", placed
        standby = spawn_in(fl, other, ["reconcile", "--state", pg_dsn], logs[1])
        wait_for(lambda: "standing by:" in logs[1].read_text(), 20, "the standby to stand by")
        fl.worker("w4", "host-02", region="JP", max_strategies=1).write()      # room for gamma elsewhere
        standby_copy()
        watcher = Watcher(fl)
        watcher.first = watcher.look(same=False)

        proxy.cut()
        wait_for(lambda: watcher.look(same=False) is not None and led_by(pg_dsn, standby), TAKEOVER_BOUND + 5,
                 f"the standby to lead\n{describe(logs)}")
        # host-03's strategy is fenced there (its lease runs out: nobody can renew it any more) and
        # only then started elsewhere; the others keep running untouched.
        def moved() -> bool:
            pids = watcher.look(same=False)
            for sid in set(watcher.first) - {on_host3}:
                assert pids.get(sid) == watcher.first[sid], f"{sid} stopped or restarted: {pids}"
            where = placements(pg_dsn).get(on_host3)
            return where is not None and where != "w3" and on_host3 in pids
        wait_for(moved, TTL + 25, f"{on_host3} to fail over from the host only the cut-off leader reached\n"
                                  f"{describe(logs)}")
        proxy.heal()
        wait_for(lambda: watcher.look(same=False) is not None and "lost the lead" in logs[0].read_text(), 20,
                 f"the old leader to find it was deposed\n{describe(logs)}")
        held_from = watcher.look(same=False)
        watcher.first = held_from
        watcher.hold(3 * INTERVAL)
    finally:
        proxy.close()


@pytest.mark.slow
def test_the_database_restarted_renewals_go_on_and_acting_resumes(ssh_fleet, pg_dsn, pg_server, tmp_path):
    fl = fleet_on_three_hosts(ssh_fleet)
    # A longer lead, so that the database can be away for a few rounds without deposing it.
    fl.settings["reconcile"]["leaderLeaseSeconds"] = 8
    fl.settings["monitor"]["leaseTtlSeconds"] = 14
    fl.write()
    daemons, logs, watcher = start_leading(fl, pg_dsn, tmp_path, 1)
    lease = fl.instance_dir(placements(pg_dsn)["alpha"], "alpha") / "lease.json"
    pg_server.stop()
    try:
        before = json.loads(lease.read_text())["deadline"]
        wait_for(lambda: watcher.look() and json.loads(lease.read_text())["deadline"] > before + 2, 10,
                 f"a renewal while the database is away\n{describe(logs)}")
        assert "leases are renewed from memory" in logs[0].read_text()
    finally:
        pg_server.resume()
    fl.strategy("delta", stopTimeoutSeconds=1).worker("w4", "host-03", max_strategies=1).write()
    wait_for(lambda: "delta" in placements(pg_dsn), 30, f"acting to resume\n{describe(logs)}")
    assert led_by(pg_dsn, daemons[0])
    expected = {**watcher.first}
    watcher.first = {}
    pids = wait_for(lambda: (p := watcher.look(same=False)) and len(p) == 4 and p, 20, "delta to run")
    assert {sid: pids[sid] for sid in expected} == expected, "nothing restarted"



def spawn_in(fl: SshFleet, fleet_dir: Path, args: list[str], log: Path) -> subprocess.Popen:
    """A daemon on another copy of the fleet directory (killed with the fleet's at teardown)."""
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "quantlab", *args, "--fleet", str(fleet_dir)],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                env={**cli_env(), "PYTHONFAULTHANDLER": "1"},
                                cwd=Path(__file__).resolve().parents[2], start_new_session=True)
    fl.daemons.append(proc)
    return proc
