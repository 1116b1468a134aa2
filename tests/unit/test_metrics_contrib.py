"""/metrics as rendered from a snapshot (pure), and the shipped Grafana dashboard and alerting rules:
every series they use is one quantlab exports."""
from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families

from quantlab.face.web.metrics import render

CONTRIB = Path(__file__).resolve().parents[2] / "contrib"

SNAPSHOT = {
    "format": 1, "at": 1_800_000_000_000,
    "settings": {"intervalSeconds": 5, "leaseTtlSeconds": 25},
    "rounds": {"renew": {"at": 1_800_000_000_000, "seconds": 0.2, "renewed": 1},
               "act": {"at": 1_799_999_999_000, "seconds": 0.4}, "lastRenewal": {"at": 1_800_000_000_000}},
    "leader": {"holder": "reconcile pid 7 on a", "term": 3},
    "counters": [{"name": "renewals", "labels": {}, "value": 12}, {"name": "failovers", "labels": {}, "value": 1},
                 {"name": "actions", "labels": {"action": "start", "outcome": "ok"}, "value": 2},
                 {"name": "notification-failures", "labels": {"sink": "telegram"}, "value": 1}],
    "status": {
        "strategies": [{"id": "grid-btc", "workerId": "w1", "status": "running", "healthy": True,
                        "heartbeatAgeMs": 1500, "errorCount": 0, "restarts": 1, "leaseLeftSeconds": 20.5,
                        "checkpointAgeSeconds": 3.0},
                       {"id": "arb \"eu\"", "workerId": None, "status": "queued", "healthy": False,
                        "heartbeatAgeMs": None, "errorCount": None, "restarts": 0, "leaseLeftSeconds": None,
                        "checkpointAgeSeconds": None}],
        "workers": [{"id": "w1", "region": "JP", "status": "busy", "cpu": 0.25, "runningStrategies": ["grid-btc"],
                     "maxStrategies": 4}]},
}


def families() -> dict:
    return {f.name: f for f in text_string_to_metric_families(render(SNAPSHOT, "1.2.3"))}


def test_the_series_and_their_values():
    found = families()
    values = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in found.values() for s in f.samples}
    assert values[("quantlab_build_info", (("version", "1.2.3"),))] == 1
    assert values[("quantlab_last_renewal_timestamp_seconds", ())] == 1_800_000_000
    assert values[("quantlab_strategy_up", (("strategy", "grid-btc"), ("worker", "w1")))] == 1
    assert values[("quantlab_strategy_up", (("strategy", 'arb "eu"'), ("worker", "")))] == 0, "quotes escaped"
    assert values[("quantlab_strategy_heartbeat_age_seconds", (("strategy", "grid-btc"),))] == 1.5
    assert values[("quantlab_worker_load_ratio", (("region", "JP"), ("worker", "w1")))] == 0.25
    assert values[("quantlab_actions_total", (("action", "start"), ("outcome", "ok")))] == 2
    assert values[("quantlab_notification_failures_total", (("sink", "telegram"),))] == 1
    assert values[("quantlab_leader_term", (("holder", "reconcile pid 7 on a"),))] == 3
    assert found["quantlab_renewals"].type == "counter"


def test_without_a_snapshot_only_the_build_is_exported():
    found = {f.name for f in text_string_to_metric_families(render(None, "1.2.3"))}
    assert found == {"quantlab_build_info", "quantlab_snapshot_present"}


def test_the_dashboard_and_the_alerting_rules_use_only_exported_series():
    exported = set()
    for f in families().values():
        exported |= {s.name for s in f.samples}
    dashboard = json.loads((CONTRIB / "grafana-dashboard.json").read_text())
    rules = yaml.safe_load((CONTRIB / "prometheus-alerts.yml").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    alerts = {r["alert"]: r["expr"] for g in rules["groups"] for r in g["rules"]}
    assert "QuantlabNoRenewal" in alerts and "quantlab_lease_ttl_seconds / 2" in alerts["QuantlabNoRenewal"]
    for expr in exprs + list(alerts.values()):
        for name in re.findall(r"quantlab_[a-z_]+", expr):
            assert name in exported, f"{name} (in {expr!r}) is not exported"
