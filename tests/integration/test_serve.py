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



class Served:
    def __init__(self, fleet, tmp_path: Path, *args: str):
        self.port = free_port()
        self.log = tmp_path / f"serve-{self.port}.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "quantlab", "serve", "--fleet", str(fleet.root),
                                          *[a.replace("PORT", str(self.port)) for a in args]],
                                         stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=cli_env(), cwd=REPO)
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
