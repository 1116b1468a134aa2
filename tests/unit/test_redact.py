"""Credentials out of text: URLs' userinfo masked wherever it shows, the fleet's known secrets masked
in text from elsewhere, a log redacted line by line across chunks, and the state's copy of a worker's
proxy sealed (redacted, with a digest) while still telling a change — also for a state an earlier
release wrote with the proxy in clear."""
from __future__ import annotations

import dataclasses
import json
import sys

import pytest

from quantlab.core.memory import Launched, Memory, Placement
from quantlab.core.planner import plan
from quantlab.core.redact import (
    DIGEST_KEY,
    comparable_launch,
    describe_change,
    fleet_secrets,
    proxy_digest,
    redact_json,
    redact_lines,
    redact_text,
    redact_url,
    seal_launch,
    url_secrets,
)
from quantlab.core.scheduling.filters import proxy as proxy_filter
from quantlab.core.scheduling.pool import WorkerView
from quantlab.core.spec import NotifySettings, worker_launch
from quantlab.core.status import fleet_status
from tests.fleetkit import NOW, fleet, memory, observed, running, strategy, summary, worker

SECRET = "S3cretPlanted"
PROXY = f"http://trader:{SECRET}@127.0.0.1:8890"


# --- text ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, shown", [
    (PROXY, "http://***@127.0.0.1:8890"),
    ("socks5h://u:p@ss@h:1080/x", "socks5h://***@h:1080/x"),            # an `@` in the password
    (f"proxy {PROXY} → http://a:b@h:2, then //x and /y@z", "proxy http://***@127.0.0.1:8890 → http://***@h:2, "
                                                          "then //x and /y@z"),
    ('{"proxy": "http://u:v@h:1", "mail": "a@b"}', '{"proxy": "http://***@h:1", "mail": "a@b"}'),
    ("['node', 'http://u:v@h']", "['node', 'http://***@h']"),
    ("http://127.0.0.1:8890/a@b", "http://127.0.0.1:8890/a@b"),              # an `@` in the path is no userinfo
    ("ssh quant@jp-box-1", "ssh quant@jp-box-1"),
    ("http://***@h:1", "http://***@h:1"),                                    # idempotent
    ("", ""),
])
def test_redact_url_masks_userinfo_in_running_text(text, shown):
    assert redact_url(text) == shown


def test_redact_url_keeps_none():
    assert redact_url(None) is None


def test_url_secrets_are_the_credentials_not_the_address():
    assert url_secrets(PROXY) == [f"trader:{SECRET}", SECRET]      # "trader" is too short to look for alone
    assert url_secrets("http://127.0.0.1:8890") == [] and url_secrets(None) == []
    assert "p@ss word" in url_secrets("http://user:p%40ss%20word@h:1")   # percent-decoded too
    hook = "https://hook:HookUser123@hooks.example/services/T0/B0/AbCdEfGhIjKlMnOp?token=QueryToken99&x=1"
    found = url_secrets(hook, path_tokens=True)
    assert {"hook:HookUser123", "HookUser123", "AbCdEfGhIjKlMnOp", "QueryToken99"} <= set(found)
    assert "services" not in found and "T0" not in found and hook not in found


def test_fleet_secrets_gather_proxies_and_the_webhook():
    fl = fleet([strategy("s", proxy="http://a:StrategyProxyPw@h:1")], [worker("w", proxy=PROXY), worker("v")])
    fl = dataclasses.replace(fl, settings=dataclasses.replace(
        fl.settings, notify=NotifySettings(webhook="https://h/hooks/WebhookTokenOfLength")))
    found = fleet_secrets(fl)
    assert {SECRET, "StrategyProxyPw", "WebhookTokenOfLength"} <= set(found)
    assert list(found) == sorted(found, key=len, reverse=True)


def test_redact_text_masks_known_secrets_and_leaves_the_url_readable():
    secrets = url_secrets(PROXY)
    assert redact_text(f"error: {PROXY} refused", secrets) == "error: http://***@127.0.0.1:8890 refused"
    assert redact_text(f"password {SECRET} was wrong", secrets) == "password *** was wrong"
    assert redact_text("price 100, nothing secret", secrets) == "price 100, nothing secret"


def test_redact_json_masks_every_string_and_keeps_keys_and_numbers():
    event = {"t": 5, "reason": f"worker w1 changed: proxy {PROXY}", "nested": [{"error": PROXY}, 3, None],
             "http://u:p@h": True}
    assert redact_json(event) == {"t": 5, "reason": "worker w1 changed: proxy http://***@127.0.0.1:8890",
                                  "nested": [{"error": "http://***@127.0.0.1:8890"}, 3, None], "http://u:p@h": True}
    assert event["nested"][0]["error"] == PROXY, "the original is not changed"


