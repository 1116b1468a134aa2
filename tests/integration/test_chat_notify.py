"""Telegram, Slack and Discord notices against a local HTTP server standing in for each service: each
message in its own format, de-duplicated and rate-limited, and the secrets (a bot token, webhook
URLs) in no log line, whether the delivery worked or failed."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from quantlab.edges.notify import Notifier
from quantlab.edges.notify.chats import ChatGate
from quantlab.core.spec.models import ChatSink, NotifySettings
from tests.support import wait_for

BOT_TOKEN = "123456:AAbbCCddEEffGGhhIIjj-secret"
SLACK_SECRET = "T000/B000/slacksecretXYZ"
DISCORD_SECRET = "987654/discordsecretABC"


class Chats:
    """A local stand-in for the three services, recording each request; `fail` answers 500."""

    def __init__(self):
        self.requests: list[tuple[str, dict]] = []
        self.fail = False
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.requests.append((self.path, json.loads(body)))
                self.send_response(500 if outer.fail else 200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def chats():
    c = Chats()
    yield c
    c.server.shutdown()


@pytest.fixture
def settings(chats, tmp_path, monkeypatch):
    token_file = tmp_path / "telegram-token"
    token_file.write_text(BOT_TOKEN + "\n")
    (tmp_path / "slack-url").write_text(f"{chats.url}/services/{SLACK_SECRET}\n")
    monkeypatch.setenv("QL_TEST_DISCORD", f"{chats.url}/api/webhooks/{DISCORD_SECRET}")
    # The stand-in's address is allowed by the operator (outside the fleet files), as a local Bot API server would be.
    monkeypatch.setenv("QUANTLAB_CHAT_URL_PREFIXES", chats.url + "/")
    return NotifySettings(chats=(
        ChatSink("telegram", secret_file=str(token_file), chat_id="-100200300", api_url=chats.url),
        ChatSink("slack", secret_file=str(tmp_path / "slack-url")),
        ChatSink("discord", secret_env="QL_TEST_DISCORD")), chat_per_minute=20)


def notice(**fields):
    return {"t": 1, "kind": "action-failed", "strategy": "grid-btc", "worker": "w1", "fleet": "prod",
            "message": "start grid-btc failed: <b>@everyone</b> & more", **fields}


def test_each_chat_gets_its_own_format_once(chats, settings):
    lines: list[str] = []
    notifier = Notifier(settings, lines.append)
    notifier.submit([notice(), notice()])               # the same notice twice: told once
    assert notifier.flush(10)
    by_path = {path.split("/")[1]: body for path, body in chats.requests}
    assert len(chats.requests) == 3, chats.requests
    telegram = next(b for p, b in chats.requests if p == f"/bot{BOT_TOKEN}/sendMessage")
    assert telegram["chat_id"] == "-100200300" and telegram["disable_web_page_preview"] is True
    assert telegram["text"].startswith("🔴 quantlab prod: action-failed grid-btc w1 — start grid-btc failed")
    slack = by_path["services"]
    assert "&lt;b&gt;@everyone&lt;/b&gt; &amp; more" in slack["text"] and slack["unfurl_links"] is False
    discord = by_path["api"]
    assert discord["allowed_mentions"] == {"parse": []} and "@everyone" in discord["content"]
    assert not lines, lines
    notifier.close(5)


def test_failures_are_said_without_a_secret(chats, settings):
    chats.fail = True
    lines: list[str] = []
    failed: list[str] = []
    notifier = Notifier(settings, lines.append, on_failure=failed.append)
    notifier.submit([notice(kind="worker-offline", message="w1 offline")])
    assert notifier.flush(10)
    wait_for(lambda: len(lines) == 3, 5, "one line per chat")
    assert sorted(failed) == ["discord", "slack", "telegram"]
    for line in lines:
        for secret in (BOT_TOKEN, SLACK_SECRET, DISCORD_SECRET, "slacksecret", "discordsecret", "AAbbCC"):
            assert secret not in line, line
        assert "HTTP 500" in line
    assert any("telegram chat -100200300" in line for line in lines)
    notifier.close(5)


def test_a_missing_secret_is_a_failed_delivery_said_once(chats, settings, monkeypatch):
    monkeypatch.delenv("QL_TEST_DISCORD")
    lines: list[str] = []
    notifier = Notifier(NotifySettings(chats=(settings.chats[2],)), lines.append)
    notifier.submit([notice()])
    assert notifier.flush(10)
    assert len(lines) == 1 and "QL_TEST_DISCORD is not set" in lines[0], lines
    notifier.close(5)


def test_the_rate_limit_holds_back_and_then_counts():
    now = [0.0]
    gate = ChatGate(lambda: now[0])
    passed = [gate.admit(notice(message=f"m{i}"), per_minute=3) for i in range(5)]
    assert [p is not None for p in passed] == [True, True, True, False, False]
    now[0] += 20.0                                      # one token back (3 a minute)
    told = gate.admit(notice(message="later"), per_minute=3)
    assert told is not None and told["suppressed"] == 2
    assert gate.admit(notice(message="later"), per_minute=3) is None, "a duplicate is not told again"


def test_validate_refuses_a_secret_kept_in_the_fleet_directory(fleet, tmp_path):
    fleet.worker("w1").strategy("s1")
    fleet.settings["notify"] = {"telegram": {"botTokenFile": str(fleet.root / "token"), "chatId": 42}}
    fleet.write()
    refused = fleet.ql("validate", check=1)
    assert "notify.telegram.botTokenFile is inside the fleet directory, which git tracks" in refused.output
    assert "fleet.yaml:" in refused.output
    fleet.settings["notify"] = {"telegram": {"botToken": "123:abc", "chatId": 42}}
    fleet.write()
    assert "botToken" in fleet.ql("validate", check=1).output, "a token written into the fleet is refused"
    fleet.settings["notify"] = {"telegram": {"botTokenEnv": "QL_TELEGRAM", "chatId": 42},
                                "slack": {"webhookUrlFile": str(tmp_path / "slack-url")}}
    fleet.write()
    fleet.ql("validate")


def test_the_fleet_files_cannot_send_a_secret_anywhere_else(chats, settings, monkeypatch, tmp_path):
    monkeypatch.delenv("QUANTLAB_CHAT_URL_PREFIXES")
    (tmp_path / "not-a-token").write_text("postgres-password-in-a-file")
    lines: list[str] = []
    notifier = Notifier(NotifySettings(chats=(
        settings.chats[0],                                   # a real-looking token, to an address not allowed
        ChatSink("telegram", secret_file=str(tmp_path / "not-a-token"), chat_id="1", api_url="https://api.telegram.org"),
        settings.chats[2])), lines.append)                   # a webhook URL that is not Discord's
    notifier.submit([notice()])
    assert notifier.flush(10)
    assert not chats.requests, "nothing left this process"
    assert sum("goes only to https://api.telegram.org/" in line for line in lines) == 1, lines
    assert sum("does not look like one" in line for line in lines) == 1, lines
    assert sum("goes only to https://discord.com/api/webhooks/" in line for line in lines) == 1, lines
    assert not any("postgres-password" in line or BOT_TOKEN in line for line in lines)
    notifier.close(5)


def test_a_problem_raised_again_after_it_cleared_is_told_again():
    gate = ChatGate(lambda: 0.0)
    raised = notice(kind="worker-offline", message="w1 offline")
    assert gate.admit(raised, per_minute=20) is not None
    assert gate.admit(notice(kind="resolved", message="w1 offline"), per_minute=20) is not None
    assert gate.admit(raised, per_minute=20) is not None
