"""A snapshot (see snapshot.py) in Prometheus' text exposition format. Pure: the snapshot and the
time come in, text goes out. Names follow Prometheus' conventions: the `quantlab_` prefix, base
units (seconds), `_total` for counters; label values are ids, never URLs or secrets."""
from __future__ import annotations

import math
from typing import Any, Iterable

Sample = tuple[dict[str, str], Any]

# name -> (type, help, counter name in the snapshot and its label keys)
COUNTERS = {
    "quantlab_renewals_total": ("lease renewals granted by the hosts", "renewals"),
    "quantlab_failovers_total": ("strategies moved off a lost worker", "failovers"),
    "quantlab_actions_total": ("actions carried out, by action and outcome", "actions"),
    "quantlab_notification_failures_total": ("notices that could not be delivered, by sink", "notification-failures"),
}


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: Any) -> str | None:
    """A sample value in the exposition format, or None when it is no number (a host's report is
    hostile input: a 400-digit error count must not break the whole scrape)."""
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    if math.isnan(number):
        return "NaN"
    if math.isinf(number):
        return "+Inf" if number > 0 else "-Inf"
    if number.is_integer() and abs(number) < 2 ** 53:
        return str(int(number))
    # 15 significant digits: what a double holds exactly, so that 2.421 is not shown as the
    # 2.4210000000000003 that arithmetic left behind
    return format(number, ".15g")


def _line(name: str, labels: dict[str, str], value: str) -> str:
    inner = ",".join(f'{k}="{_escape(str(v))}"' for k, v in sorted(labels.items()))
    return f"{name}{{{inner}}} {value}" if inner else f"{name} {value}"


def _family(name: str, kind: str, help_text: str, samples: Iterable[Sample]) -> list[str]:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    for labels, value in samples:
        number = _number(value)
        if number is not None:
            lines.append(_line(name, labels, number))
    return lines


def render(snapshot: dict[str, Any] | None, version: str) -> str:
    """The exposition text. Without a snapshot: only quantlab_build_info and quantlab_snapshot_present 0."""
    out = _family("quantlab_build_info", "gauge", "quantlab's version", [({"version": version}, 1)])
    out += _family("quantlab_snapshot_present", "gauge", "1 when a writing run has recorded a snapshot",
                   [({}, 1 if snapshot else 0)])
    if not snapshot:
        return "\n".join(out) + "\n"
    status = snapshot.get("status") or {}
    strategies = status.get("strategies") or []
    workers = status.get("workers") or []
    rounds = snapshot.get("rounds") or {}
    renewal = (rounds.get("lastRenewal") or {}).get("at")
    out += _family("quantlab_last_renewal_timestamp_seconds", "gauge",
                   "when the loop last renewed the leases (or had none to renew): the fleet's lifeline",
                   [({}, renewal / 1000)] if renewal else [])
    out += _family("quantlab_snapshot_timestamp_seconds", "gauge", "when the last writing run recorded what it saw",
                   [({}, snapshot.get("at", 0) / 1000)])
    settings = snapshot.get("settings") or {}
    out += _family("quantlab_lease_ttl_seconds", "gauge", "monitor.leaseTtlSeconds: a strategy not renewed this long stops",
                   [({}, float(settings["leaseTtlSeconds"]))] if settings.get("leaseTtlSeconds") is not None else [])
    out += _family("quantlab_reconcile_interval_seconds", "gauge", "reconcile.intervalSeconds",
                   [({}, float(settings["intervalSeconds"]))] if settings.get("intervalSeconds") is not None else [])
    out += _family("quantlab_round_duration_seconds", "gauge", "how long the last round took, by kind",
                   [({"kind": kind}, r.get("seconds", 0.0)) for kind, r in sorted(rounds.items()) if "seconds" in r])

    def per_strategy(field: str, scale: float = 1.0) -> list[Sample]:
        out = []
        for s in strategies:
            try:
                out.append(({"strategy": s["id"]}, float(s[field]) * scale))
            except (KeyError, TypeError, ValueError, OverflowError):
                continue                  # absent, or not a number a gauge can hold
        return out
    out += _family("quantlab_strategy_up", "gauge", "1 when the strategy runs healthy where it is placed",
                   [({"strategy": s["id"], "worker": s.get("workerId") or ""},
                     1 if s.get("healthy") and s.get("status") in ("running", "paused") else 0) for s in strategies])
    out += _family("quantlab_strategy_heartbeat_age_seconds", "gauge", "seconds since the strategy's last heartbeat",
                   per_strategy("heartbeatAgeMs", 0.001))
    out += _family("quantlab_strategy_errors", "gauge", "errors its runner counted (errorCount)",
                   per_strategy("errorCount"))
    out += _family("quantlab_strategy_restarts", "gauge", "restarts of the current copy by its supervisor",
                   per_strategy("restarts"))
    out += _family("quantlab_strategy_lease_remaining_seconds", "gauge", "seconds left on the copy's lease",
                   per_strategy("leaseLeftSeconds"))
    out += _family("quantlab_strategy_checkpoint_age_seconds", "gauge", "age of the controller's checkpoint copy",
                   per_strategy("checkpointAgeSeconds"))

    def per_worker(value: Any) -> list[Sample]:
        return [({"worker": w["id"], "region": w.get("region") or ""}, value(w)) for w in workers]
    out += _family("quantlab_worker_online", "gauge", "1 when the worker's host answered the last round",
                   per_worker(lambda w: 1 if w.get("status") in ("idle", "busy") else 0))
    out += _family("quantlab_worker_load_ratio", "gauge", "the host's 1-minute load per CPU",
                   [(labels, v) for labels, v in per_worker(lambda w: w.get("cpu")) if v is not None])
    out += _family("quantlab_worker_running_strategies", "gauge", "strategies placed and running there",
                   per_worker(lambda w: len(w.get("runningStrategies") or [])))
    out += _family("quantlab_worker_capacity_strategies", "gauge", "capabilities.maxStrategies",
                   per_worker(lambda w: w.get("maxStrategies") or 0))
    leader = snapshot.get("leader")
    if leader:
        out += _family("quantlab_leader_term", "gauge", "the leadership term of the controller that wrote this",
                       [({"holder": leader.get("holder") or ""}, leader.get("term") or 0)])
    counters = snapshot.get("counters") or []
    for name, (help_text, key) in COUNTERS.items():
        out += _family(name, "counter", help_text,
                       [(c.get("labels") or {}, c.get("value", 0)) for c in counters if c.get("name") == key])
    return "\n".join(out) + "\n"
