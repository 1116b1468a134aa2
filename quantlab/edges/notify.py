"""Telling people: a JSON POST to `notify.webhook` and/or the JSON on the stdin of `notify.command`
(an argv, never run through a shell).

Why in the background: the reconcile loop's tick also renews every strategy's lease, and those
renewals are every strategy's lifeline — a lease that is not renewed in time stops its strategy. A
webhook that answers one byte at a time, or a notify command that hangs, must never delay them. So
`submit` only puts the notices on a bounded queue per sink (webhook, command) and returns at once;
one daemon thread per sink delivers them, each notice within a total deadline (for a webhook: DNS,
connect, send and the whole reply; for a command: the whole run, after which it is killed with its
process group). The two sinks never wait for each other.

A notice that cannot be delivered is logged once and given up; nothing here raises into the caller.
Log lines name a webhook as `scheme://host[:port]` only: tokens live in the path, query or userinfo
(Telegram, Slack). When a queue is full, the oldest routine notice is dropped (alerts are kept as
long as there is anything else to drop), and one "notices-dropped" notice with the count follows as
soon as there is room.
"""
from __future__ import annotations

import base64
import http.client
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import SplitResult, unquote, urlsplit

from quantlab.core.redact import redact_json
from quantlab.core.spec import NotifySettings

# Kinds that are alerts (told once when raised, once when they clear): kept when a queue overflows.
# (A failover brake is told as a guard-blocked alert.)
ALERT_KINDS = frozenset({"worker-offline", "action-failed", "guard-blocked", "resolved", "foreign-state",
                         "fleet-invalid", "instance-problem", "renew-refused", "git-pull-refused", "not-deployed",
                         "fence-anomaly", "disk-full"})

MAX_REPLY_BYTES = 64 * 1024      # a webhook's answer is read (it is part of the delivery) but not kept
STDERR_SHOWN_CHARS = 200
REASON_SHOWN_CHARS = 400
# The watchdog ends a delivery at its deadline; these timeouts, this much later, only back it up
# (a socket read, a command's descendant that left its group and still holds our stderr pipe).
BACKSTOP_S = 1.0
CUT_SHORT_GRACE_S = 1.0         # how long close() waits, after its deadline, for a cut-short delivery to log

Log = Callable[[str], None]


