"""The kept agent over real sshd hosts: the daemon keeps one per host lane and asks it every round,
it holds lease keys and so is undumpable, and a daemon killed outright leaves nothing behind on its
hosts but the supervisors (each kept agent ends with its connection)."""
from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from sshfleet import processes, wait_for
from tests.support import alive, hold_for

pytestmark = pytest.mark.ssh


def kept_agents(fl) -> list[int]:
    """The hosts' `serve` processes (their children name themselves ql-COMMAND)."""
    out = []
    for p in processes(fl.markers):
        try:
            named = Path(f"/proc/{p.pid}/comm").read_text().strip()
        except OSError:
            continue
        if "serve" in p.argv and not named.startswith("ql-"):
            out.append(p.pid)
    return out


@pytest.mark.slow
def test_a_killed_daemon_leaves_only_the_supervisors_behind(ssh_fleet, tmp_path):
    fl = ssh_fleet(2)
    fl.worker("w-1", "host-01", max_strategies=2).worker("w-2", "host-02", max_strategies=2)
    for n in range(1, 4):
        fl.strategy(f"s-{n}")
    fl.write()
    daemon = fl.spawn("reconcile", log=tmp_path / "daemon.log")
    placed = wait_for(lambda: len(p := fl.placements()) == 3 and p, 30, "all three strategies placed")
    runners = {sid: p.pid for sid, p in fl.wait_runners(placed, timeout=30).items()}

    # A kept agent per host for the probes (and one per worker that was started on), asked every
    # round: the same processes answer round after round.
    kept = wait_for(lambda: len(k := kept_agents(fl)) >= 2 and k, 15, "a kept agent on each host")
    hold_for(3.0, lambda: set(kept) <= set(kept_agents(fl)), "the same kept agents across rounds")

    # They hold lease keys while they start copies: undumpable, like the supervisors.
    for pid in kept:
        uid = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                   if line.startswith("Uid:"))
        peek = subprocess.run(["cat", f"/proc/{pid}/environ"], preexec_fn=lambda: os.setuid(uid),
                              capture_output=True, text=True, timeout=30)
        assert peek.returncode != 0 and "Permission denied" in peek.stderr, (pid, peek.stderr)

    os.kill(daemon.pid, signal.SIGKILL)
    daemon.wait(10)
    wait_for(lambda: not kept_agents(fl) and not [p for p in processes(fl.markers) if p.pid in kept], 15,
             "the kept agents to end with their connections")
    assert all(alive(pid) for pid in runners.values()), "a strategy ended with the daemon's kept agents"
    assert {sid: p.pid for sid, p in fl.wait_runners(placed).items()} == runners


def test_hosts_are_held_past_descriptor_1023(ssh_fleet):
    """A controller holding hundreds of hosts has descriptors past 1023, which select() refuses: each
    wait on a channel must still work there (a kept agent's session once took that for its end)."""
    from quantlab.edges.gather import gather
    from quantlab.edges.transport.base import raise_open_file_limit

    raise_open_file_limit()
    import resource
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < 1400:
        pytest.skip("this machine allows fewer than 1400 open files")
    fl = ssh_fleet(2)
    fl.worker("w-1", "host-01").worker("w-2", "host-02").write()
    filler = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    ctl = fl.controller()
    try:
        assert min(filler) < 1024 <= max(filler)
        fleet = ctl.load_fleet()
        memory = ctl.read_memory(None)
        hosts = ctl.hosts(fleet)
        for _ in range(3):
            rounds = gather(fleet, memory, hosts, ctl.clock).observed.workers
            assert all(w.reachable for w in rounds.values()), {k: w.error for k, w in rounds.items()}
        kept = kept_agents(fl)
        assert len(kept) == 2, "each host answered by its kept agent, not calls of their own"
        probe = os.open(os.devnull, os.O_RDONLY)
        os.close(probe)
        assert probe > 1023, "the channels were not past descriptor 1023"
    finally:
        ctl.close()
        for fd in filler:
            os.close(fd)
