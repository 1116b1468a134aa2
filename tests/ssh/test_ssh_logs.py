"""`quantlab logs` over SSH: the byte-exact tail of a 5 MB output log full of non-UTF-8 bytes, and a
transport that keeps working after carrying such output."""
from __future__ import annotations

import os
import random
import subprocess

import pytest

from quantlab.gather import gather

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
    assert whole.stdout == data

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
        assert done.returncode == 0 and done.stdout == data
        gathered = gather(fleet, ctl.store.load(), hosts, ctl.clock)
        state = gathered.observed.workers["w-1"]
        assert state.reachable, state.error
        assert state.instances["noisy"].status == "running"
        again = agent.run("logs", {**request, "lines": 3}, fleet.settings.ssh.command_timeout_s)
        assert again.stdout == tail(log, 3)
    finally:
        ctl.close()
