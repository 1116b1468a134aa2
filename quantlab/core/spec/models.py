"""Typed, immutable views of a validated fleet directory.

Defaults are applied from the JSON Schemas before these are built, so every field here holds a real
value. Params are kept as canonical JSON and handed out as fresh copies, so nothing downstream can
mutate a loaded spec.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, Mapping

DesiredState = Literal["running", "paused", "stopped"]
PolicyName = Literal["round-robin", "load-based"]
ChatKind = Literal["telegram", "slack", "discord"]

LOCAL_HOST = "local"


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True)
class Location:
    """Where something was written: a file (relative to the fleet dir) and a 1-based line."""

    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True)
class Requirements:
    api: str
    account: str | None = None
    region: str | None = None
    proxy: str | None = None
    min_memory: int | None = None
    credentials: bool = False


@dataclass(frozen=True)
class SchedulingSpec:
    auto_restart: bool = True
    max_restarts: int = 5
    restart_delay_ms: int = 10000
    max_errors: int = 10
    stop_timeout_s: float = 30.0
    init_timeout_s: float = 60.0
    share_account: bool = False

    def as_json(self) -> dict[str, Any]:
        return {
            "autoRestart": self.auto_restart,
            "maxRestarts": self.max_restarts,
            "restartDelay": self.restart_delay_ms,
            "maxErrors": self.max_errors,
            "stopTimeoutSeconds": self.stop_timeout_s,
            "initTimeoutSeconds": self.init_timeout_s,
        }


@dataclass(frozen=True)
class StrategySpec:
    id: str
    name: str
    strategy_file: str          # as written, relative to the fleet dir
    strategy_path: Path         # resolved, inside the fleet dir
    file_sha256: str
    params_json: str            # canonical JSON of params
    desired_state: DesiredState
    heartbeat_ms: int
    requirements: Requirements
    scheduling: SchedulingSpec
    source: Location

    @property
    def params(self) -> dict[str, Any]:
        params: dict[str, Any] = json.loads(self.params_json)      # canonical JSON of an object
        return params

    @property
    def file_ext(self) -> str:
        return Path(self.strategy_file).suffix

    def launch_fields(self) -> dict[str, Any]:
        """What a running copy was started with; a change to any of it means `restart`."""
        return {
            "file": self.file_sha256,
            "params": json.loads(self.params_json),
            "heartbeatMs": self.heartbeat_ms,
            "scheduling": self.scheduling.as_json(),
            "account": self.requirements.account,      # its secrets file is in the environment
        }

    @cached_property
    def spec_hash(self) -> str:
        digest = hashlib.sha256(canonical_json(self.launch_fields()).encode()).hexdigest()
        return "sha256:" + digest[:32]


@dataclass(frozen=True)
class WorkerSpec:
    id: str
    host: str
    max_strategies: int
    supported_apis: frozenset[str]
    source: Location
    port: int | None = None
    user: str | None = None
    region: str | None = None
    proxy: str | None = None
    workdir: str | None = None
    runner: tuple[str, ...] = ("node", "{runner}")
    cordoned: bool = False
    drain: bool = False
    # Removed from the fleet while strategies still run there: kept (cordoned, draining) from the
    # state's memory of how to reach it until they have moved off (see Controller.with_leaving).
    leaving: bool = False

    @property
    def is_local(self) -> bool:
        return self.host == LOCAL_HOST


def worker_launch(worker: WorkerSpec) -> dict[str, Any]:
    """What a worker adds to a running copy's environment; a change to it means `restart`."""
    return {"runner": list(worker.runner), "proxy": worker.proxy, "region": worker.region}


@dataclass(frozen=True)
class MonitorSettings:
    worker_offline_after_s: float = 15.0
    lease_ttl_s: float = 25.0
    auto_recover: bool = True
    controller_restart_s: float = 10.0
    brake_share: float = 0.5

    @property
    def fencing(self) -> bool:
        return self.lease_ttl_s > 0

    @property
    def failover_margin_s(self) -> float:
        """Slack on top of a lease for the fenced copy's supervisor to notice and for the rate at which
        two machines' clocks drift apart."""
        return 1.0 + 0.05 * self.lease_ttl_s