class Notifier:
    """Delivers notices in the background; see the module docstring. Thread-safe."""

    def __init__(self, settings: NotifySettings, log: Log, *, capacity: int = 200,
                 webhook_deadline_s: float = 5.0, command_deadline_s: float = 10.0,
                 on_failure: Callable[[str], None] = lambda sink: None, clock: Callable[[], float] = time.monotonic):
        self._settings = settings
        self._log = log
        self._lock = threading.Lock()
        self._closed = False
        self._webhook = _Sink(_Webhook(), capacity, webhook_deadline_s, log, on_failure)
        self._command = _Sink(_Command(), capacity, command_deadline_s, log, on_failure)
        # One queue per kind of chat.
        self._chats = {kind: _Sink(_Chat(kind), capacity, webhook_deadline_s, log, on_failure)
                       for kind in ("telegram", "slack", "discord")}
        self._clock = clock
        self._gates: dict[Any, ChatGate] = {}      # per chat: de-duplication and rate limit

    @property
    def _sinks(self) -> list[_Sink]:
        return [self._webhook, self._command, *self._chats.values()]

    @property
    def dropped(self) -> int:
        """Notices dropped on overflow so far, over all sinks (one notice dropped by two counts 2)."""
        return sum(sink.dropped for sink in self._sinks)

    def update(self, settings: NotifySettings) -> None:
        """The fleet was reloaded: notices submitted from now on go where `settings` say. Notices
        already queued still go where they were meant to go when submitted."""
        with self._lock:
            self._settings = settings

    def submit(self, notices: list[dict[str, Any]]) -> None:
        """Queue the notices for every configured sink and return at once. Never raises."""
        try:
            with self._lock:
                settings, closed = self._settings, self._closed
            if closed:
                if notices and (settings.webhook or settings.command or settings.chats):
                    _log_safely(self._log, f"notify: {len(notices)} notices not sent: the notifier is closed")
                return
            # Notices leave the machine (a chat, a webhook's service): a message quoting what a host or
            # strategy said (an error naming its proxy) goes without the credentials in it.
            notices = [redact_json(notice) for notice in notices]
            for notice in notices:
                if settings.webhook:
                    self._webhook.put(dict(notice), settings.webhook)
                if settings.command:
                    self._command.put(dict(notice), tuple(settings.command))
                for chat in settings.chats:
                    gate = self._gates.setdefault(chat, ChatGate(self._clock))
                    passed = gate.admit(notice, settings.chat_per_minute)
                    if passed is not None:
                        self._chats[chat.kind].put(passed, chat)
        except Exception as exc:  # noqa: BLE001 - telling people must never break the caller
            _log_safely(self._log, f"notify: could not queue notices: {type(exc).__name__}: {exc}")

    def flush(self, timeout: float) -> bool:
        """Wait until everything submitted so far is delivered or given up (both sinks idle).
        True when drained within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        return all([sink.wait_idle(deadline) for sink in self._sinks])

    def close(self, timeout: float = 5.0) -> None:
        """Deliver what is queued for at most `timeout` seconds, then stop: a delivery still under way
        is cut short (its socket shut, its command's process group killed) and what is left is logged."""
        deadline = time.monotonic() + timeout
        with self._lock:
            self._closed = True
        self.flush(max(0.0, deadline - time.monotonic()))
        for sink in self._sinks:
            sink.stop()
        # A moment more for a delivery just cut short to say so, before the process may end.
        for sink in self._sinks:
            sink.join(max(deadline, time.monotonic()) + CUT_SHORT_GRACE_S)


# --- one queue and its thread -------------------------------------------------------------------

@dataclass
class _Job:
    notice: dict[str, Any]
    target: Any          # the webhook URL or the command's argv, as configured when submitted


class _Sink:
    """One destination's bounded queue and the daemon thread that drains it, one job at a time."""

    def __init__(self, destination: Any, capacity: int, deadline_s: float, log: Log,
                 on_failure: Callable[[str], None] = lambda sink: None):
        self._destination = destination
        self._on_failure = on_failure
        self._capacity = max(1, capacity)
        self._deadline_s = deadline_s
        self._log = log
        self._queue: deque[_Job] = deque()
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None
        self._busy = False                      # a job is being delivered
        self._current: _Watchdog | None = None  # its watchdog, so that stop() can cut it short
        self._stopped = False
        self.dropped = 0
        self._unreported: list[_Job] = []       # dropped since the last "notices-dropped" notice

    # Called by the notifier (any thread).

    def put(self, notice: dict[str, Any], target: Any) -> None:
        with self._changed:
            if self._stopped:
                return
            if len(self._queue) >= self._capacity:
                self._drop_one()
            self._queue.append(_Job(notice, target))
            self._start_thread()
            self._changed.notify_all()

    def wait_idle(self, deadline: float) -> bool:
        with self._changed:
            return self._changed.wait_for(self._idle, timeout=max(0.0, deadline - time.monotonic()))

    def stop(self) -> None:
        with self._changed:
            self._stopped = True
            left, self._queue = len(self._queue) + (1 if self._unreported else 0), deque()
            self._unreported = []
            current = self._current
            self._changed.notify_all()
        if current is not None:
            current.expire("cut short: the notifier is closing")
        if left:
            _log_safely(self._log, f"notify: {self._destination.name}: {left} notices not sent (closing)")

    def join(self, deadline: float) -> None:
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))

    # Under self._changed.

    def _idle(self) -> bool:
        return not self._queue and not self._busy and not self._unreported

    def _start_thread(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._drain, name=f"quantlab-notify-{self._destination.name}",
                                            daemon=True)
            self._thread.start()

    def _drop_one(self) -> None:
        """Make room: the oldest routine notice goes; the oldest alert only when all are alerts."""
        victim = next((job for job in self._queue if job.notice.get("kind") not in ALERT_KINDS), self._queue[0])
        self._queue.remove(victim)
        self.dropped += 1
        if not self._unreported:
            _log_safely(self._log, f"notify: the {self._destination.name} queue is full ({self._capacity}); "
                                   "dropping the oldest routine notices")
        self._unreported.append(victim)

    def _take(self) -> tuple[_Job, _Watchdog] | None:
        """The next job (None once stopped), with the watchdog that bounds its delivery."""
        while not self._stopped and not self._queue and not self._unreported:
            self._changed.wait()
        if self._stopped:
            return None
        if self._unreported and len(self._queue) < self._capacity:
            job = self._dropped_notice()
        else:
            job = self._queue.popleft()
        self._busy = True
        self._current = _Watchdog(self._deadline_s)
        return job, self._current

    def _dropped_notice(self) -> _Job:
        newest = self._unreported[-1]
        count, self._unreported = len(self._unreported), []
        notice = {"t": newest.notice.get("t", int(time.time() * 1000)), "kind": "notices-dropped",
                  "message": f"{count} notices were dropped (the notification queue was full)"}
        return _Job(notice, newest.target)

    # The sink's own thread.

    def _drain(self) -> None:
        while True:
            with self._changed:
                taken = self._take()
            if taken is None:
                return
            self._deliver(*taken)
            with self._changed:
                self._busy, self._current = False, None
                self._changed.notify_all()

    def _deliver(self, job: _Job, watchdog: _Watchdog) -> None:
        destination = self._destination
        try:
            body = json.dumps(job.notice, sort_keys=True, default=str).encode()
            with watchdog:
                destination.deliver(job.target, body, watchdog)
        except Exception as exc:  # noqa: BLE001 - every failure is one log line, never a crash
            if watchdog.expired:
                reason = watchdog.why or destination.timeout_reason(watchdog.seconds)
            else:
                reason = _scrub(f"{type(exc).__name__}: {exc}", destination.secrets(job.target))
            _log_safely(self._log, f"notify: {destination.name} {destination.where(job.target)}: "
                                   f"{job.notice.get('kind', 'a')} notice not delivered: {reason}")
            _quietly(lambda: self._on_failure(destination.name))


