"""Copying checkpoints from the hosts: one call per host on the act lane, after the renewals.

Each request names the current placements on the host's workers with the hash of the controller's
copy of each checkpoint; the agent sends back only the folders that differ (see the agent's
`checkpoints`). What comes back is checked (checked_checkpoint) before it is kept, only changed
copies are written, and the folder is synced once per round. The call has its own deadline, and a
host that does not answer in time is left for the next round: nothing here waits on a renewal or
delays one.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

from .hosts import AgentError, HostKey, Hosts
from quantlab.core.memory import Memory
from quantlab.core.spec import Fleet, WorkerSpec
from .statebackend import CheckpointsPort
from .checkpointstore import checked_checkpoint
from .transport.base import TransportError


@dataclass
class Copied:
    fresh: set[str] = field(default_factory=set)          # strategies whose copy is now the host's folder
    written: set[str] = field(default_factory=set)        # ... of which these changed and were written
    dropped: dict[str, str] = field(default_factory=dict)  # strategy -> why its folder cannot be copied
    failed: dict[str, str] = field(default_factory=dict)   # host -> why it gave no answer


def wanted(fleet: Fleet, memory: Memory, workers: set[str], skip: set[str]) -> dict[str, dict[str, int]]:
    """worker -> strategy -> epoch: the current placements on `workers`, less `skip`."""
    out: dict[str, dict[str, int]] = {}
    for sid, p in sorted(memory.placements.items()):
        if sid in fleet.strategies and sid not in skip and p.worker in workers and p.worker in fleet.workers:
            out.setdefault(p.worker, {})[sid] = p.epoch
    return out


def copy_round(fleet: Fleet, hosts: Hosts, store: CheckpointsPort, asked: dict[str, dict[str, int]],
               budget_s: float) -> Copied:
    result = Copied()
    if not asked:
        return result
    groups = hosts.groups([fleet.workers[w] for w in asked])

    def call(key: HostKey, members: list[WorkerSpec]) -> dict[str, Any]:
        request = {"workers": {w.id: {"workdir": hosts.workdir(w),
                                      "instances": {sid: {"epoch": epoch, "have": store.hash_of(sid)}
                                                    for sid, epoch in asked[w.id].items()}}
                               for w in members}}
        return hosts.agent(key, members, "act").call("checkpoints", request, budget_s)

    pool = ThreadPoolExecutor(max_workers=max(1, min(len(groups), fleet.settings.ssh.parallelism)),
                              thread_name_prefix="checkpoints")
    try:
        futures = {pool.submit(call, key, members): key for key, members in groups.items()}
        done, late = wait(futures, timeout=budget_s + fleet.settings.ssh.connect_timeout_s)
    finally:
        pool.shutdown(wait=False)        # a late call ends by its own transport timeout
    copies: dict[str, dict[str, Any]] = {}
    for future in done:
        try:
            answer = future.result()
        except (AgentError, TransportError, OSError) as exc:
            result.failed[str(futures[future])] = str(exc)
            continue
        workers = answer.get("workers") if isinstance(answer.get("workers"), dict) else {}
        for wid, instances in workers.items():
            if wid not in asked or not isinstance(instances, dict):
                continue                  # only what was asked for, from the host it was asked of
            for sid, got in instances.items():
                if sid in asked[wid] and isinstance(got, dict):
                    _take(result, copies, sid, got)
    for future in late:
        result.failed[str(futures[future])] = f"no answer within {budget_s:g} s"
    store.save_many(copies)
    result.written = set(copies)
    return result


def _take(result: Copied, copies: dict[str, dict[str, Any]], sid: str, got: dict[str, Any]) -> None:
    outcome = got.get("result")
    if outcome == "unchanged":
        result.fresh.add(sid)
    elif outcome == "copied":
        checkpoint, problem = checked_checkpoint(got.get("checkpoint"))
        if checkpoint is not None:
            copies[sid] = checkpoint
            result.fresh.add(sid)
        else:
            result.dropped[sid] = problem or "unusable"
    elif outcome == "too-large":
        result.dropped[sid] = "over 1 MiB compressed"
