"""Carry out a Plan through the hosts' agents, recording each outcome in the state file as it happens.

Two phases keep the rule "a move off a reachable worker stops, confirms, then starts" without any
cross-host waiting: first every stop (hosts in parallel, in order within a host), then every start,
restart, pause and resume. A failed action does not stop the others.
"""
from __future__ import annotations

import dataclasses
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Literal

from .clock import Clock
from .gather import not_after
from quantlab.core.health import lease_surely_expired_at
from quantlab.host.agent.qlagent.protocol import instance_key
from .hosts import RUNNER_PATH, AgentError, HostKey, Hosts, host_key, strategy_remote_path
from .ledger import Ledger
from quantlab.core.memory import Launched, Memory, Placement, launch_salt
from quantlab.core.observed import ObservedState
from quantlab.core.plan import Action, Plan
from quantlab.core.redact import fleet_secrets, redact_json, redact_text, seal_launch
from quantlab.core.spec import Fleet, StrategySpec, WorkerSpec, worker_launch
from .statebackend import CheckpointsPort, EventsPort
from .store import StateError
from .checkpointstore import checked_checkpoint
from .transport.base import TransportError

# A move off one of these is not preceded by a stop: the planner moves only once the old copy's lease
# has surely run out, and that worker is not asked (offline, or no longer in the fleet).
UNREACHABLE_SOURCE = ("worker-offline", "worker-removed")


@dataclass
class Outcome:
    action: Action
    ok: bool
    detail: str = ""
    seconds: float = 0.0
    # A move is carried out in two phases: "stopped" (the old copy, on its worker) then "done".
    phase: Literal["stopped", "done"] = "done"


@dataclass
class Recorder:
    """Writes each outcome into the memory and the state file at once (through the ledger, which
    the renewal round writes to as well), and into the events log."""

    ledger: Ledger
    events: EventsPort
    actor: str
    revision: dict[str, Any]
    clock: Clock
    checkpoints: CheckpointsPort | None = None

    @property
    def memory(self) -> Memory:
        return self.ledger.memory

    def update(self, change: Callable[[Memory], None]) -> None:
        self.ledger.update(change)

    def event(self, **fields: Any) -> None:
        # History is best effort: an events log that cannot be written never stops the actions.
        # Redacted as it becomes history: reasons and errors may quote a URL with credentials.
        self.events.append(redact_json({"t": self.clock.wall(), "actor": self.actor, **self.revision, **fields}))


Progress = Callable[[str, Action, "Outcome | None"], None]


def start_timeout_s(fleet: Fleet, spec: StrategySpec) -> float:
    """A start may first stop the copy it replaces (its stop timeout), then spawns the supervisor."""
    return fleet.settings.ssh.command_timeout_s + spec.scheduling.stop_timeout_s + 5


def start_request(hosts: Hosts, fleet: Fleet, worker: WorkerSpec, spec: StrategySpec, epoch: int,
                  paused: bool) -> dict[str, Any]:
    return {
        "worker": worker.id, "workdir": hosts.workdir(worker), "strategy": spec.id, "epoch": epoch,
        "specHash": spec.spec_hash, "file": strategy_remote_path(spec), "runnerFile": RUNNER_PATH,
        "runner": list(worker.runner), "params": spec.params, "heartbeatMs": spec.heartbeat_ms,
        "scheduling": spec.scheduling.as_json(), "region": worker.region, "proxy": worker.proxy,
        "account": spec.requirements.account, "leaseTtlSeconds": fleet.settings.monitor.lease_ttl_s,
        "paused": paused,
    }


