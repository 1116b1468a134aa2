"""Gather: one probe per host per round, all hosts at once, into the ObservedState the planner reads.

The probes are the leases' lifeline, so a round never waits for a host past that host's deadline:
a host that has not answered by then counts as not answering this round, and the round goes on
without it. At most one probe per host is outstanding; while one still is, the next round sends
none to that host and counts that one's answer, should it come in time.

Every renewal carries a not-after instant on the host's boot-time clock: the round's deadline for
that host, mapped through the host clock of an earlier answer. The agent refuses a request that
arrives later and never grants past not-after + TTL, so the bound the controller records before
sending (deadline + TTL, on its own boot-time clock) holds whether or not the call ever returns.
"""
from __future__ import annotations

import re
import threading
import time
from concurrent.futures import Future, wait
from dataclasses import dataclass, field
from typing import Any, Protocol

from .clock import Clock
from quantlab.host.agent.qlagent.protocol import FOLLOWED_TERM, instance_key, lease_proof
from .hosts import AgentError, HostKey, Hosts
from quantlab.core.memory import HostClock, Memory
from quantlab.core.observed import Instance, ObservedState, WorkerState
from quantlab.core.spec import Fleet, WorkerSpec

STRATEGY_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
# How far two machines' clock rates may differ (1000 ppm, ten times a free-running quartz): the
# not-after a request carries is shortened by this much of the time since the host clock was read.
CLOCK_DRIFT = 1e-3
# A host clock read longer ago than this is read again (a probe without renewals) before a renewal.
HOST_CLOCK_MAX_AGE_MS = 10 * 60_000


@dataclass
class Gathered:
    observed: ObservedState
    started: int = 0                                             # mono ms the round began
    answered_at: dict[str, int] = field(default_factory=dict)    # worker -> mono ms its host answered
    seen_wall: dict[str, int] = field(default_factory=dict)      # worker -> the same, epoch ms
    renewed: dict[str, list[str]] = field(default_factory=dict)  # worker -> strategies whose lease was renewed
    refused: dict[str, str] = field(default_factory=dict)        # worker -> why its host granted no renewal
    host_clocks: dict[str, HostClock] = field(default_factory=dict)
    host_events: list[dict[str, Any]] = field(default_factory=list)
    fences: dict[str, int] = field(default_factory=dict)         # worker -> highest controller term its workdir saw
    # worker -> a term its workdir reports that no controller uses (see protocol.FOLLOWED_TERM): not followed
    odd_fences: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def silent(self) -> list[str]:
        return [wid for wid, s in self.observed.workers.items() if not s.reachable]


class OutOfTime(AgentError):
    """This side was too late to send a renewal in its round (a busy controller): nothing about the
    host, which stays warm."""

    def __init__(self, host: str):
        super().__init__(host, "no time left in this round to send its renewals", maybe_ran=False)


class LeaseRequests(Protocol):
    """Where renewals are booked before they are sent and settled after (ledger.Ledger)."""

    def request_leases(self, bounds: dict[str, int]) -> int: ...

    def settle_lease(self, booking: int, worker: str, until: int | None) -> None: ...


def renewals(memory: Memory) -> dict[str, dict[str, int]]:
    """Leases to renew, by worker: every current placement. A strategy the fleet no longer wants
    keeps its lease until a stop ends it, so a stop the mass-stop guard refuses is not carried out
    by fencing instead; a copy that is not the current placement never gets one."""
    if memory.suspended.get("*", {}).get("stopAll"):
        return {}                     # `quantlab stop-all`: every lease runs out until `resume`
    out: dict[str, dict[str, int]] = {}
    for sid, p in memory.placements.items():
        out.setdefault(p.worker, {})[sid] = p.epoch
    return out


def renewal_proofs(lease_key: str | None, renew: dict[str, dict[str, int]],
                   limit: dict[str, Any]) -> dict[str, dict[str, str]]:
    """worker -> strategy -> the proof that this renewal (up to `limit`) comes from the controller,
    which each copy's supervisor checks with the key its start gave it (see protocol.lease_proof)."""
    if lease_key is None:
        return {}
    secret = bytes.fromhex(lease_key)
    return {wid: {sid: lease_proof(instance_key(secret, sid, epoch), epoch, limit) for sid, epoch in asked.items()}
            for wid, asked in renew.items()}


