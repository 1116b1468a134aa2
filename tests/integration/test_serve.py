"""`quantlab serve` without a browser: /metrics parsed by prometheus_client, the token and TLS rules
beyond loopback, the Host check, read-only methods and the rate limit on log fetches — a real
server process answering real HTTP(S) on loopback, from a snapshot a real apply and reconcile wrote."""
from __future__ import annotations

import http.client
import json
import ssl
import subprocess
import sys
from pathlib import Path

import pytest

from harness import REPO, wait_for
from tests.support import cli_env, free_port

TOKEN = "s3cret-token-for-the-page-0123456789"
PROXY_SECRET = "hunter2-proxy-password"



class Served:
    def __init__(self, fleet, tmp_path: Path, *args: str):
        self.port = free_port()
        self.log = tmp_path / f"serve-{self.port}.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "quantlab", "serve", "--fleet", str(fleet.root),
                                          *[a.replace("PORT", str(self.port)) for a in args]],
                                         stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=cli_env(), cwd=REPO, start_new_session=True)  # killed by group
        fleet.daemons.append(self.proc)

    def ready(self) -> "Served":
        wait_for(lambda: "Serving the fleet page" in self.log.read_text() or self.proc.poll() is not None, 20,
                 "serve to start")
        assert self.proc.poll() is None, self.log.read_text()
        return self

    def refused(self) -> str:
        assert self.proc.wait(20) == 2, self.log.read_text()
        return self.log.read_text()

    def get(self, path: str, *, token: str | None = None, host: str | None = None, method: str = "GET",
            tls: ssl.SSLContext | None = None) -> tuple[int, dict, bytes]:
        conn = (http.client.HTTPSConnection("127.0.0.1", self.port, context=tls, timeout=10) if tls else
                http.client.HTTPConnection("127.0.0.1", self.port, timeout=10))
        headers = {"Host": host or f"127.0.0.1:{self.port}"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        conn.request(method, path, headers=headers)
        answer = conn.getresponse()
        body = answer.read()
        conn.close()
        return answer.status, dict(answer.getheaders()), body


@pytest.fixture
def running(fleet, tmp_path):
    fleet.worker("w1", region="JP").strategy("s1").write()
    fleet.apply()
    fleet.beating("s1", beats=1)
    fleet.ql("reconcile", "--once")
    (tmp_path / "token").write_text(TOKEN + "\n")
    return fleet


def test_metrics_parse_with_the_expected_series(running, tmp_path):
    from prometheus_client.parser import text_string_to_metric_families

    served = Served(running, tmp_path, "--listen", "127.0.0.1:PORT").ready()
    status, headers, body = served.get("/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert families["quantlab_renewals"].type == "counter" and families["quantlab_build_info"].type == "gauge"
    assert samples[("quantlab_strategy_up", (("strategy", "s1"), ("worker", "w1")))] == 1
    assert samples[("quantlab_worker_online", (("region", "JP"), ("worker", "w1")))] == 1
    assert samples[("quantlab_worker_capacity_strategies", (("region", "JP"), ("worker", "w1")))] == 4
    assert samples[("quantlab_renewals_total", ())] >= 1
    assert 0 <= samples[("quantlab_strategy_heartbeat_age_seconds", (("strategy", "s1"),))] < 60
    assert samples[("quantlab_strategy_lease_remaining_seconds", (("strategy", "s1"),))] > 0
    last = samples[("quantlab_last_renewal_timestamp_seconds", ())]
    state = json.loads((running.root / ".quantlab" / "snapshot.json").read_text())
    assert last == state["rounds"]["lastRenewal"]["at"] / 1000
    for name in ("quantlab_round_duration_seconds", "quantlab_failovers", "quantlab_actions",
                 "quantlab_notification_failures", "quantlab_worker_load_ratio", "quantlab_worker_running_strategies",
                 "quantlab_strategy_errors", "quantlab_strategy_restarts"):
        assert name in families, name
    status, _, body = served.get("/api/status")
    report = json.loads(body)
    assert status == 200 and [s["id"] for s in report["strategies"]] == ["s1"] and report["workers"][0]["id"] == "w1"
    status, _, body = served.get("/api/events?strategy=s1")
    assert status == 200 and any(e["event"] == "start" for e in json.loads(body))
    assert served.get("/healthz")[0] == 200 and served.get("/readyz")[0] == 200


def test_the_host_header_read_only_methods_and_the_log_rate_limit(running, tmp_path):
    served = Served(running, tmp_path, "--listen", "127.0.0.1:PORT").ready()
    assert served.get("/api/status", host="attacker.example")[0] == 421, "DNS rebinding: an unknown Host is refused"
    assert served.get("/api/status", host=f"localhost:{served.port}")[0] == 200
    for method in ("POST", "PUT", "DELETE"):
        assert served.get("/api/status", method=method)[0] == 405
    first = served.get("/api/logs/s1?lines=5")
    assert first[0] == 200 and first[2].strip(), first
    again = served.get("/api/logs/s1?lines=5")
    assert again[0] == 429 and int(again[1]["Retry-After"]) >= 1
    assert served.get("/api/logs/..%2Fetc")[0] == 404


def test_beyond_loopback_a_token_and_tls_are_required(running, tmp_path):
    token = str(tmp_path / "token")
    no_token = Served(running, tmp_path, "--listen", "0.0.0.0:PORT").refused()
    assert "--token-file" in no_token and "Traceback" not in no_token
    no_tls = Served(running, tmp_path, "--listen", "0.0.0.0:PORT", "--token-file", token).refused()
    assert "--tls-cert" in no_tls and "--insecure-http" in no_tls

    plain = Served(running, tmp_path, "--listen", "0.0.0.0:PORT", "--token-file", token, "--insecure-http").ready()
    assert plain.get("/api/status")[0] == 401
    assert plain.get("/metrics", token="wrong-token-of-the-same-length-0000000")[0] == 401
    assert plain.get("/api/status", token=TOKEN)[0] == 200
    assert plain.get("/", token=None)[0] == 200, "the page itself holds no data: it asks with the token"

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert), "-days", "1"],
                   check=True, capture_output=True, timeout=60)
    served = Served(running, tmp_path, "--listen", "0.0.0.0:PORT", "--token-file", token,
                    "--tls-cert", str(cert), "--tls-key", str(key)).ready()
    trusted = ssl.create_default_context(cafile=str(cert))
    assert served.get("/api/status", token=TOKEN, tls=trusted)[0] == 200
    assert served.get("/api/status", tls=trusted)[0] == 401
    with pytest.raises((ssl.SSLError, ConnectionError, http.client.RemoteDisconnected)):
        served.get("/api/status", token=TOKEN)          # plain HTTP to a TLS port gets nothing