# --- the deadline of one delivery ---------------------------------------------------------------

class _Watchdog:
    """Ends one delivery at its deadline whatever it is blocked in: at expiry (or on stop) a timer
    runs the registered cleanups — shut a socket down, kill a process group — which wake the
    delivering thread. Used as a context manager around the delivery."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds
        self.expired = False
        self.why: str | None = None            # set when cut short before the deadline
        self._cleanups: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self.expire)
        self._timer.daemon = True

    def __enter__(self) -> _Watchdog:
        self._timer.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._timer.cancel()

    def remaining(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    def on_expiry(self, cleanup: Callable[[], None]) -> None:
        with self._lock:
            if not self.expired:
                self._cleanups.append(cleanup)
                return
        _quietly(cleanup)          # already over: clean up at once

    def expire(self, why: str | None = None) -> None:
        with self._lock:
            if self.expired:
                return
            self.expired, self.why = True, why
            cleanups, self._cleanups = self._cleanups, []
        for cleanup in cleanups:
            _quietly(cleanup)

    def check(self) -> None:
        if self.expired:
            raise TimeoutError("deadline reached")


# --- the webhook ---------------------------------------------------------------------------------

class _Webhook:
    name = "webhook"

    @staticmethod
    def where(url: str) -> str:
        return describe_url(url)

    @staticmethod
    def secrets(url: str) -> list[str]:
        return url_secrets(url)

    @staticmethod
    def timeout_reason(seconds: float) -> str:
        return f"no complete answer within {seconds:g}s"

    @staticmethod
    def deliver(url: str, body: bytes, watchdog: _Watchdog) -> None:
        post_json(url, body, watchdog)


def describe_url(url: str) -> str:
    """`scheme://host[:port]` — never the path, query or userinfo, where tokens live."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    host = parts.hostname or "?"
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme or '?'}://{host}" + (f":{port}" if port else "")