def test_redact_lines_never_cuts_a_secret_at_a_chunk_end():
    text = f"connecting through {PROXY}\nnext line {SECRET}\nlast without newline {PROXY}".encode()
    chunks = [text[i:i + 7] for i in range(0, len(text), 7)]
    out = b"".join(redact_lines(chunks, url_secrets(PROXY)))
    assert out == (b"connecting through http://***@127.0.0.1:8890\nnext line ***\n"
                   b"last without newline http://***@127.0.0.1:8890")


def test_redact_lines_passes_other_bytes_through_and_bounds_a_long_line():
    raw = b"\xff\xfe not utf-8 " + PROXY.encode() + b"\n"
    assert b"".join(redact_lines([raw])) == b"\xff\xfe not utf-8 http://***@127.0.0.1:8890\n"
    long = [b"x" * 1000] * 5                           # no newline: goes out once `limit` bytes are held
    pieces = list(redact_lines(long, limit=2048))
    assert b"".join(pieces) == b"x" * 5000 and len(pieces) >= 2


@pytest.mark.parametrize("before, after, hidden, words", [
    ("http://127.0.0.1:8890", "http://127.0.0.1:8891", False, "proxy http://127.0.0.1:8890 → http://127.0.0.1:8891"),
    (PROXY, "http://trader:other@127.0.0.1:8890", False, "proxy http://***@127.0.0.1:8890: credentials changed"),
    ("http://***@h:1", "http://***@h:1", True, "proxy http://***@h:1: credentials changed"),
    (PROXY, None, False, "proxy http://***@127.0.0.1:8890 → None"),
])
def test_describe_change_never_shows_credentials(before, after, hidden, words):
    assert describe_change("proxy", before, after, hidden_change=hidden) == words


# --- the state's copy of a worker's proxy ---------------------------------------------------------

def test_seal_launch_redacts_a_proxy_with_credentials_and_keeps_a_digest():
    w = worker("w", proxy=PROXY, region="JP")
    sealed = seal_launch(worker_launch(w), "lineage-1")
    assert sealed["proxy"] == "http://***@127.0.0.1:8890" and SECRET not in json.dumps(sealed)
    assert sealed[DIGEST_KEY] == proxy_digest(PROXY, "lineage-1") != proxy_digest(PROXY, "lineage-2")
    assert seal_launch(sealed, "lineage-1") == sealed, "sealing twice changes nothing"
    plain = worker_launch(worker("w", proxy="http://127.0.0.1:8890"))
    assert seal_launch(plain, "lineage-1") == plain, "a proxy without credentials is kept as it is"


def test_comparable_launch_tells_a_change_in_every_form_the_state_may_hold():
    before = worker_launch(worker("w", proxy=PROXY))
    same, other = dict(before), worker_launch(worker("w", proxy=PROXY.replace(SECRET, "Another")))
    sealed = seal_launch(before, "lineage-1")
    assert comparable_launch(sealed, same) == sealed
    assert comparable_launch(sealed, other) != sealed
    # An earlier release kept the URL in clear: compared as it is.
    assert comparable_launch(before, same) == before and comparable_launch(before, other) != before


def _placed_with(s, wid: str, epoch: int, launch: dict, lineage: str = "test-lineage") -> Memory:
    mem = memory({s.id: (wid, epoch)}, specs={s.id: s})
    mem.lineage = lineage
    mem.placements[s.id] = Placement(s.id, wid, epoch, s.spec_hash, launched=Launched.from_json(
        {**s.launch_fields(), "worker": launch}))
    return mem


def test_a_change_of_proxy_credentials_restarts_with_a_reason_that_shows_none():
    s = strategy("s")
    old = worker("w-a", proxy=PROXY)
    sealed = seal_launch(worker_launch(old), "test-lineage")
    for new_proxy, reason in [
        ("http://trader:Other@127.0.0.1:8891", "worker w-a changed: proxy http://***@127.0.0.1:8890 → "
                                               "http://***@127.0.0.1:8891"),
        ("http://trader:Other@127.0.0.1:8890", "worker w-a changed: proxy http://***@127.0.0.1:8890: "
                                               "credentials changed"),
        ("http://127.0.0.1:8890", "worker w-a changed: proxy http://***@127.0.0.1:8890 → http://127.0.0.1:8890"),
    ]:
        fl = fleet([s], [dataclasses.replace(old, proxy=new_proxy)])
        for recorded in (sealed, worker_launch(old)):       # this release's record, and an earlier one's
            result = plan(fl, observed(fl, {"w-a": [running(s, 2)]}), _placed_with(s, "w-a", 2, recorded), NOW)
            assert summary(result) == [("restart", "s", "w-a")]
            assert result.actions[0].reason == reason and result.actions[0].cause == "worker-changed"


