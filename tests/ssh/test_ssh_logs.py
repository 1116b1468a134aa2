"""`quantlab logs` over SSH: the byte-exact tail of a 5 MB output log full of non-UTF-8 bytes, and a
transport that keeps working after carrying such output."""
from __future__ import annotations

import os
import random
import subprocess

import pytest

from quantlab.edges.gather import gather
from sshfleet import processes
from tests.support import wait_for

pytestmark = pytest.mark.ssh

SIZE = 5 * 1000 * 1000


def messy_log(size: int) -> bytes:
    """Lines of random bytes (every value but \\n, so invalid UTF-8, NULs, \\r, ESC...), some of them
    long enough to span the agent's 64 KiB read blocks, ending in a newline."""
    rng = random.Random(20240501)
    parts, total, i = [], 0, 0
    while total < size:
        i += 1
        width = 150_000 if i % 997 == 0 else rng.randint(0, 300)
        body = rng.randbytes(width).replace(b"\n", b"\xff")
        line = b"%07d \xe6\x97\xa5 \xc3\x28 \x80\xfe " % i + body + b"\n"
        parts.append(line)
        total += len(line)
    data = b"".join(parts)
    # A long line right before the tail, and a short one at the very end.
    return data + b"L" * 70_000 + b" \xff\xfe long\n" + b"last \xc0\xaf line\n"


def tail(path, n: int) -> bytes:
    return subprocess.run(["tail", "-n", str(n), str(path)], capture_output=True, check=True).stdout


@pytest.mark.slow
def test_logs_tail_of_a_5mb_non_utf8_log_is_byte_exact(ssh_fleet):
    fl = ssh_fleet(1, command_timeout=20)
    fl.worker("w-1", "host-01").strategy("noisy")
    fl.write()
    placed = fl.apply()
    fl.wait_runners(placed)

    # Replace the instance's output.log by a 5 MB file owned by the login user (the quiet strategy
    # writes nothing, and the supervisor keeps appending to the old inode anyway).
    idir = fl.instance_dir("w-1", "noisy")
    data = messy_log(SIZE)
    assert len(data) > SIZE
    tmp = idir / ".output.log.test"
    tmp.write_bytes(data)
    os.chmod(tmp, 0o600)
    fl.give_to_login_user(tmp)
    os.replace(tmp, idir / "output.log")
    log = idir / "output.log"

    got = {n: fl.cli("logs", "noisy", "-n", n).stdout for n in (0, 1, 3, 1000)}
    for n, out in got.items():
        assert out == tail(log, n), f"-n {n}: {len(out)} bytes, tail has {len(tail(log, n))}"
    assert got[0] == b"" and got[1] == b"last \xc0\xaf line\n"
    assert got[3].endswith(b"L" * 70_000 + b" \xff\xfe long\nlast \xc0\xaf line\n") and got[1000].count(b"\n") == 1000

    # All of it (more lines than the file has): 5 MB through one SSH command, byte for byte.
    whole = fl.cli("logs", "noisy", "-n", 10_000_000)
    # Compared without letting pytest diff two 5 MB strings (which would take hours).
    exact = whole.stdout == data
    assert exact, f"{len(whole.stdout)} bytes back for {len(data)}, first difference at " \
                  f"{next((i for i, (a, b) in enumerate(zip(whole.stdout, data)) if a != b), 'the end')}"

    # A last line still being written (no newline yet) counts as a line, as with `tail -n`.
    with open(log, "ab") as handle:
        handle.write(b"partial \xff line")
    assert fl.cli("logs", "noisy", "-n", 2).stdout == tail(log, 2) == b"last \xc0\xaf line\npartial \xff line"
    os.truncate(log, len(data))

    # In-process: the same transport carries the raw bytes, then probes as before.
    ctl = fl.controller()
    try:
        fleet = ctl.load_fleet()
        hosts = ctl.hosts(fleet)
        worker = fleet.workers["w-1"]
        agent = hosts.agent_for(worker)
        request = {"workdir": hosts.workdir(worker), "strategy": "noisy", "lines": 10_000_000, "follow": False}
        done = agent.run("logs", request, fleet.settings.ssh.command_timeout_s)
        exact = done.returncode == 0 and done.stdout == data
        assert exact, f"exit {done.returncode}, {len(done.stdout)} bytes back for {len(data)}"
        gathered = gather(fleet, ctl.store.load(), hosts, ctl.clock)
        state = gathered.observed.workers["w-1"]
        assert state.reachable, state.error
        assert state.instances["noisy"].status == "running"
        again = agent.run("logs", {**request, "lines": 3}, fleet.settings.ssh.command_timeout_s)
        assert again.stdout == tail(log, 3)
    finally:
        ctl.close()