@dataclass(frozen=True)
class ChatSink:
    """A chat to tell (Telegram, or a Slack or Discord incoming webhook). The secret — the bot
    token, or the webhook URL — is never in the fleet files: it is read from `secret_file` or the
    environment variable `secret_env` at each delivery."""

    kind: ChatKind
    secret_file: str | None = None
    secret_env: str | None = None
    chat_id: str | None = None                     # Telegram's chat
    api_url: str = "https://api.telegram.org"      # Telegram's Bot API (a local server in tests)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "secretFile": self.secret_file, "secretEnv": self.secret_env,
                "chatId": self.chat_id, "apiUrl": self.api_url}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> "ChatSink":
        return cls(raw["kind"], raw.get("secretFile"), raw.get("secretEnv"), raw.get("chatId"),
                   raw.get("apiUrl") or "https://api.telegram.org")


@dataclass(frozen=True)
class NotifySettings:
    webhook: str | None = None
    command: tuple[str, ...] | None = None
    chats: tuple[ChatSink, ...] = ()
    chat_per_minute: int = 20                      # each chat gets at most this many messages a minute


@dataclass(frozen=True)
class SshSettings:
    parallelism: int = 32
    connect_timeout_s: float = 10.0
    command_timeout_s: float = 30.0
    config: str = "~/.ssh/config"
    known_hosts: str = "~/.ssh/known_hosts"


MAX_DEFAULT_PROBE_DEADLINE_S = 5.0
# What a person's command (plan, apply, status) waits for a host's probe at least. The loop's deadline
# is as short as its interval, to keep every renewal on time; a person wants every host that answers
# in the picture (a host busy for a second is not "not answering"). Its renewals are bounded by their
# not-after, and booked in the lease book before they are sent, like the loop's.
PERSON_PROBE_FLOOR_S = 2.0
MIN_INTERVAL_S = 0.1                 # the schema's floor for the interval and the probe deadline


DEFAULT_LEADER_LEASE_S = 15.0        # Kubernetes' leader-election default
LEADER_WATCH_S = 1.0                 # how often a standby reads the leadership row
LEADER_DEPOSE_MARGIN_S = 1.0         # a leader gives up this much before its lease could end elsewhere


def default_probe_deadline(interval_s: float) -> float:
    return min(MAX_DEFAULT_PROBE_DEADLINE_S, interval_s)


