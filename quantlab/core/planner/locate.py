"""Phase 1: where each strategy runs now — the placement the state remembers, or the newest live
copy it does not know (adopted) — and every other live copy, which is stale."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..observed import Instance
from ..plan import Adopt
from .context import Context, Current


@dataclass
class Located:
    current: dict[str, Current] = field(default_factory=dict)       # strategy -> where it runs
    stale: list[tuple[str, Instance]] = field(default_factory=list)  # (worker, copy) to stop
    adopt: list[Adopt] = field(default_factory=list)                 # copies the state did not know

    def running(self, strategy: str) -> bool:
        """Runs (or, on a worker not answering, is believed to run) as far as the controller knows."""
        cur = self.current.get(strategy)
        return cur is not None and (cur.instance is None or cur.instance.alive)


def locate(ctx: Context) -> Located:
    out = Located()
    alive: dict[str, list[tuple[str, Instance]]] = {}
    for wid, state in sorted(ctx.observed.workers.items()):
        if not ctx.reachable(wid):
            continue
        for inst in state.instances.values():
            if inst.alive and inst.status != "unknown":
                alive.setdefault(inst.strategy, []).append((wid, inst))
    for sid in sorted(set(ctx.memory.placements) | set(alive)):
        copies = alive.get(sid, [])
        newest = max(copies, key=lambda c: (c[1].epoch, c[0]), default=None)
        placed = ctx.memory.placements.get(sid)
        if placed is not None and placed.worker not in ctx.fleet.workers:
            # A renamed worker (same host and workdir): its copy is the placement, under a new id.
            same = [c for c in copies if c[1].epoch == placed.epoch]
            if same:
                newest = same[0]
                placed = None
        if placed is not None and (newest is None or newest[1].epoch <= placed.epoch):
            seen: Instance | None = None
            if ctx.reachable(placed.worker):
                seen = ctx.observed.workers[placed.worker].instances.get(sid)
                if seen is not None and seen.epoch != placed.epoch and seen.status != "unknown":
                    seen = None     # an older copy sits in the folder: the start will replace it
            cur = Current(placed.worker, placed.epoch, placed.spec_hash, placed.paused, seen,
                          launched=placed.launched)
        else:
            assert newest is not None
            wid, inst = newest
            cur = Current(wid, inst.epoch, inst.spec_hash, inst.paused, inst, adopted=True)
            out.adopt.append(Adopt(sid, wid, inst.epoch, inst.spec_hash))
        out.current[sid] = cur
        for wid, inst in copies:
            # Epochs are unique per placement: a copy with the current one is that copy.
            if wid != cur.worker and inst.epoch != cur.epoch:
                out.stale.append((wid, inst))
    return out