def not_after(host_clock: HostClock, until_mono_ms: int) -> dict[str, Any]:
    """`until_mono_ms` (the controller's boot-time clock) on the host's boot-time clock, never later:
    the host read its clock no later than we received it, and its rate may differ by CLOCK_DRIFT."""
    elapsed_s = max(0, until_mono_ms - host_clock.at) / 1000
    return {"bootId": host_clock.boot_id, "boottime": host_clock.boottime + elapsed_s * (1 - CLOCK_DRIFT)}


def _host_clock(host: dict[str, Any], at: int) -> HostClock | None:
    boot, seconds = host.get("bootId"), host.get("boottime")
    if not isinstance(boot, str) or isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        return None
    return HostClock(boot, float(seconds), at)


def _instance(sid: str, raw: dict[str, Any]) -> Instance:
    """What the agent said of one instance; anything this controller cannot read makes it `unknown`
    (left alone by the planner), never an error of its host."""
    try:
        return Instance.from_json(raw)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        return Instance(sid, 0, None, "unknown", True, reason=f"the agent's report of it is unreadable ({exc})")


def _worker_state(worker: WorkerSpec, raw: dict[str, Any], host: dict[str, Any], at_wall: int) -> WorkerState:
    runtime = raw.get("runtime") if isinstance(raw.get("runtime"), dict) else {}
    error = None
    if runtime.get("path") is None:
        error = (f"{runtime.get('program', worker.runner[0])} not found on the host's PATH: install it "
                 "(Node.js 18+ for the reference runner) or set the worker's runner")
    cpus = int(host.get("cpus") or 1)
    load = host.get("loadavg") or [0.0]
    instances = {}
    for sid, inst in (raw.get("instances") or {}).items():
        # Only what could be a strategy of ours: a host's answer never names controller paths.
        if not (isinstance(inst, dict) and STRATEGY_ID.fullmatch(str(sid)) and inst.get("strategy") == sid):
            continue
        instances[sid] = _instance(sid, inst)
    answered = host.get("answeredAt")
    return WorkerState(
        worker=worker.id, reachable=True, error=error, cpus=cpus, cpu=float(load[0]) / cpus,
        mem_free_mb=host.get("memFreeMb"), credentials=frozenset(raw.get("credentials") or ()),
        instances=instances, host_time=host.get("time"),
        clock_skew_ms=int(answered) - at_wall if isinstance(answered, (int, float)) else None,
        versions={"python": host.get("python"), runtime.get("program", "runner"): runtime.get("version")},
        containment=raw.get("containment") if isinstance(raw.get("containment"), str) else None,
        disk_free_mb=_count(raw.get("diskFreeMb")), disk_low=raw.get("diskLow") is True,
    )


