"""Read-side questions: a strategy's output, what the hosts logged since the last writing run, the
state as stored (and moving it), where a stopped copy last ran, the leader.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

from quantlab.edges.hosts import AgentError
from quantlab.edges.transport.base import TransportError
from quantlab.core.memory import Memory
from quantlab.core.planner import UnknownTarget
from quantlab.core.spec import Fleet, FleetSettings
from quantlab.edges.store import StateError
from quantlab.edges.vcs import tracked_by_git

if TYPE_CHECKING:
    from .controller import Controller


@dataclass
class LogOutput:
    worker: str                 # whose log it is
    stopped: bool               # the strategy is not placed any more: its output up to its stop
    chunks: Iterator[bytes]


class Queries:
    """Read-side queries (a mixin of Controller: see controller.py)."""

    def logs(self, fleet: Fleet, strategy: str, lines: int, follow: bool, since_ms: int | None = None,
             grep: str | None = None) -> "LogOutput":
        """A strategy's output from the worker it runs on (a stopped one's from the worker it last
        ran on, up to its stop): the tail of `lines` lines, then with `follow` what comes next. With
        `since_ms` (epoch ms) and `grep` (a regular expression), only the lines written since then
        that match, filtered on the host."""
        placed = self.read_memory(fleet).placements.get(strategy)
        where = placed.worker if placed is not None else self.last_worker(strategy)
        if where is None:
            if strategy not in fleet.strategies:
                raise UnknownTarget(f"unknown strategy {strategy}: not in the fleet {self.fleet_dir} nor its "
                                    "state (`quantlab status` lists them)")
            raise UnknownTarget(f"{strategy} has never been placed on a worker, so it has no output yet "
                                "(`quantlab plan` says why)")
        worker = fleet.workers.get(where)
        if worker is None:
            raise UnknownTarget(f"{strategy} was on worker {where}, which is not in the fleet any more")
        hosts = self.hosts(fleet)
        agent = hosts.agent_for(worker)
        request: dict[str, Any] = {"workdir": hosts.workdir(worker), "strategy": strategy, "lines": lines,
                                   "follow": follow}
        if since_ms is not None:
            request["since"] = since_ms
        if grep is not None:
            request["grep"] = grep
        if since_ms is not None or grep is not None:
            # Host CPU the search may take: no more than the call waits for (the agent caps it, too).
            request["cpuSeconds"] = max(1, int(fleet.settings.ssh.command_timeout_s)) if not follow else None

        def chunks() -> Iterator[bytes]:
            if follow:
                yield from agent.stream("logs", request)
                return
            done = agent.run("logs", request, fleet.settings.ssh.command_timeout_s)
            if done.returncode != 0:
                raise AgentError(worker.id, f"logs failed: {done.stderr.decode(errors='replace').strip()}")
            yield done.stdout
        return LogOutput(where, placed is None, chunks())

    def unrecorded_host_events(self) -> tuple[list[dict[str, Any]], list[str]]:
        """What the supervisors logged on the hosts since the last run that writes state recorded it
        (restarts, errors, a lease that ran out while no reconcile ran), and the fleet's problems
        when it does not validate (then from the workers the state remembers). Read only: the next
        apply or reconcile records them for good. Nothing from a host that does not answer."""
        fleet, problems = self.fleet_or_fallback()
        try:
            gathered = self.observe(fleet, self.read_memory(fleet))
        except (TransportError, AgentError):
            return [], problems
        return [{**e, "actor": f"supervisor@{e['worker']}"} for e in gathered.host_events], problems

    def stored_state(self) -> Memory:
        """The state as stored: nothing rebased, locked or written (`quantlab state pull`)."""
        return self.store.fresh().load()

    def push_state(self, dest: "Controller", lock_timeout: float) -> Memory:
        """Move this state into `dest`, which must hold none yet: placements, leases, restart
        counts, history and checkpoint copies, under this state's lock (nothing acts meanwhile).
        Then this state is marked migrated, so that no controller acts on it any more."""
        stored = self.ledger.read(0.0)
        where = str(dest.store.path)
        if not stored.serial:
            # Most likely the direction is mistaken (`push` names where the state goes, `--state`
            # where it is now): pushing nothing would leave an empty state that looks like a move.
            raise StateError(f"{self.store.path} holds no state (nothing was ever applied with it), so there is "
                             f"nothing to push. To move the state of another backend into it, run `quantlab state "
                             f"push {self.store.path} --state WHERE-IT-IS-NOW`")
        settings = FleetSettings.from_snapshot(stored.fleet_settings)
        with self.ledger.hold(settings.monitor.lease_ttl_s, lock_timeout, "quantlab state push"):
            memory = self.ledger.memory
            existing = dest.store.fresh().load()
            if existing.serial:
                raise StateError(f"{where} already holds a state (lineage {existing.lineage}, serial "
                                 f"{existing.serial}): push only into an empty one")
            dest.store.load()
            with dest.store.writing():
                moved = dest.store.save(memory)
            for event in self.events.read():
                dest.events.append(event)
            for sid in self.checkpoints.names():
                copy = self.checkpoints.load(sid)
                if copy is not None:
                    dest.checkpoints.save(sid, copy)
            self.ledger.update(lambda m: setattr(m, "migrated_to", where))
        dest.record_event({"t": self.clock.wall(), "event": "state-pushed", "actor": self.actor("state push"),
                           "detail": f"from {self.store.path} (lineage {memory.lineage})"})
        return moved

    def state_warning(self) -> str | None:
        """A warning when the state folder (leases, checkpoints with positions) could be committed."""
        folder = self.state_path.parent
        if not folder.is_dir() or not tracked_by_git(self.fleet_dir, folder):
            return None
        return (f"{folder} is not ignored by git, and it holds leases and checkpoints (positions): add "
                f"`{folder.name}/` to a .gitignore so that it is never committed")

    def last_worker(self, strategy: str) -> str | None:
        """The worker the history last names for `strategy` (where its stopped copy's log stays)."""
        last = None
        for event in self.events.read():
            if event.get("strategy") == strategy and event.get("outcome") in (None, "ok") and "kind" not in event:
                last = event.get("to") or event.get("worker") or last
        return last

    def leader_info(self) -> dict[str, Any] | None:
        """Who leads, as this process knows without asking the database (None with the file)."""
        if self.leader is None:
            return None
        return {"holder": self.leader.table.name, "term": self.leader.last_term, "leading": self.leader.leading(),
                "since": self.leader.took_wall}
