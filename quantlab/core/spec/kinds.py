"""Step two, one document at a time: the models of each kind of document. `FleetSettings` from the
Fleet document (its chats' secrets kept out of the fleet directory, its lease rule), a `WorkerSpec`
from a Worker, a `StrategySpec` from a Strategy (its strategy file found, its params small enough).

Each check reads every document of its kind, also one with schema errors (from its fields that
passed), so that one run reports every problem; models are built from valid documents only. The
checks across documents are in crossrefs.py.
"""
from __future__ import annotations

import posixpath
from pathlib import Path
from typing import Mapping

from .documents import Document
from .inputs import StrategyFile
from .models import (
    ChatKind,
    ChatSink,
    FleetSettings,
    MonitorSettings,
    NotifySettings,
    Requirements,
    SchedulingSpec,
    SshSettings,
    StrategySpec,
    WorkerSpec,
    canonical_json,
    default_probe_deadline,
)
from .parsing import ParsedFleet
from .problems import shown

# Params reach the runner in one environment variable, and Linux caps one at 128 KiB.
MAX_PARAMS_BYTES = 96 * 1024


class ModelBuilder:
    """The models of the documents, and the problems found on the way (told to `parsed`).
    `strategy_files`: what the adapter found for each of `parsed.strategy_files()`."""

    def __init__(self, parsed: ParsedFleet, strategy_files: Mapping[str, StrategyFile]):
        self.parsed = parsed
        self.strategy_files = strategy_files

    def strategy_file(self, doc: Document) -> tuple[Path, str] | None:
        written = doc.written_strategy_file()
        if written is None:
            return None  # missing or not a string: the schema check said so
        where = doc.loc("strategyFile")
        label = f"{doc.label()}: strategyFile {shown(written)}"
        if posixpath.isabs(written):
            self.parsed.problem(where, f"{label} must be relative to the fleet directory")
            return None
        found = self.strategy_files.get(written) or StrategyFile(problem="was not read")
        if found.problem is not None or found.path is None or found.sha256 is None or found.rel is None:
            self.parsed.problem(where, f"{label} {found.problem}")
            return None
        self.parsed.digests[found.rel] = found.sha256
        return found.path, found.sha256

    def params_json(self, doc: Document) -> str | None:
        if not doc.usable("params"):
            return None  # not a mapping: the schema check said so
        encoded = canonical_json(doc.data["params"])
        size = len(encoded.encode("utf-8"))
        if size > MAX_PARAMS_BYTES:
            self.parsed.problem(doc.loc("params"), (
                f"{doc.label()}: params are {size:,} bytes as JSON, more than "
                f"{MAX_PARAMS_BYTES // 1024} KiB: they reach the strategy in one environment variable and "
                "Linux caps one at 128 KiB; keep bulky data in a file beside the strategy and read it from there"))
            return None
        return encoded

    def strategy(self, doc: Document) -> StrategySpec | None:
        """The spec of a valid Strategy whose file and params are fine; the file and the params of
        any Strategy are checked."""
        params_json = self.params_json(doc)
        found = self.strategy_file(doc)
        if found is None or params_json is None or not doc.valid:
            return None
        d = doc.data
        path, sha = found
        req, sch = d["requirements"], d["scheduling"]
        return StrategySpec(
            id=d["id"],
            name=d.get("name", d["id"]),
            strategy_file=d["strategyFile"],
            strategy_path=path,
            file_sha256=sha,
            params_json=params_json,
            desired_state=d["desiredState"],
            heartbeat_ms=d["heartbeatMs"],
            requirements=Requirements(
                api=req["api"], account=req.get("account"), region=req.get("region"),
                proxy=req.get("proxy"), min_memory=req.get("minMemory"), credentials=req["credentials"],
            ),
            scheduling=SchedulingSpec(
                auto_restart=sch["autoRestart"], max_restarts=sch["maxRestarts"],
                restart_delay_ms=sch["restartDelay"], max_errors=sch["maxErrors"],
                stop_timeout_s=float(sch["stopTimeoutSeconds"]),
                init_timeout_s=float(sch["initTimeoutSeconds"]), share_account=sch["shareAccount"],
            ),
            source=doc.loc("id"),
        )

    @staticmethod
    def worker(doc: Document) -> WorkerSpec:
        d = doc.data
        caps, meta = d["capabilities"], d["metadata"]
        return WorkerSpec(
            id=d["id"], host=d["host"], port=d.get("port"), user=d.get("user"),
            max_strategies=caps["maxStrategies"], supported_apis=frozenset(caps["supportedApis"]),
            region=meta.get("region"), proxy=meta.get("proxy"), workdir=d.get("workdir"),
            runner=tuple(d["runner"]), cordoned=d["cordoned"], drain=d["drain"], source=doc.loc("id"),
        )

    def settings(self, doc: Document | None) -> FleetSettings:
        """The settings of the Fleet document; where a field has a schema error, its default (what
        the lease rule is then checked with, see lease_rule)."""
        if doc is None:
            return FleetSettings()
        v = doc.value
        command = v("notify", "command")
        interval = float(v("reconcile", "intervalSeconds"))
        deadline = v("reconcile", "probeDeadlineSeconds")
        cron = v("reconcile", "cronPeriodSeconds")
        rebalance = v("reconcile", "rebalance", "intervalSeconds")
        leader = v("reconcile", "leaderLeaseSeconds")
        return FleetSettings(
            name=v("name"),
            policy=v("policy"),
            reconcile_interval_s=interval,
            probe_deadline_s=float(deadline) if deadline is not None else default_probe_deadline(interval),
            cron_period_s=float(cron) if cron is not None else None,
            rebalance_every_s=float(rebalance) if rebalance is not None else None,
            rebalance_max_moves=int(v("reconcile", "rebalance", "maxMoves")),
            leader_lease_s=float(leader) if leader is not None else None,
            monitor=MonitorSettings(
                worker_offline_after_s=float(v("monitor", "workerOfflineAfterSeconds")),
                lease_ttl_s=float(v("monitor", "leaseTtlSeconds")), auto_recover=v("monitor", "autoRecover"),
                controller_restart_s=float(v("monitor", "controllerRestartSeconds")),
                brake_share=float(v("monitor", "failoverBrakeShare")),
            ),
            notify=NotifySettings(
                webhook=v("notify", "webhook"),
                command=(command,) if isinstance(command, str) else (tuple(command) if command else None),
                chats=self.chats(doc), chat_per_minute=int(v("notify", "chatPerMinute")),
            ),
            ssh=SshSettings(
                parallelism=v("ssh", "parallelism"), connect_timeout_s=float(v("ssh", "connectTimeoutSeconds")),
                command_timeout_s=float(v("ssh", "commandTimeoutSeconds")), config=v("ssh", "config"),
                known_hosts=v("ssh", "knownHosts"),
            ),
            source=doc.loc("kind"),
        )

    def chats(self, doc: Document) -> tuple[ChatSink, ...]:
        """The chats to tell. A secret's file must be absolute and outside the fleet directory: that
        directory is a git repository, and a token in it is one commit away from being shared."""
        out = []
        sinks: tuple[tuple[ChatKind, str, str], ...] = (("telegram", "botTokenFile", "botTokenEnv"),
                                                        ("slack", "webhookUrlFile", "webhookUrlEnv"),
                                                        ("discord", "webhookUrlFile", "webhookUrlEnv"))
        for kind, file_key, env_key in sinks:
            if not doc.value("notify", kind):
                continue
            secret_file = doc.value("notify", kind, file_key)
            if secret_file is not None:
                path = posixpath.normpath(secret_file)
                root = posixpath.normpath(str(self.parsed.root))
                if not posixpath.isabs(path):
                    self.parsed.problem(doc.loc("notify", kind, file_key),
                                        f"Fleet: notify.{kind}.{file_key} must be an absolute path (outside the "
                                        "fleet directory, which git tracks)")
                    continue
                if path == root or path.startswith(root.rstrip("/") + "/"):
                    self.parsed.problem(doc.loc("notify", kind, file_key),
                                        f"Fleet: notify.{kind}.{file_key} is inside the fleet directory, which git "
                                        "tracks: keep the secret outside it (e.g. /etc/quantlab/"
                                        f"{kind}) or in an environment variable ({env_key})")
                    continue
            chat = doc.value("notify", kind, "chatId")
            out.append(ChatSink(kind, secret_file, doc.value("notify", kind, env_key),
                                str(chat) if chat is not None else None,
                                doc.value("notify", kind, "apiUrl") or "https://api.telegram.org"))
        return tuple(out)

    def lease_rule(self, doc: Document, settings: FleetSettings) -> None:
        """The lease rule of the Fleet document `doc`, whose settings are `settings`. A break that
        rests on a default put in for a field with a schema error is not reported: that field's
        problem is, and the rule is judged again once it has a value."""
        broken = settings.lease_rule_break()
        if broken is None or any(_replaced(doc, field) for field in broken.reads):
            return
        self.parsed.problem(doc.loc(*broken.field.split(".")), f"Fleet: {broken.message}")


def _replaced(doc: Document, field: str) -> bool:
    """Whether the Fleet document's `field` (dotted) holds a default put in for a schema error."""
    path = tuple(field.split("."))
    if not doc.usable(*path):
        return True
    # A probe deadline not written follows the interval.
    return (path == ("reconcile", "probeDeadlineSeconds") and doc.value(*path) is None
            and not doc.usable("reconcile", "intervalSeconds"))