def _count(value: Any) -> int | None:
    """A non-negative integer a host reported, or None (a host's numbers are hostile input)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2 ** 53 else None


@dataclass
class _Call:
    """One host's probe, sent by one round: what it asks, and what came back. A cold host's call is
    two requests in one thread: a plain probe (connection, the host's clock), then its renewals."""

    key: HostKey
    members: list[WorkerSpec]
    request: dict[str, Any]
    renew: dict[str, dict[str, int]]       # worker -> strategy -> epoch, for this host
    wait_until: int                        # mono ms: how long the round that sent it waits for it
    gives_up_at: int                       # mono ms: when the call itself gives up
    warm: bool                             # renew at once (else: plain probe first)
    future: Future = field(default_factory=Future)
    sent_at: int = 0
    renewal_deadline: int = 0              # mono ms: the renewal's not-after (on the controller's clock)
    booking: int | None = None             # the lease requests its renewals were booked under
    renewals_sent: bool = False
    answer: dict[str, Any] | None = None
    answered_at: int = 0
    host_clock: HostClock | None = None
    lease_key: str | None = None           # the state's, to prove each renewal (renewal_proofs)

    @property
    def done(self) -> bool:
        return self.future.done()


class Prober:
    """Probes the hosts of a fleet, one round at a time, on the probe lane of their connections (see
    hosts.Lane). It keeps across rounds which host still has a probe outstanding, which hosts are
    warm (answered on this lane before, with a clock read recently) and the newest clock of each host.

    A warm host is sent its renewals at once: the request goes out over a live connection, so the
    bound booked before the round is the bound of a request that does reach it. A cold host is first
    probed plainly (that may take a new connection: the call may take the connect timeout more,
    though only a process's first round waits that long); once it answers, its renewals follow in the
    same thread, booked first. A host that stops answering turns cold, so its bound is not pushed
    forward on every round of an outage (it would never surely expire)."""

    def __init__(self, hosts: Hosts, clock: Clock):
        self.hosts, self.clock = hosts, clock
        self._outstanding: dict[HostKey, _Call] = {}
        self._warm: set[HostKey] = set()
        self._clocks: dict[HostKey, HostClock] = {}
        self._rounds = 0
        self._lock = threading.Lock()

    def round(self, fleet: Fleet, memory: Memory, *, renew: dict[str, dict[str, int]] | None = None,
              deadline_s: float | None = None,
              leases: LeaseRequests | None = None) -> Gathered:
        """Probe every host of `fleet` once. `renew` (worker -> strategy -> epoch) names the leases to
        extend. Renewals need `leases`: before any is
        sent, the bound (worker -> mono ms) past which no lease it asks for can live is booked there
        (durably: the call may reach the host even if its answer never comes back), and each is
        settled once its fate is known."""
        started_s = time.monotonic()
        t0 = self.clock.mono()
        settings = fleet.settings
        wanted = renew if renew and settings.monitor.fencing and leases is not None else {}
        budget_ms = int((deadline_s if deadline_s is not None else settings.probe_deadline_s) * 1000)
        first_round = self._rounds == 0
        self._rounds += 1
        # A renewal round carries the controller's term (raising it on every host, even one with
        # nothing to renew); any other round only asks which term the hosts have seen.
        fence = self.hosts.fence()
        if fence is not None and renew is None:
            fence = {**fence, "term": None}
        sent, carried = self._claim(fleet, memory, wanted, t0, budget_ms,
                                    int(settings.ssh.connect_timeout_s * 1000), first_round, fence)
        ttl_ms = int(settings.monitor.lease_ttl_s * 1000)
        bounds = {wid: call.renewal_deadline + ttl_ms for call in sent if call.warm for wid in call.renew}
        booking = leases.request_leases(bounds) if bounds and leases is not None else None
        for call in sent:
            call.booking = booking if call.warm else None
            self._dispatch(call, ttl_ms, budget_ms, leases)
        calls = sent + carried
        last = max([c.wait_until for c in sent] + [t0 + budget_ms], default=t0 + budget_ms)
        wait([c.future for c in calls], timeout=max(0.0, (last - self.clock.mono()) / 1000) + 0.05)
        result = Gathered(ObservedState({}, t0), started=t0)
        states: dict[str, WorkerState] = {}
        for call in calls:
            self._collect(call, result, states, carried=call in carried)
        result.observed = ObservedState(dict(sorted(states.items())), self.clock.mono())
        result.host_events.sort(key=lambda e: (e.get("t", 0), e["worker"], e["strategy"]))
        result.seconds = time.monotonic() - started_s
        return result

    def _claim(self, fleet: Fleet, memory: Memory, wanted: dict[str, dict[str, int]], t0: int, budget_ms: int, connect_ms: int,
               first_round: bool, fence: dict[str, Any] | None) -> tuple[list[_Call], list[_Call]]:
        """A new call for every host without one outstanding (claimed at once, so that an overlapping
        round never sends a second), and the outstanding ones, whose answers count in this round."""
        sent: list[_Call] = []
        carried: list[_Call] = []
        with self._lock:
            for key, members in self.hosts.groups(list(fleet.workers.values())).items():
                outstanding = self._outstanding.get(key)
                if outstanding is not None and not outstanding.done:
                    carried.append(outstanding)
                    continue
                warm = key in self._warm and key in self._clocks and \
                    self.clock.mono() - self._clocks[key].at <= HOST_CLOCK_MAX_AGE_MS
                renew = {w.id: wanted[w.id] for w in members if wanted.get(w.id)}
                gives_up = t0 + budget_ms + (0 if warm else connect_ms)
                # A first round waits for a cold host's plain probe and then for its renewals.
                patience = gives_up + (budget_ms if renew and not warm else 0)
                call = _Call(key, members, self._request(members, memory, fence), renew,
                             wait_until=patience if first_round else t0 + budget_ms, gives_up_at=gives_up,
                             warm=warm, sent_at=t0, renewal_deadline=t0 + budget_ms, lease_key=memory.lease_key)
                self._outstanding[key] = call
                sent.append(call)
        return sent, carried

    # --- one host ------------------------------------------------------------------------------

    def _request(self, members: list[WorkerSpec], memory: Memory, fence: dict[str, Any] | None) -> dict[str, Any]:
        return {
            "workers": [{"id": w.id, "workdir": self.hosts.workdir(w), "program": w.runner[0]} for w in members],
            "eventsSince": {w.id: memory.host_events.get(w.id, 0) for w in members},
            **({"fence": fence} if fence is not None else {}),
        }

    def _dispatch(self, call: _Call, ttl_ms: int, budget_ms: int, leases: LeaseRequests | None) -> None:
        def run() -> None:
            failure: BaseException | None = None
            try:
                self._call_host(call, ttl_ms, budget_ms, leases)
            except BaseException as exc:  # noqa: BLE001 - handed to the round, which says it per host
                failure = exc
                if not isinstance(exc, OutOfTime):
                    with self._lock:
                        self._warm.discard(call.key)
            finally:
                try:
                    self._settle(call, leases, ttl_ms, failure)
                finally:
                    if failure is None:
                        call.future.set_result(call)
                    else:
                        call.future.set_exception(failure)
        threading.Thread(target=run, name=f"probe-{call.key}", daemon=True).start()

    def _ask(self, call: _Call, request: dict[str, Any], until: int) -> dict[str, Any]:
        agent = self.hosts.agent(call.key, call.members, "probe")
        answer = agent.call("probe", request, max(0.1, (until - self.clock.mono()) / 1000))
        call.answered_at = self.clock.mono()
        clock = _host_clock(answer.get("host") if isinstance(answer.get("host"), dict) else {}, call.answered_at)
        if clock is not None:
            call.host_clock = clock
            with self._lock:
                self._clocks[call.key] = clock
        call.answer = answer
        return answer

    def _call_host(self, call: _Call, ttl_ms: int, budget_ms: int, leases: LeaseRequests | None) -> None:
        if not call.warm or not call.renew:
            self._ask(call, call.request, call.gives_up_at)
            if not call.renew or call.host_clock is None:
                return
            # A cold host answered: its renewals now, booked first, with a deadline of their own.
            call.renewal_deadline = self.clock.mono() + budget_ms
            call.booking = leases.request_leases({wid: call.renewal_deadline + ttl_ms for wid in call.renew})
        with self._lock:
            host_clock = self._clocks[call.key]
        for attempt in (1, 2):
            if self.clock.mono() >= call.renewal_deadline:
                raise OutOfTime(str(call.key))
            limit = not_after(host_clock, call.renewal_deadline)
            request = {**call.request, "renew": call.renew, "leaseTtlSeconds": ttl_ms / 1000, "notAfter": limit,
                       "proofs": renewal_proofs(call.lease_key, call.renew, limit)}
            call.renewals_sent = True
            answer = self._ask(call, request, call.renewal_deadline)
            if not (answer.get("host") or {}).get("renewRefused") or attempt == 2 or call.host_clock is None:
                return
            host_clock = call.host_clock       # rebooted, or our copy of its clock was off: once more

    @staticmethod
    def _settle(call: _Call, leases: LeaseRequests | None, ttl_ms: int, failure: BaseException | None) -> None:
        """Each renewal's fate: granted (its lease ends by the answer's arrival + TTL, and never past
        the not-after + TTL the agent enforces), not reached (nothing), or unknown — the answer was
        lost after the request went out, or cannot be read — (the whole bound)."""
        if leases is None or call.booking is None:
            return
        bound = call.renewal_deadline + ttl_ms
        for wid in call.renew:
            until: int | None = bound
            if failure is None:
                try:
                    renewed = ((call.answer or {}).get("workers") or {}).get(wid, {}).get("renewed")
                    until = min(call.answered_at + ttl_ms, bound) if renewed else None
                except AttributeError:
                    until = bound
            elif not (call.renewals_sent and getattr(failure, "maybe_ran", True)):
                until = None
            leases.settle_lease(call.booking, wid, until)

    # --- the round's result --------------------------------------------------------------------

    def _collect(self, call: _Call, result: Gathered, states: dict[str, WorkerState], carried: bool) -> None:
        """`call`'s answer into this round's result; any failure is this host's alone."""
        members = call.members
        if not call.done:
            if carried:
                why = f"its probe sent {(result.started - call.sent_at) / 1000:.1f}s ago has not answered yet"
            else:
                why = f"no answer within the probe deadline of {(call.wait_until - call.sent_at) / 1000:.3g}s"
            for w in members:
                states[w.id] = WorkerState(w.id, False, error=f"{why}; the host may be overloaded or frozen")
            return
        try:
            call.future.result()
            self._record(call, result, states)
        except Exception as exc:  # noqa: BLE001 - a bad ssh_config line, a garbled answer: this host's only
            for w in members:
                states[w.id] = WorkerState(w.id, False, error=str(exc) if str(exc) else type(exc).__name__)
                for per_worker in (result.answered_at, result.seen_wall, result.host_clocks, result.refused,
                                   result.renewed, result.fences, result.odd_fences):
                    per_worker.pop(w.id, None)
            return
        with self._lock:
            self._warm.add(call.key)

    def _record(self, call: _Call, result: Gathered, states: dict[str, WorkerState]) -> None:
        answer = call.answer
        if not isinstance(answer, dict):
            raise AgentError(str(call.key), "no answer")
        host = answer.get("host") if isinstance(answer.get("host"), dict) else {}
        workers = answer.get("workers") if isinstance(answer.get("workers"), dict) else {}
        at_wall = self.clock.wall()
        refused = host.get("renewRefused") if call.renewals_sent else None
        events: list[dict[str, Any]] = []
        for w in call.members:
            raw = workers.get(w.id) if isinstance(workers.get(w.id), dict) else {}
            state = _worker_state(w, raw, host, at_wall)
            states[w.id] = state
            result.answered_at[w.id] = call.answered_at
            result.seen_wall[w.id] = at_wall
            if call.host_clock is not None:
                result.host_clocks[w.id] = call.host_clock
            if refused and w.id in call.renew:
                result.refused[w.id] = str(refused)[:300]
            fence = raw.get("fence")
            if isinstance(fence, int) and not isinstance(fence, bool) and 0 <= fence <= FOLLOWED_TERM:
                result.fences[w.id] = fence
            elif fence is not None:           # hostile input: this worker's problem, never the round's
                result.odd_fences[w.id] = repr(fence)[:40]
            if isinstance(raw.get("fenced"), str) and w.id in call.renew:
                result.refused[w.id] = raw["fenced"][:300]
            renewed = raw.get("renewed") if isinstance(raw.get("renewed"), list) else []
            if renewed:
                result.renewed[w.id] = [sid for sid in renewed if sid in state.instances]
            for sid, inst in (raw.get("instances") or {}).items():
                if sid not in state.instances:
                    continue
                for event in inst.get("events") if isinstance(inst.get("events"), list) else ():
                    if isinstance(event, dict) and isinstance(event.get("t", 0), (int, float)):
                        # A strategy can write its events.log: no event is newer than the answer.
                        t = min(event.get("t", 0), host.get("answeredAt") or event.get("t", 0))
                        events.append({**event, "t": t, "worker": w.id, "strategy": sid})
        result.host_events.extend(events)


def gather(fleet: Fleet, memory: Memory, hosts: Hosts, clock: Clock, **kwargs: Any) -> Gathered:
    """One round by a throwaway Prober (plan, status, and tests): every host is probed as if first."""
    return Prober(hosts, clock).round(fleet, memory, **kwargs)


def remember_into(m: Memory, gathered: Gathered, addresses: dict[str, dict[str, Any]],
                  loop_at: int | None = None) -> None:
    """Record a round: who answered when (and the host clocks they answered with), restart counts
    mirrored from the supervisors, the newest host events recorded, and how to reach every worker.
    Lease bounds are not here: they are recorded before a request is sent."""
    # Rounds may overlap, and an older one may be recorded after a newer one: times only move forward.
    for wid, at in gathered.answered_at.items():
        m.answered[wid] = max(m.answered.get(wid, 0), at)
    for wid, at in gathered.seen_wall.items():
        m.last_seen[wid] = max(m.last_seen.get(wid, 0), at)
    for wid, host_clock in gathered.host_clocks.items():
        if wid not in m.host_clocks or m.host_clocks[wid].at < host_clock.at:
            m.host_clocks[wid] = host_clock
    for sid, p in m.placements.items():
        state = gathered.observed.worker(p.worker)
        inst = state.instances.get(sid) if state is not None and state.reachable else None
        if inst is not None and inst.epoch == p.epoch:
            m.restarts[sid] = inst.restarts
    for event in gathered.host_events:
        wid = event["worker"]
        m.host_events[wid] = max(m.host_events.get(wid, 0), int(event.get("t", 0)))
    m.addresses.update(addresses)
    if loop_at is not None and gathered.renewed:
        m.loop_renewal = loop_at