def url_secrets(url: str) -> list[str]:
    """Every piece of the URL that may carry a token, longest first (to scrub error messages)."""
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    pieces = [url, parts.path + ("?" + parts.query if parts.query else ""), parts.path, parts.query,
              parts.fragment, userinfo, parts.username or "", parts.password or ""]
    pieces += [unquote(p) for p in pieces]
    pieces += [segment for segment in parts.path.split("/") if segment]
    return sorted({p for p in pieces if len(p) > 1}, key=len, reverse=True)


def post_json(url: str, body: bytes, watchdog: _Watchdog) -> None:
    """POST `body`; DNS, connect, TLS, send and the whole reply all end by the watchdog's deadline.
    Raises on any failure, a non-2xx status included."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("the webhook must be an http:// or https:// URL")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        sock = _connect(parts.hostname, port, watchdog)
        if parts.scheme == "https":
            sock = _start_tls(sock, parts.hostname, watchdog)
        status, reason = _exchange(sock, parts, port, body)
        watchdog.check()                  # a reply cut at the deadline may read as a short, complete one
    except Exception:
        if watchdog.expired:
            raise TimeoutError("deadline reached") from None   # the watchdog's shutdown caused this error
        raise
    if not 200 <= status < 300:
        raise ConnectionError(f"answered HTTP {status} {reason}".rstrip())


def _connect(host: str, port: int, watchdog: _Watchdog) -> socket.socket:
    error: Exception = OSError("no address for the host")
    for family, kind, proto, _, address in _resolve(host, port, watchdog.remaining()):
        sock = socket.socket(family, kind, proto)
        watchdog.on_expiry(lambda s=sock: s.shutdown(socket.SHUT_RDWR))
        # A shutdown does not interrupt connect(): its own timeout is the deadline.
        sock.settimeout(max(0.01, watchdog.remaining()))
        try:
            sock.connect(address)
            watchdog.check()
        except TimeoutError:
            sock.close()
            raise TimeoutError(f"no connection within {watchdog.seconds:g}s") from None
        except Exception as exc:
            sock.close()
            error = exc
            continue
        sock.settimeout(watchdog.remaining() + BACKSTOP_S)
        return sock
    raise error


def _resolve(host: str, port: int, timeout: float) -> list[tuple]:
    """getaddrinfo cannot be interrupted, so it runs in a helper thread we stop waiting for."""
    answer: list[Any] = []

    def lookup() -> None:
        try:
            answer.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except Exception as exc:  # noqa: BLE001 - handed to the waiting thread
            answer.append(exc)

    helper = threading.Thread(target=lookup, name="quantlab-notify-dns", daemon=True)
    helper.start()
    helper.join(timeout)
    if not answer:
        raise TimeoutError(f"no DNS answer within {timeout:.1f}s")
    if isinstance(answer[0], Exception):
        raise answer[0]
    return answer[0]


def _start_tls(sock: socket.socket, hostname: str, watchdog: _Watchdog) -> ssl.SSLSocket:
    # The handshake runs after wrapping so that the watchdog can shut the TLS socket down mid-handshake.
    tls = ssl.create_default_context().wrap_socket(sock, server_hostname=hostname, do_handshake_on_connect=False)
    # socket.socket.shutdown: the raw shutdown, safe from another thread (SSLSocket's own is not).
    watchdog.on_expiry(lambda: socket.socket.shutdown(tls, socket.SHUT_RDWR))
    tls.do_handshake()
    return tls


def _exchange(sock: socket.socket, parts: SplitResult, port: int, body: bytes) -> tuple[int, str]:
    kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    connection = kind(parts.hostname, port)       # (names the Host header without a default port)
    connection.sock = sock                         # already connected (and bounded) by us
    try:
        connection.request("POST", (parts.path or "/") + (f"?{parts.query}" if parts.query else ""), body,
                           _headers(parts))
        response = connection.getresponse()
        response.read(MAX_REPLY_BYTES)
        return response.status, response.reason
    finally:
        connection.close()


def _headers(parts: SplitResult) -> dict[str, str]:
    headers = {"Content-Type": "application/json", "User-Agent": "quantlab-notify", "Connection": "close"}
    if parts.username is not None:
        credentials = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
        headers["Authorization"] = "Basic " + base64.b64encode(credentials).decode()
    return headers


# --- chats: Telegram, Slack, Discord -------------------------------------------------------------

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


class _Chat:
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

    def deliver(self, sink: Any, body: bytes, watchdog: _Watchdog) -> None:
        notice = json.loads(body)
        secret = read_secret(sink)
        check_secret(self.name, secret, sink.api_url)
        url, payload = chat_request(self.name, notice, secret, sink.chat_id, sink.api_url)
        post_json(url, payload, watchdog)


# --- the command ---------------------------------------------------------------------------------

class _Command:
    name = "command"

    @staticmethod
    def where(argv: tuple[str, ...]) -> str:
        return argv[0] if argv else "?"

    @staticmethod
    def secrets(argv: tuple[str, ...]) -> list[str]:
        # Arguments may carry a token (a chat id, an API key): never echoed back in a log line.
        return sorted({arg for arg in argv[1:] if len(arg) > 3}, key=len, reverse=True)

    @staticmethod
    def timeout_reason(seconds: float) -> str:
        return f"still running after {seconds:g}s; killed with its process group"

    @staticmethod
    def deliver(argv: tuple[str, ...], body: bytes, watchdog: _Watchdog) -> None:
        run_command(argv, body, watchdog)


def run_command(argv: tuple[str, ...], body: bytes, watchdog: _Watchdog) -> None:
    """Run argv (no shell) with `body` on stdin; at the deadline kill it and everything it started
    (its own session, so one killpg reaches them all). Raises on any failure, a non-zero exit included."""
    watchdog.check()
    with subprocess.Popen(list(argv), stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, start_new_session=True) as process:
        watchdog.on_expiry(lambda: _kill_group(process))
        try:
            # The watchdog's kill ends this; the timeout is a backstop for a descendant that left the
            # group (setsid) and still holds our stderr pipe.
            _, stderr = process.communicate(body, timeout=watchdog.remaining() + BACKSTOP_S)
        except subprocess.TimeoutExpired:
            _kill_group(process)
            raise
    watchdog.check()
    if process.returncode != 0:
        last_words = stderr.decode(errors="replace").strip()[-STDERR_SHOWN_CHARS:]
        raise ChildProcessError(f"exited {process.returncode}" + (f": {last_words}" if last_words else ""))


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# --- small helpers ---------------------------------------------------------------------------------

def _scrub(text: str, secrets: list[str]) -> str:
    """One log line: no token, no line break (a server's garbage ends in one), not too long."""
    for secret in secrets:
        text = text.replace(secret, "<redacted>")
    return " ".join(text.split())[:REASON_SHOWN_CHARS]


def _quietly(cleanup: Callable[[], None]) -> None:
    try:
        cleanup()
    except Exception:  # noqa: BLE001 - a socket already closed, a process already gone
        pass


def _log_safely(log: Log, line: str) -> None:
    try:
        log(line)
    except Exception:  # noqa: BLE001 - a broken log must not stop the sink's thread
        pass