def test_an_unchanged_proxy_with_credentials_restarts_nothing():
    s = strategy("s")
    w = worker("w-a", proxy=PROXY)
    fl = fleet([s], [w])
    obs = observed(fl, {"w-a": [running(s, 2)]})
    for recorded in (seal_launch(worker_launch(w), "test-lineage"), worker_launch(w)):
        assert plan(fl, obs, _placed_with(s, "w-a", 2, recorded), NOW).actions == ()


def test_a_state_with_a_proxy_in_clear_is_read_sealed_and_restarts_nothing():
    s = strategy("s")
    w = worker("w-a", proxy=PROXY)
    written = _placed_with(s, "w-a", 2, worker_launch(w), lineage="lineage-of-the-file")
    raw = json.loads(json.dumps({**written.to_json(), "version": 2}))
    assert SECRET in json.dumps(raw)
    read = Memory.from_json(raw)
    kept = read.placements["s"].launched.worker
    assert kept == seal_launch(worker_launch(w), "lineage-of-the-file") and SECRET not in json.dumps(read.to_json())
    fl = fleet([s], [w])
    assert plan(fl, observed(fl, {"w-a": [running(s, 2)]}), read, NOW).actions == ()
    # Read again after a save: the same.
    assert Memory.from_json(read.to_json()).placements["s"].launched.worker == kept


def test_a_launched_record_without_credentials_stays_as_an_earlier_release_wrote_it():
    s = strategy("s")
    w = worker("w-a", proxy="http://127.0.0.1:8890")
    written = _placed_with(s, "w-a", 2, worker_launch(w))
    assert Memory.from_json(written.to_json()).placements["s"].launched.worker == worker_launch(w)


# --- where the words are made ---------------------------------------------------------------------

def test_the_proxy_filter_names_the_worker_s_proxy_without_credentials():
    rejected = proxy_filter(strategy("s", proxy="http://127.0.0.1:9"), WorkerView(worker("w", proxy=PROXY), "online"))
    assert rejected is not None and rejected.detail == "http://***@127.0.0.1:8890"


def test_plan_words_quoting_a_host_are_redacted():
    """An instance's error (its strategy's words) names the proxy it trades through."""
    s = strategy("s")
    w = worker("w-a", proxy=PROXY)
    fl = fleet([s], [w])
    failed = dataclasses.replace(running(s, 2, status="error", reason=f"st_init failed: {PROXY} refused"),
                                 alive=False)
    result = plan(fl, observed(fl, {"w-a": [failed]}), memory({"s": ("w-a", 2)}, specs={"s": s}), NOW)
    assert [n.note for n in result.notes] and SECRET not in json.dumps(result.to_json())
    assert "http://***@127.0.0.1:8890" in result.notes[0].note


def test_status_shows_no_credentials_from_hosts():
    s = strategy("s")
    w = worker("w-a", proxy=PROXY)
    fl = fleet([s], [w])
    inst = dataclasses.replace(running(s, 2, reason=f"restarting after {PROXY} failed"),
                               last_error=f"exchange unreachable through {PROXY}")
    mem = _placed_with(s, "w-a", 2, worker_launch(w))
    report = fleet_status(fl, observed(fl, {"w-a": [inst]}), mem, NOW, NOW)
    assert SECRET not in json.dumps(report)
    entry = report["strategies"][0]
    assert entry["lastError"] == "exchange unreachable through http://***@127.0.0.1:8890"
    assert entry["proxy"] == report["workers"][0]["proxy"] == "http://***@127.0.0.1:8890"


def test_notices_leave_without_credentials(tmp_path):
    from quantlab.edges.notify import Notifier

    told = tmp_path / "told.jsonl"
    script = f"import sys; open({str(told)!r}, 'a').write(sys.stdin.read() + '\\n')"
    notifier = Notifier(NotifySettings(command=(sys.executable, "-c", script)), lambda line: None)
    try:
        notifier.submit([{"t": 1, "kind": "strategy-error", "strategy": "s",
                          "message": f"st_init failed: login refused by {PROXY}"}])
        assert notifier.flush(20)
    finally:
        notifier.close(timeout=5)
    body = told.read_text()
    assert "login refused by http://***@127.0.0.1:8890" in body and SECRET not in body


def test_a_state_dsn_that_does_not_parse_is_not_quoted():
    """libpq names the token it could not read, which may be a password."""
    pytest.importorskip("psycopg")
    from quantlab.edges.pgstate import check_dsn
    from quantlab.edges.store import StateError

    with pytest.raises(StateError) as caught:
        check_dsn("postgresql://ops:Pw12%zz@db.internal/quantlab")
    assert "Pw12" not in str(caught.value) and "percent-encoded" in str(caught.value)