FLAKY_JS = r"""
import fs from 'node:fs';
export async function st_init(ctx) { ctx.log(`flaky ${ctx.id} started, epoch ${ctx.epoch}`); }
export async function st_heartbeat(ctx) {
  if (fs.existsSync(ctx.params.downFile)) throw new Error('exchange down');
  ctx.log(`beat ok epoch ${ctx.epoch}`);
}
export async function st_exit(ctx) {}
"""


def stamped(line: str, second: int) -> bytes:
    return f"2026-01-01T00:00:{second:02d}.000Z {line}\n".encode()


@pytest.mark.slow
def test_logs_since_grep_and_retry_over_ssh(ssh_fleet):
    fl = ssh_fleet(1, command_timeout=3)
    down = fl.hosts["host-01"].workdir_root / "exchange-down"
    down.write_text("")
    (fl.dir / "strategies" / "flaky.mjs").write_text(FLAKY_JS)
    fl.worker("w-1", "host-01").strategy("noisy")
    fl.strategy("flaky", file="strategies/flaky.mjs", params={"downFile": str(down)}, heartbeat_ms=100,
                maxErrors=0, maxRestarts=1)
    fl.write()
    fl.apply()

    # A known log: stamped lines, a stack trace without stamps, and a line that backtracks forever.
    idir = fl.instance_dir("w-1", "noisy")
    data = (stamped("boot", 1) + stamped("order placed id=1", 2) + b"  trace line of order 1\n"
            + stamped("order filled id=1", 3) + stamped("tick", 4) + b"a" * 30_000 + b"!\n")
    tmp = idir / ".output.log.test"
    tmp.write_bytes(data)
    fl.give_to_login_user(tmp)
    os.replace(tmp, idir / "output.log")
    since = fl.cli("logs", "noisy", "--since", "2026-01-01T00:00:02+00:00").stdout
    assert since == data[data.index(b"2026-01-01T00:00:02"):], since
    grep = fl.cli("logs", "noisy", "--grep", r"order \w+ id=1").stdout
    assert grep == stamped("order placed id=1", 2) + stamped("order filled id=1", 3)
    both = fl.cli("logs", "noisy", "--since", "2026-01-01T00:00:03Z", "--grep", "order", "-n", "5").stdout
    assert both == stamped("order filled id=1", 3)
    # A pattern that backtracks without end on the strategy's text costs the host a bounded CPU time.
    runaway = fl.cli("logs", "noisy", "--grep", r"(a|aa)+$", check=1, timeout=60)
    assert b"did not finish" in runaway.stderr or b"was ended" in runaway.stderr, runaway.describe()
    wait_for(lambda: not [p for p in processes(fl.markers) if "agent" in p.cmdline and " logs" in p.cmdline],
             10, what="the runaway search ended on the host")

    # retry over SSH: the exchange is back; no commit is needed to start the strategy again.
    wait_for(lambda: any(s["id"] == "flaky" and s["status"] == "error" for s in fl.status()["strategies"]), 20,
             what="flaky in error")
    down.unlink()
    fl.cli("retry", "flaky", "--reason", "exchange back")
    fl.cli("reconcile", "--once")
    wait_for(lambda: b"beat ok" in fl.cli("logs", "flaky", "--grep", "beat ok").stdout, 20,
             what="flaky beating again after the retry")
    state = next(s for s in fl.status()["strategies"] if s["id"] == "flaky")
    assert state["status"] == "running" and state["restarts"] == 0, state