class Executor:
    def __init__(self, fleet: Fleet, hosts: Hosts, recorder: Recorder, progress: Progress | None = None,
                 may_act: Callable[[], str | None] = lambda: None, observed: ObservedState | None = None):
        self.fleet, self.hosts, self.rec = fleet, hosts, recorder
        self.observed = observed          # what the plan was made from (which copies' folders each host has)
        self.progress = progress or (lambda *_: None)
        self.may_act = may_act            # why this controller must not act any more (it lost the lead)
        self.settings = fleet.settings
        self.secrets = fleet_secrets(fleet)  # masked in the errors of hosts and transports

    # --- agent calls ---------------------------------------------------------------------------

    def _worker(self, worker_id: str) -> WorkerSpec:
        worker = self.fleet.workers.get(worker_id)
        if worker is None:
            raise AgentError(worker_id, "worker is not in the fleet any more", maybe_ran=False)
        return worker

    def _start(self, worker_id: str, spec: StrategySpec, epoch: int, paused: bool, until: int,
               checkpoint: dict[str, Any] | None = None) -> str:
        """Start on `worker_id`; the request is void on the host after `until` (mono ms)."""
        worker = self._worker(worker_id)
        agent = self.hosts.agent_for(worker)
        request = start_request(self.hosts, self.fleet, worker, spec, epoch, paused)
        if self.settings.monitor.fencing:
            request["notAfter"] = not_after(self.rec.memory.host_clocks[worker_id], until)
            key = self.rec.memory.lease_key
            if key is not None:      # only renewals proved with the copy's key extend its lease
                request["leaseKey"] = instance_key(bytes.fromhex(key), spec.id, epoch)
        if checkpoint:
            request["checkpoint"] = checkpoint
        timeout = max(0.1, (until - self.rec.clock.mono()) / 1000)
        answer = agent.call("start", request, timeout)
        if answer.get("result") == "missing":
            # Content-addressed files go up only when the host lacks them.
            for name in answer.get("missing", []):
                if name == RUNNER_PATH:
                    self.hosts.upload_runner(worker)
                else:
                    self.hosts.upload_strategy(worker, spec)
            answer = agent.call("start", request, max(0.1, (until - self.rec.clock.mono()) / 1000))
        result = answer.get("result")
        if result in ("refused", "busy"):
            raise AgentError(agent.label, f"start of {spec.id} {result}: {answer.get('reason')}; nothing was started",
                             maybe_ran=False)
        if result not in ("started", "already-running"):
            raise AgentError(agent.label, f"start of {spec.id} answered {answer}")    # what it did is unknown
        return str(result)

    def _simple(self, command: str, worker_id: str, strategy: str, epoch: int | None, grace: float,
                reason: str, **extra: Any) -> dict[str, Any]:
        worker = self._worker(worker_id)
        request = {"workdir": self.hosts.workdir(worker), "strategy": strategy, "epoch": epoch,
                   "stopTimeoutSeconds": grace, "reason": reason, **extra}
        answer = self.hosts.agent_for(worker).call(command, request, self.settings.ssh.command_timeout_s + grace + 5)
        if answer.get("result") == "busy":
            # Its instance lock is held (by the strategy, perhaps): nothing was done, and a move must not
            # start a second copy on the strength of a stop that did not happen.
            raise AgentError(worker_id, f"{command} of {strategy} not done: {answer.get('reason')}", maybe_ran=False)
        if answer.get("result") == "unconfirmed":
            raise AgentError(worker_id, f"{command} of {strategy} was not confirmed: {answer}")
        return answer

    def _grace(self, strategy: str) -> float:
        """st_exit's time: the fleet's value, or the one the copy was started with once it is removed."""
        spec = self.fleet.strategies.get(strategy)
        if spec is not None:
            return spec.scheduling.stop_timeout_s
        placed = self.rec.memory.placements.get(strategy)
        started_with = placed.launched.scheduling if placed is not None and placed.launched is not None else {}
        return float(started_with.get("stopTimeoutSeconds") or 30.0)

    # --- one action ----------------------------------------------------------------------------

    def stop_phase(self, a: Action) -> Outcome:
        """Stops, and the first half of a move off a reachable worker."""
        worker = a.source if a.action == "move" else a.worker
        assert worker is not None
        reason = {"stale-copy": "stale copy: the current one runs elsewhere", "removed": "removed from fleet",
                  "desired-stopped": "desiredState: stopped", "stop-all": a.reason}.get(a.cause, f"moving to {a.target}")
        epoch = a.epoch if a.action == "stop" else self._current_epoch(a.strategy, worker)
        # What stays placed on this worker keeps its folder; older stopped ones beyond the newest few go.
        keep = sorted(sid for sid, p in self.rec.memory.placements.items() if p.worker == worker)
        # Every stop but a stale copy's takes the final checkpoint, after the copy exited (so with what
        # st_exit wrote): a move carries it along, and a strategy stopped or removed keeps it.
        final = a.cause != "stale-copy"
        answer = self._simple("stop", worker, a.strategy, epoch, self._grace(a.strategy), reason,
                              checkpoint=final, keep=keep)
        result = str(answer.get("result"))
        if a.action == "move" and result == "epoch-mismatch":
            # Another copy than the one being moved runs there: starting a new one could make two.
            raise AgentError(worker, f"{a.strategy} there runs epoch {answer.get('running')}, not the "
                                     f"placement being moved (epoch {epoch}); nothing was started")
        if final and result != "epoch-mismatch" and "checkpoint" in answer:
            if answer["checkpoint"]:
                self._keep_checkpoint(a.strategy, answer["checkpoint"])
            elif self.rec.checkpoints is not None:
                # Too large to copy: an older copy must never be restored as if it were the last state.
                self.rec.checkpoints.forget(a.strategy)
        if a.action == "move":
            return Outcome(a, True, f"stopped on {worker} ({result})", phase="stopped")
        if a.cause != "stale-copy":
            def forget(m: Memory) -> None:
                p = m.placements.get(a.strategy)
                if p is not None and p.worker == worker and (a.epoch is None or p.epoch == a.epoch):
                    del m.placements[a.strategy]
                    m.restarts.pop(a.strategy, None)
            self.rec.update(forget)
        return Outcome(a, True, result)

    def _keep_checkpoint(self, strategy: str, checkpoint: dict[str, Any]) -> None:
        if self.rec.checkpoints is None:
            return
        kept, _ = checked_checkpoint(checkpoint)       # a host's answer is hostile input
        if kept is None:
            self.rec.checkpoints.forget(strategy)
            return
        self.rec.checkpoints.save(strategy, kept)
        now = self.rec.clock.mono()
        self.rec.update(lambda m: m.checkpoints.__setitem__(strategy, now))

    def _current_epoch(self, strategy: str, worker: str) -> int | None:
        p = self.rec.memory.placements.get(strategy)
        return p.epoch if p is not None and p.worker == worker else None

    def run_phase(self, a: Action) -> Outcome:
        """The second phase: pauses, resumes, and every start (start, restart, a move's new copy)."""
        if a.action in ("pause", "resume"):
            return self._set_paused(a)
        return self._start_copy(a)

    def _set_paused(self, a: Action) -> Outcome:
        assert a.worker is not None
        result = str(self._simple(a.action, a.worker, a.strategy, a.epoch, 0, a.reason).get("result"))
        paused = a.action == "pause"

        def mark(m: Memory) -> None:
            p = m.placements.get(a.strategy)
            if p is not None:
                m.placements[a.strategy] = dataclasses.replace(p, paused=paused)
        self.rec.update(mark)
        return Outcome(a, True, result)

    def _lease_still_alive(self, a: Action) -> bool:
        """A failover is planned once the old copy's lease has surely run out; a renewal that got
        through since (its host came back) may have revived it: then the move waits for the next plan."""
        assert a.source is not None
        spec = self.fleet.strategies[a.strategy]
        expiry = lease_surely_expired_at(a.strategy, a.source, self.rec.memory, self.settings.monitor,
                                         spec.scheduling.stop_timeout_s)
        return expiry > self.rec.clock.mono()

    def _has_folder(self, worker: str, placement: Placement) -> bool:
        """Whether `worker`'s host reported the instance folder of this placement's copy (its epoch):
        a start whose answer was lost may never have run there, and a folder of an earlier stint there
        is older than the controller's copy. Without an observation (stop-all), it is taken to."""
        if self.observed is None:
            return True
        state = self.observed.worker(worker)
        found = state.instances.get(placement.strategy) if state is not None else None
        return found is not None and found.epoch == placement.epoch

    def _start_copy(self, a: Action) -> Outcome:
        spec = self.fleet.strategies.get(a.strategy)
        if spec is None:
            raise AgentError(a.strategy, "strategy is not in the fleet any more", maybe_ran=False)
        target = a.target if a.action == "move" else a.worker
        assert target is not None and a.epoch is not None
        worker = self._worker(target)
        if self.settings.monitor.fencing and target not in self.rec.memory.host_clocks:
            raise AgentError(target, "its host has not answered a probe with its clock yet; the start waits for it",
                             maybe_ran=False)
        if a.action == "move" and a.cause in UNREACHABLE_SOURCE and self.settings.monitor.fencing \
                and self._lease_still_alive(a):
            raise AgentError(target, f"the copy on {a.source} may hold a lease again (its host answered a renewal "
                                     "since this plan was made); nothing was started", maybe_ran=False)
        ttl_ms = int(self.settings.monitor.lease_ttl_s * 1000)
        until = self.rec.clock.mono() + int(start_timeout_s(self.fleet, spec) * 1000)
        previous = self.rec.memory.placements.get(a.strategy)
        placed_at = previous.placed_at if (a.action == "restart" and previous is not None) else self.rec.clock.wall()
        intended = Placement(a.strategy, target, a.epoch, spec.spec_hash, a.paused, placed_at,
                             # Its worker's proxy kept without its credentials (digested, to tell a change).
                             Launched.from_json({**spec.launch_fields(), "worker": seal_launch(
                                 worker_launch(worker), launch_salt(self.rec.memory.lineage))}),
                             self.rec.revision.get("revision"))

        def record(m: Memory, placement: Placement | None) -> None:
            if placement is None:
                m.placements.pop(a.strategy, None)
            else:
                m.placements[a.strategy] = placement

        # The intent is recorded before the host is asked: should this run die, or the answer be lost,
        # the next one knows a copy may run there, and that no lease it got outlives until + TTL.
        ledger = self.rec.ledger
        booking = ledger.request_leases({target: until + ttl_ms} if ttl_ms else {}, lambda m: record(m, intended))
        # A new copy continues where the strategy left off: its last checkpoint goes with it — to the new
        # worker of a move, and to a start of a strategy that ran before (removed and put back, stopped
        # and started, resumed after stop-all), whose copy was kept for that (CHECKPOINT_RETENTION_S).
        # A copy started again where its placement was (a restart; a start after its lease ran out there)
        # finds its folder on that host, which is newer than any copy: what it did in the dark is kept.
        again_in_place = previous is not None and previous.worker == target and self._has_folder(target, previous)
        checkpoint = (self.rec.checkpoints.load(a.strategy)
                      if a.action in ("move", "start") and not again_in_place and self.rec.checkpoints else None)
        try:
            result = self._start(target, spec, a.epoch, a.paused, until, checkpoint)
        except (TransportError, AgentError, OSError) as exc:
            if getattr(exc, "maybe_ran", True):     # it may run there: keep the record and the bound
                ledger.settle_lease(booking, target, until + ttl_ms)
            else:                                   # it never ran, or the host said no: nothing started
                ledger.settle_lease(booking, target, None)
                self.rec.update(lambda m: record(m, previous))
            raise
        ledger.settle_lease(booking, target, min(self.rec.clock.mono(), until) + ttl_ms)
        if checkpoint:
            result += f", checkpoint of {len(checkpoint.get('files', {}))} file(s) restored"
        failover = a.action == "move" and a.cause in UNREACHABLE_SOURCE
        now = self.rec.clock.mono()

        def started(m: Memory) -> None:
            m.restarts[a.strategy] = 0
            m.retry.pop(a.strategy, None)           # a new copy: what retry asked for is done
            if failover:                            # counted for the reschedule backoff
                count, _ = m.reschedules.get(a.strategy, (0, now))
                m.reschedules[a.strategy] = (count + 1, now)
        self.rec.update(started)
        return Outcome(a, True, result)

    # --- the plan ------------------------------------------------------------------------------

    def _safely(self, fn: Callable[[Action], Outcome], a: Action) -> Outcome:
        started = time.monotonic()
        self.progress("begin", a, None)
        try:
            refused = self.may_act()
            if refused is not None:
                raise AgentError(a.worker or a.target or a.strategy, refused, maybe_ran=False)
            outcome = fn(a)
        except (TransportError, AgentError, OSError, StateError) as exc:
            # An agent's error may quote the request it got, which holds the worker's proxy.
            outcome = Outcome(a, False, redact_text(str(exc), self.secrets))
        outcome.seconds = time.monotonic() - started
        return outcome

    def _by_host(self, items: list[tuple[str | None, Action]]) -> dict[HostKey, list[Action]]:
        out: dict[HostKey, list[Action]] = {}
        for worker_id, a in items:
            worker = self.fleet.workers.get(worker_id)
            key = host_key(worker) if worker else HostKey(f"?{worker_id}")
            out.setdefault(key, []).append(a)
        return out

    def _run(self, groups: dict[HostKey, list[Action]], fn: Callable[[Action], Outcome]) -> list[Outcome]:
        outcomes: list[Outcome] = []
        lock = threading.Lock()

        def host_queue(actions: list[Action]) -> None:
            for a in actions:
                outcome = self._safely(fn, a)
                self.finished(outcome)
                with lock:
                    outcomes.append(outcome)

        parallel = max(1, min(self.settings.ssh.parallelism, len(groups)))
        with ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="apply") as pool:
            list(pool.map(host_queue, groups.values()))
        return outcomes

    def finished(self, outcome: Outcome) -> None:
        a = outcome.action
        if outcome.phase == "stopped":
            self.progress("step", a, outcome)
            return
        self.progress("done", a, outcome)
        where = {"from": a.source, "to": a.target} if a.action == "move" else {"worker": a.worker}
        self.rec.event(event=a.action, strategy=a.strategy, **where, epoch=a.epoch, reason=a.reason,
                       cause=a.cause, outcome="ok" if outcome.ok else "failed",
                       **({} if outcome.ok else {"error": outcome.detail}))

    def execute(self, plan: Plan) -> list[Outcome]:
        def reserve(m: Memory) -> None:
            # Epochs are reserved before anything starts, so a crash can never reuse one.
            m.next_epoch = max(m.next_epoch, plan.next_epoch)
            m.rr_cursor = plan.rr_cursor
            for adopt in plan.adopt:
                known = m.placements.get(adopt.strategy)
                # Newer than what the state knows, or the same copy under a renamed worker.
                if known is None or known.epoch < adopt.epoch or (known.epoch == adopt.epoch
                                                                  and known.worker != adopt.worker):
                    m.placements[adopt.strategy] = Placement(adopt.strategy, adopt.worker, adopt.epoch,
                                                             adopt.spec_hash or "", placed_at=self.rec.clock.wall(),
                                                             launched=known.launched if known else None)
        self.rec.update(reserve)
        stops = [(a.worker, a) for a in plan.actions if a.action == "stop"]
        stops += [(a.source, a) for a in plan.actions if a.action == "move" and a.cause not in UNREACHABLE_SOURCE]
        outcomes = self._run(self._by_host(stops), self.stop_phase)
        # A copy that did not confirm it stopped blocks every start of that strategy in this run.
        unconfirmed = {o.action.strategy: o for o in outcomes if not o.ok}
        failed_moves = [o for o in outcomes if o.action.action == "move" and not o.ok]
        for o in failed_moves:
            o.detail = (f"the copy on {o.action.source} did not confirm it stopped, so no second copy was "
                        f"started: {o.detail}")
        rest = [(a.target if a.action == "move" else a.worker, a) for a in plan.actions
                if a.action != "stop" and a.strategy not in unconfirmed]
        held = [Outcome(a, False, f"not started: a copy on {unconfirmed[a.strategy].action.workers[0]} did not "
                                  f"confirm it stopped ({unconfirmed[a.strategy].detail})")
                for a in plan.actions if a.action in ("start", "restart") and a.strategy in unconfirmed]
        for o in held:
            self.finished(o)
        outcomes = [o for o in outcomes if o.action.action == "stop"] + failed_moves + held
        outcomes += self._run(self._by_host(rest), self.run_phase)
        return outcomes


def outcome_notices(plan: Plan, outcomes: list[Outcome], now_ms: int
                    ) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """What an operator should hear about from applying a plan: failovers (one-off notices), and
    failed actions and guard refusals (alerts, told once until they clear)."""
    notices, raised = [], {}
    for o in outcomes:
        a = o.action
        if not o.ok:
            raised[f"failed:{a.action}:{a.strategy}"] = {
                "t": now_ms, "kind": "action-failed", "strategy": a.strategy, "worker": a.target or a.worker,
                "message": f"{a.action} {a.strategy} failed: {o.detail}"}
        elif a.action == "move" and a.cause in UNREACHABLE_SOURCE:
            notices.append({"t": now_ms, "kind": "failover", "strategy": a.strategy, "worker": a.target,
                            "message": f"moved from {a.source} to {a.target}: {a.reason}"})
    for b in plan.refused:
        raised[f"guard:{b.guard}"] = {"t": now_ms, "kind": "guard-blocked", "message": b.reason}
    return notices, raised