def snapshot_of(fleet, sid: str) -> dict:
    snap = json.loads((fleet.root / ".quantlab" / "snapshot.json").read_text())
    return next(s for s in snap["status"]["strategies"] if s["id"] == sid)


def test_the_act_round_s_snapshot_shows_what_it_did(fleet, tmp_path):
    """The loop's act round plans from an observation taken before it acts; its snapshot shows the
    strategies it acted on as the outcomes left them (here moved off a draining worker), not as that
    observation had them, though no renewal round runs before the next interval."""
    proxy = f"http://trader:{PROXY_SECRET}@127.0.0.1:9"
    fleet.settings["reconcile"]["intervalSeconds"] = 30     # no renewal round between acting and reading
    fleet.worker("w1", proxy=proxy).worker("w2", proxy=proxy).strategy("s1").write()
    fleet.apply()
    source = fleet.placement("s1")["worker"]
    target = "w2" if source == "w1" else "w1"
    fleet.workers[source]["drain"] = True
    fleet.write()
    fleet.ql("reconcile", "--once")
    assert fleet.placement("s1")["worker"] == target
    s1 = snapshot_of(fleet, "s1")
    assert (s1["workerId"], s1["status"]) == (target, "pending"), s1
    assert s1["reason"] == f"moved from {source} to {target}; not seen running there yet" and s1["plan"] is None

    served = Served(fleet, tmp_path, "--listen", "127.0.0.1:PORT").ready()
    status, _, body = served.get("/api/status?q=no-such-strategy")
    assert status == 200 and PROXY_SECRET not in body.decode()
    report = json.loads(body)
    # A filter narrows the list, not the fleet's counts.
    assert report["strategies"] == [] and report["page"]["total"] == 0 and report["page"]["fleet"] == 1
    assert report["counts"] == {"pending": 1}
    workers = {w["id"]: w for w in report["workers"]}
    assert workers[target]["runningStrategies"] == ["s1"] and workers[source]["runningStrategies"] == []
    assert workers[source]["drain"] is True and workers[target]["proxy"] == "http://***@127.0.0.1:9"
    assert isinstance(workers[target]["cpus"], int) and workers[target]["cpus"] >= 1
    status, _, body = served.get("/api/status")
    assert json.loads(body)["strategies"][0]["proxy"] == "http://***@127.0.0.1:9"


