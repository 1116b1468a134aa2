"""The chaos soak, short: benchmarks/chaos.py's code and targets on 6 sshd hosts and 16 self-auditing
strategies, the real daemon, faults for a minute (RELIABILITY.md has the long runs). No two copies
of a strategy beat at once, no copy ends without a fault to explain it, every strategy beats again
after the faults heal, nothing starts from a commit that does not validate, and the state file is
readable whenever it is sampled."""
from __future__ import annotations

import json

from tests.support import node_problem, require
from benchmarks.chaos import Soak, passed, render


def test_a_short_chaos_soak_keeps_every_promise(tmp_path):
    require(node_problem())
    lines: list[str] = []
    soak = Soak(minutes=1, seed=7, hosts=6, strategies=16, quiet_s=120, base=tmp_path, log=lines.append)
    result = soak.run()
    faults = sum(f["count"] for f in result["faults"].values())
    assert faults >= 4, f"only {faults} faults were injected:\n" + "\n".join(lines)
    assert passed(result), render(result) + "\n\n" + json.dumps(
        {k: result[k] for k in ("duplicates", "false_stops", "lost", "started_from_broken")}, indent=1) \
        + "\n\nfaults:\n" + "\n".join(lines)