@dataclass(frozen=True)
class FleetSettings:
    policy: PolicyName = "load-based"
    reconcile_interval_s: float = 5.0
    monitor: MonitorSettings = field(default_factory=MonitorSettings)
    notify: NotifySettings = field(default_factory=NotifySettings)
    ssh: SshSettings = field(default_factory=SshSettings)
    source: Location | None = None
    probe_deadline_s: float = MAX_DEFAULT_PROBE_DEADLINE_S   # one host's probe, before it counts as silent
    cron_period_s: float | None = None                       # set when `reconcile --once` runs from cron
    rebalance_every_s: float | None = None                   # the loop rebalances on its own (off: None)
    rebalance_max_moves: int = 1
    leader_lease_s: float | None = None                      # set: several controllers may take over
    name: str | None = None                                  # the Fleet's name: the state records it

    @property
    def person_probe_deadline_s(self) -> float:
        return max(self.probe_deadline_s, PERSON_PROBE_FLOOR_S)

    @property
    def leader_lease(self) -> float:
        """The leadership lease with PostgreSQL (reconcile.leaderLeaseSeconds; Kubernetes' 15 s)."""
        return self.leader_lease_s if self.leader_lease_s is not None else DEFAULT_LEADER_LEASE_S

    def takeover_s(self) -> float:
        """The longest a standby's takeover can leave the hosts without renewals: the lease it waits
        out after the last renewal, plus its watch interval twice (seeing the last change, seeing the
        lease over); its first renewal round then follows at once."""
        return self.leader_lease + 2 * LEADER_WATCH_S

    def snapshot(self) -> dict[str, Any]:
        """What keeps leases renewed while the fleet dir does not validate (kept in the state file)."""
        return {"policy": self.policy, "reconcileIntervalSeconds": self.reconcile_interval_s,
                "probeDeadlineSeconds": self.probe_deadline_s, "cronPeriodSeconds": self.cron_period_s,
                "leaderLeaseSeconds": self.leader_lease_s,
                "monitor": dataclasses.asdict(self.monitor), "ssh": dataclasses.asdict(self.ssh),
                "notify": {"webhook": self.notify.webhook,
                           "command": list(self.notify.command) if self.notify.command else None,
                           "chats": [c.to_json() for c in self.notify.chats],
                           "chatPerMinute": self.notify.chat_per_minute}}

    @classmethod
    def from_snapshot(cls, raw: dict[str, Any] | None) -> "FleetSettings":
        if not raw:
            return cls()
        notify = raw.get("notify") or {}
        # A state written before the schema had its floor may remember less: the loop must not spin on it.
        interval = max(MIN_INTERVAL_S, float(raw.get("reconcileIntervalSeconds", 5.0)))
        monitor_fields = {f.name for f in dataclasses.fields(MonitorSettings)}
        ssh_fields = {f.name for f in dataclasses.fields(SshSettings)}
        return cls(policy=raw.get("policy", "load-based"), reconcile_interval_s=interval,
                   probe_deadline_s=max(MIN_INTERVAL_S, float(raw.get("probeDeadlineSeconds")
                                                              or default_probe_deadline(interval))),
                   cron_period_s=raw.get("cronPeriodSeconds"),
                   leader_lease_s=raw.get("leaderLeaseSeconds"),
                   # Fields a newer or older release wrote are left out: this must never fail.
                   monitor=MonitorSettings(**{k: v for k, v in raw.get("monitor", {}).items() if k in monitor_fields}),
                   ssh=SshSettings(**{k: v for k, v in raw.get("ssh", {}).items() if k in ssh_fields}),
                   notify=NotifySettings(webhook=notify.get("webhook"),
                                         command=tuple(notify["command"]) if notify.get("command") else None,
                                         chats=tuple(ChatSink.from_json(c) for c in notify.get("chats") or ()),
                                         chat_per_minute=int(notify.get("chatPerMinute") or 20)))

    def _away(self, standbys: bool) -> dict[str, tuple[float, str]]:
        """The longest the loop may be away, by cause in words: (seconds, the field they come from).
        Two intervals, two cron periods, a restart of the controller, and with standby controllers a
        takeover."""
        away = {"2 x reconcile.intervalSeconds": (2 * self.reconcile_interval_s, "reconcile.intervalSeconds"),
                "monitor.controllerRestartSeconds": (self.monitor.controller_restart_s,
                                                     "monitor.controllerRestartSeconds")}
        if self.cron_period_s:
            away["2 x reconcile.cronPeriodSeconds"] = (2 * self.cron_period_s, "reconcile.cronPeriodSeconds")
        if standbys or self.leader_lease_s is not None:
            away[f"a takeover (reconcile.leaderLeaseSeconds + {2 * LEADER_WATCH_S:g} s)"] = (
                self.takeover_s(), "reconcile.leaderLeaseSeconds")
        return away

    def lease_floor_s(self, standbys: bool = False) -> float:
        """The shortest lease these settings allow: the longest the loop may be away, plus one probe
        deadline, plus the margin."""
        return max(s for s, _ in self._away(standbys).values()) + self.probe_deadline_s + \
            self.monitor.failover_margin_s

    def lease_rule_problem(self, standbys: bool = False) -> str | None:
        """Why these settings break the lease rule, or None. A lease shorter than the loop may be away
        fences healthy strategies; a probe deadline longer than the interval overlaps rounds; a
        leadership lease shorter than two renewals deposes a healthy leader. `standbys`: several
        controllers share the state (PostgreSQL), so a takeover counts even with the default lease."""
        broken = self.lease_rule_break(standbys)
        return broken.message if broken is not None else None

    def lease_rule_break(self, standbys: bool = False) -> "LeaseRuleBreak | None":
        """lease_rule_problem, with the field it is about and the fields its verdict rests on."""
        if self.probe_deadline_s > self.reconcile_interval_s:
            return LeaseRuleBreak(
                "reconcile.probeDeadlineSeconds", ("reconcile.probeDeadlineSeconds", "reconcile.intervalSeconds"),
                f"reconcile.probeDeadlineSeconds {self.probe_deadline_s:g} is longer than "
                f"reconcile.intervalSeconds {self.reconcile_interval_s:g}; make it at most the interval")
        if (standbys or self.leader_lease_s is not None) and \
                self.leader_lease < 2 * self.reconcile_interval_s + LEADER_DEPOSE_MARGIN_S:
            need = 2 * self.reconcile_interval_s + LEADER_DEPOSE_MARGIN_S
            return LeaseRuleBreak(
                "reconcile.leaderLeaseSeconds", ("reconcile.leaderLeaseSeconds", "reconcile.intervalSeconds"),
                f"reconcile.leaderLeaseSeconds {self.leader_lease:g} is shorter than two renewals of the "
                f"lead (2 x reconcile.intervalSeconds + {LEADER_DEPOSE_MARGIN_S:g} s = {need:g} s): a late "
                "renewal would depose a healthy leader; raise it")
        if not self.monitor.fencing:
            return None
        ttl = self.monitor.lease_ttl_s
        away = self._away(standbys)
        longest = max(away, key=lambda k: away[k][0])
        away_s, cause = away[longest]
        # ttl >= away + deadline + 1 + 0.05 ttl  <=>  ttl >= (away + deadline + 1) / 0.95
        floor = self.lease_floor_s(standbys)
        if ttl + 1e-9 >= floor:
            return None
        needed = math.ceil((away_s + self.probe_deadline_s + 1.0) / 0.95 * 10) / 10
        # The causes shorter than the longest do not decide: any value of theirs that is longer
        # only breaks the rule further.
        return LeaseRuleBreak(
            "monitor.leaseTtlSeconds", ("monitor.leaseTtlSeconds", "reconcile.probeDeadlineSeconds", cause),
            f"monitor.leaseTtlSeconds {ttl:g} is shorter than the loop may be away: it must cover "
            f"{longest} ({away_s:g} s) + reconcile.probeDeadlineSeconds ({self.probe_deadline_s:g} s) "
            f"+ a margin of 1 s + 5 % of the lease, so at least {needed:g} s; raise it, or renew more often")


@dataclass(frozen=True)
class LeaseRuleBreak:
    """How settings break the lease rule: `field` (dotted, as in the Fleet document) is the one to
    change, `reads` every field the verdict rests on, `message` says why in words."""

    field: str
    reads: tuple[str, ...]
    message: str


@dataclass(frozen=True)
class Fleet:
    """A whole validated fleet directory: the desired state."""

    root: Path
    settings: FleetSettings
    strategies: Mapping[str, StrategySpec]   # by id, in id order
    workers: Mapping[str, WorkerSpec]        # by id, in id order
    fleet_hash: str                       # sha256 over every fleet file and strategy file
    files: tuple[str, ...]                # the YAML files read, relative to root
    # Where the files came from, for plans and events: the git commit (short), whether the working
    # tree had uncommitted changes when it was read from disk, and in words ("working tree",
    # "commit of refs/heads/main", "directory" outside git).
    revision: str | None = None
    uncommitted: bool = False
    source: str = "directory"