def test_a_renewal_round_begun_before_an_act_round_ended_shows_what_it_did(tmp_path):
    """Renewal rounds run beside the act round: one that observed before the act ended may be
    recorded after it, and must not show the strategies it acted on as they were before."""
    from harness import FleetDir
    from quantlab.app.controller import Controller
    from quantlab.edges.execute import Outcome
    from quantlab.edges.gather import Gathered
    from quantlab.core.observed import ObservedState
    from quantlab.core.plan import Action

    fl = FleetDir(tmp_path / "fleet").worker("w1").strategy("s1").write()
    ctl = Controller(fl.root, fl.state_path, log=lambda line: None)
    fleet = ctl.load_fleet()
    ctl.ledger.refresh(fleet.settings.monitor.lease_ttl_s)
    nothing_seen = ObservedState({})

    def recorded(kind: str, began: int, **extra) -> dict:
        ctl.record_round(kind, fleet, Gathered(nothing_seen, started=began), 0.1, **extra)
        ctl.close()                                      # writes what is pending
        return snapshot_of(fl, "s1")

    before = ctl.clock.mono()
    start = Action("start", "s1", "new", "new", worker="w1", epoch=1)
    acted = recorded("act", before, acted=[Outcome(start, True, "started")])
    assert (acted["status"], acted["reason"]) == ("pending", "started on w1; not seen running yet")
    assert recorded("renew", before) == acted
    later = recorded("renew", ctl.clock.mono() + 1)
    assert later["reason"] is None, "an observation taken after the act round ended shows the hosts' word"


def test_an_act_round_s_marks_say_what_each_outcome_left():
    from quantlab.edges.execute import Outcome
    from quantlab.core.plan import Action
    from quantlab.edges.snapshot import acted_marks

    marks = acted_marks([
        Outcome(Action("stop", "old", "a copy of an older epoch", "stale-copy", worker="w1", epoch=1), True),
        Outcome(Action("stop", "gone", "desiredState: stopped", "desired-stopped", worker="w1", epoch=2), True),
        Outcome(Action("pause", "calm", "desiredState: paused", "desired-paused", worker="w2", epoch=3), True),
        Outcome(Action("move", "far", "drain", "drain", source="w1", target="w2", epoch=4), False, "refused"),
    ])
    assert "old" not in marks, "a stale copy's stop says nothing about the strategy's current copy"
    assert marks["gone"] == {"status": "stopped", "reason": "stopped on w1: desiredState: stopped"}
    assert marks["calm"] == {"status": "paused", "reason": "paused on w2"}
    assert marks["far"] == {"status": None, "reason": "move to w2 failed: refused"}
