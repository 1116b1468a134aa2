"""The chat destination: Telegram, Slack and Discord. What reaches a chat passes its ChatGate
first (state changes only, a rate limit); each message is one plain-text line (`chat_text`) in the
chat's own request format; the bot token or webhook URL is read at each delivery and goes only to
its own service. Log lines name the chat, never its URL or token.
"""
from __future__ import annotations

import json
import os
import re
import threading
from typing import Any, Callable

from .delivery import ALERT_KINDS, Watchdog
from .webhook import post_json, url_secrets

CHAT_DEDUP_S = 600.0             # the same notice again within this long is not told twice
DISCORD_SUPPRESS_EMBEDS = 1 << 2  # no link previews
TELEGRAM_TOKEN = re.compile(r"[0-9]{3,12}:[A-Za-z0-9_-]{20,64}")
CHAT_URLS = {"telegram": ("https://api.telegram.org/",), "slack": ("https://hooks.slack.com/",),
             "discord": ("https://discord.com/api/webhooks/", "https://discordapp.com/api/webhooks/")}
SECRET_FILE_CAP = 4096
ICONS = {"resolved": "✅", "failover": "🔁", "notices-dropped": "⚠️", "strategy-error": "🔴", "lease-expired": "⚠️"}


class ChatGate:
    """What reaches one chat: state changes only (a notice identical to one told in the last ten
    minutes is dropped) and at most `per_minute` a minute (a token bucket); what the limit holds
    back is counted and said in the next message that goes."""

    def __init__(self, clock: Callable[[], float]):
        self._clock = clock
        self._told: dict[str, tuple[str, float]] = {}   # subject -> the last notice told of it, and when
        self._tokens: float | None = None
        self._at = 0.0
        self.suppressed = 0
        self._lock = threading.Lock()

    def admit(self, notice: dict[str, Any], per_minute: int) -> dict[str, Any] | None:
        now = self._clock()
        # A repeat is the same notice told last about the same subject: a problem raised again after
        # it was resolved is a change, and is told.
        subject = json.dumps([notice.get("strategy"), notice.get("worker")], default=str)
        key = json.dumps([notice.get(k) for k in ("kind", "message")], default=str)
        with self._lock:
            last = self._told.get(subject)
            if last is not None and last[0] == key and now - last[1] < CHAT_DEDUP_S:
                return None
            tokens = per_minute if self._tokens is None else min(per_minute, self._tokens + (now - self._at) * per_minute / 60)
            self._at = now
            if tokens < 1:
                self._tokens = tokens
                self.suppressed += 1
                return None
            self._tokens = tokens - 1
            self._told[subject] = (key, now)
            held, self.suppressed = self.suppressed, 0
        return {**notice, "suppressed": held} if held else dict(notice)


def chat_text(notice: dict[str, Any]) -> str:
    """One line for people: what happened, where, and what was held back."""
    kind = str(notice.get("kind", "notice"))
    icon = ICONS.get(kind, "🔴" if kind in ALERT_KINDS else "ℹ️")
    where = " ".join(str(notice[k]) for k in ("strategy", "worker") if notice.get(k))
    text = f"{icon} quantlab {notice.get('fleet', '')}: {kind}{' ' + where if where else ''} — {notice.get('message', '')}"
    if notice.get("suppressed"):
        text += f" (and {notice['suppressed']} more notices held back by the rate limit; see `quantlab events`)"
    return " ".join(text.split())


def chat_request(kind: str, notice: dict[str, Any], secret: str, chat_id: str | None, api_url: str) -> tuple[str, bytes]:
    """The URL to POST to and the JSON body, in each chat's own format. Plain text only: a
    strategy's error message must not become markup, a link preview or a mention."""
    text = chat_text(notice)
    if kind == "telegram":
        return (f"{api_url.rstrip('/')}/bot{secret}/sendMessage",
                json.dumps({"chat_id": chat_id, "text": text[:4000], "disable_web_page_preview": True}).encode())
    if kind == "slack":
        escaped = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        return secret, json.dumps({"text": escaped[:3000], "unfurl_links": False, "unfurl_media": False}).encode()
    markdown = re.sub(r"([\\*_~`|>\[\]()#-])", r"\\\1", text)
    return secret, json.dumps({"content": markdown[:1900], "username": "quantlab", "flags": DISCORD_SUPPRESS_EMBEDS,
                               "allowed_mentions": {"parse": []}}).encode()


def check_secret(kind: str, secret: str, api_url: str) -> None:
    """The fleet files name where a secret is read from; they must not be able to send any file or
    variable of the controller to any host. So the secret must look like what it claims to be, and
    goes only to its service (other addresses only when the operator allows them, outside the fleet:
    QUANTLAB_CHAT_URL_PREFIXES, space-separated)."""
    allowed = tuple(os.environ.get("QUANTLAB_CHAT_URL_PREFIXES", "").split())
    if kind == "telegram":
        if not TELEGRAM_TOKEN.fullmatch(secret):
            raise LookupError("the bot token does not look like one (digits, a colon, then its key)")
        where = api_url.rstrip("/") + "/"
    else:
        where = secret
    official = CHAT_URLS[kind]
    if not where.startswith(official) and not (allowed and where.startswith(allowed)):
        raise LookupError(f"a {kind} message goes only to {' or '.join(official)} (or an address in "
                          "QUANTLAB_CHAT_URL_PREFIXES)")


def read_secret(sink: Any) -> str:
    """The bot token or webhook URL, read at each delivery (a rotated secret is picked up)."""
    if sink.secret_env is not None:
        value = os.environ.get(sink.secret_env, "").strip()
        if not value:
            raise LookupError(f"the environment variable {sink.secret_env} is not set")
        return _plain(value, f"the environment variable {sink.secret_env}")
    try:
        with open(sink.secret_file, "rb") as handle:
            value = handle.read(SECRET_FILE_CAP).decode("utf-8", "replace").strip()
    except OSError as exc:
        raise LookupError(f"cannot read {sink.secret_file}: {exc.strerror}") from None
    if not value:
        raise LookupError(f"{sink.secret_file} is empty")
    return _plain(value, sink.secret_file)


def _plain(value: str, where: str) -> str:
    """A secret is one word of printable characters; anything else is refused before it can reach
    a URL (or, mangled by an error message, a log line)."""
    if any(c.isspace() or not c.isprintable() for c in value):
        raise LookupError(f"{where} holds whitespace or control characters")
    return value


class Chat:
    """A chat as a sink's destination; its target is the spec.ChatSink. Log lines name the chat,
    never its URL or token."""

    def __init__(self, kind: str):
        self.name = kind

    def where(self, sink: Any) -> str:
        return f"chat {sink.chat_id}" if self.name == "telegram" else "webhook"

    def secrets(self, sink: Any) -> list[str]:
        """The token, the whole URL and its long parts (a webhook's key); not its short words like
        `api`, which would garble every message they appear in."""
        try:
            secret = read_secret(sink)
        except LookupError:
            return []
        return sorted({secret, *(p for p in url_secrets(secret) if len(p) >= 12)}, key=len, reverse=True)

    @staticmethod
    def timeout_reason(seconds: float) -> str:
        return f"no complete answer within {seconds:g}s"

    def deliver(self, sink: Any, body: bytes, watchdog: Watchdog) -> None:
        notice = json.loads(body)
        secret = read_secret(sink)
        check_secret(self.name, secret, sink.api_url)
        url, payload = chat_request(self.name, notice, secret, sink.chat_id, sink.api_url)
        post_json(url, payload, watchdog)
