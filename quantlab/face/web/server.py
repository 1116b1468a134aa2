"""`quantlab serve`: the fleet page, its JSON API and Prometheus /metrics, read only.

Built on the standard library's ThreadingHTTPServer (and `ssl` for TLS): a read-only page over one
snapshot needs no framework, and nothing here needs a build step or a download. Everything it shows
comes from the snapshot the last writing run recorded (snapshot.py), so it adds no SSH load; only a
strategy's log lines are fetched from its host, on demand and rate-limited.

Safety: bound to 127.0.0.1 by default. Beyond loopback it refuses to start without a bearer token
(read from a file, compared in constant time) and without TLS, unless --insecure-http is given. Every
request's Host header must name the server (DNS rebinding), and only GET and HEAD are served.
"""
from __future__ import annotations

import hmac
import ipaddress
import json
import os
import socket
import ssl
import stat
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

from quantlab.edges.atomicfile import MiB, NotARegularFile, describe_kind, read_regular
from quantlab.core.planner import UnknownTarget
from quantlab.edges.eventlog import event_problem
from . import metrics

STATIC = {"/": ("page.html", "text/html; charset=utf-8"), "/app.js": ("app.js", "text/javascript; charset=utf-8"),
          "/app.css": ("app.css", "text/css; charset=utf-8")}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-store",
}
LOG_LINES_MAX = 1000
LOG_EVERY_S = 2.0             # one log fetch per strategy per this many seconds
LOG_AT_ONCE = 2               # log fetches in flight at once, over all strategies
READ_TIMEOUT_S = 10.0         # one read from a client (or a TLS handshake step) that stalls ends its connection
CONNECTION_DEADLINE_S = 60.0  # and no connection lives longer than this, however slowly it trickles
MAX_CONNECTIONS = 32          # more at once are closed at once: the page must never cost the loop its threads
TOKEN_FILE_CAP = 1 * MiB      # a bearer token is a line; anything bigger is the wrong file


class ServeRefused(Exception):
    """The server must not start as asked; the message says what to do."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isascii() or not port.isdigit() or not host:
        raise ServeRefused(f"--listen {text}: expected HOST:PORT, e.g. 127.0.0.1:8421")
    if int(port) > 65535:
        raise ServeRefused(f"--listen {text}: port {int(port)} is out of range (at most 65535), e.g. 127.0.0.1:8421")
    host = host.strip("[]")
    try:
        host.encode("idna")           # what bind() does with a name; its failure is no OSError
    except UnicodeError:
        raise ServeRefused(f"--listen {text}: {host!r} is not a host name or address, e.g. 127.0.0.1:8421") from None
    return host, int(port)


@dataclass
class Source:
    """What the page reads: the snapshot store, the events log, the logs of a strategy (a callable
    that fetches them from its host) and the version."""

    snapshots: Any
    events: Callable[[], Any]
    logs: Callable[[str, int], bytes]
    version: str = "unknown"


@dataclass
class Policy:
    """Who may ask: the Host names served, and the token (None: no token)."""

    hosts: frozenset[str]
    token: bytes | None = None


@dataclass
class LogLimiter:
    """Log fetches reach a host: at most one per strategy per LOG_EVERY_S, LOG_AT_ONCE at once."""

    last: dict[str, float] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    slots: threading.BoundedSemaphore = field(default_factory=lambda: threading.BoundedSemaphore(LOG_AT_ONCE))

    def allow(self, strategy: str) -> float:
        """0 when a fetch may go now (and it is counted), else seconds to wait."""
        now = time.monotonic()
        with self.lock:
            wait = self.last.get(strategy, -LOG_EVERY_S) + LOG_EVERY_S - now
            if wait > 0:
                return wait
            self.last[strategy] = now
            return 0.0


class PageServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], source: Source, policy: Policy, tls: ssl.SSLContext | None):
        self.source, self.policy, self.tls = source, policy, tls
        self.limiter = LogLimiter()
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.address_family = family
        super().__init__(address, Handler)

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = super().get_request()
        sock.settimeout(READ_TIMEOUT_S)
        if self.tls is not None:      # the handshake happens in the request's own thread (see Handler.handle)
            sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, addr

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            self.shutdown_request(request)        # too many at once: this one is dropped, not queued
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        # However slowly a client trickles its bytes in, its connection ends at the deadline.
        deadline = threading.Timer(CONNECTION_DEADLINE_S, lambda: _shut(request))
        deadline.daemon = True
        deadline.start()
        try:
            super().process_request_thread(request, client_address)
        finally:
            deadline.cancel()
            self.slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass                                      # a client that misbehaved: nothing to print, nothing to do


def _shut(sock: Any) -> None:
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass


class Handler(BaseHTTPRequestHandler):
    server: PageServer
    server_version = "quantlab"
    sys_version = ""
    protocol_version = "HTTP/1.0"        # one request per connection: the connection deadline bounds it

    def handle(self) -> None:
        try:
            if isinstance(self.request, ssl.SSLSocket):
                self.request.do_handshake()
            super().handle()
        except (OSError, ssl.SSLError):
            pass                         # a client that went away, never spoke or failed its handshake

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass                             # no access log: the page polls every two seconds

    # --- the methods ------------------------------------------------------------------------------

    def do_GET(self) -> None:
        self._serve(head=False)

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def _refuse_method(self) -> None:
        self.close_connection = True     # its body, unread, must not be taken for another request
        self._send(HTTPStatus.METHOD_NOT_ALLOWED, b"read only: GET and HEAD\n", "text/plain", {"Allow": "GET, HEAD"})

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _refuse_method  # type: ignore[assignment]

    def _serve(self, head: bool) -> None:
        self._head = head
        if host_name(self.headers.get("Host") or "") not in self.server.policy.hosts:
            self._send(HTTPStatus.MISDIRECTED_REQUEST, b"unknown Host header (pass --allow-host NAME to serve it)\n",
                       "text/plain")
            return
        url = urlsplit(self.path)
        path, query = url.path, parse_qs(url.query)
        if path in STATIC:
            name, kind = STATIC[path]
            self._send(HTTPStatus.OK, resources.files("quantlab.face.web").joinpath("static", name).read_bytes(), kind)
            return
        if path == "/healthz":
            self._send(HTTPStatus.OK, b"ok\n", "text/plain")
            return
        if not self._authorised():
            self._send(HTTPStatus.UNAUTHORIZED, b"a bearer token is required\n", "text/plain",
                       {"WWW-Authenticate": 'Bearer realm="quantlab"'})
            return
        try:
            if path == "/readyz":
                self._readyz()
            elif path == "/api/status":
                self._status(query)
            elif path == "/api/events":
                self._events(query)
            elif path.startswith("/api/logs/"):
                self._logs(path[len("/api/logs/"):], query)
            elif path == "/metrics":
                body = metrics.render(self.server.source.snapshots.read(), self.server.source.version)
                self._send(HTTPStatus.OK, body.encode(), "text/plain; version=0.0.4; charset=utf-8")
            else:
                self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain")
        except Exception as exc:  # noqa: BLE001 - a state that cannot be read is an answer, not a crash
            self._send(HTTPStatus.SERVICE_UNAVAILABLE, f"{type(exc).__name__}: {exc}\n".encode(), "text/plain")

    def _authorised(self) -> bool:
        token = self.server.policy.token
        if token is None:
            return True
        given = self.headers.get("Authorization") or ""
        scheme, _, value = given.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token)

    # --- the answers ------------------------------------------------------------------------------

    def _readyz(self) -> None:
        snap = self.server.source.snapshots.read()
        if snap is None:
            self._send(HTTPStatus.SERVICE_UNAVAILABLE, b"no snapshot yet: no apply or reconcile has run\n", "text/plain")
            return
        interval = float((snap.get("settings") or {}).get("intervalSeconds") or 5)
        age = time.time() - snap.get("at", 0) / 1000
        if age > max(30.0, 3 * interval):
            self._send(HTTPStatus.SERVICE_UNAVAILABLE, f"the last round was {age:.0f} s ago\n".encode(), "text/plain")
            return
        self._send(HTTPStatus.OK, b"ready\n", "text/plain")

    def _status(self, query: dict[str, list[str]]) -> None:
        store = self.server.source.snapshots
        version = store.version()
        etag = f'"{version}"' if version else None
        if etag and self.headers.get("If-None-Match") == etag and "q" not in query:
            self._send(HTTPStatus.NOT_MODIFIED, b"", None, {"ETag": etag})
            return
        snap = store.read()
        if snap is None:
            self._send(HTTPStatus.SERVICE_UNAVAILABLE, b'{"error": "no snapshot yet: run apply or reconcile"}',
                       "application/json")
            return
        report = dict(snap["status"])
        strategies = everything = report.get("strategies") or []
        text = (query.get("q") or [""])[0].lower()
        if text:
            strategies = [s for s in strategies if text in s["id"].lower() or text in (s.get("workerId") or "").lower()
                          or text in str(s.get("status")).lower()]
        total = len(strategies)
        offset = _int(query, "offset", 0)
        limit = _int(query, "limit", 0)
        if limit:
            strategies = strategies[offset:offset + limit]
        report["strategies"] = strategies
        # `total`: what matches the filter; `fleet` and `counts`: the whole fleet, whatever the filter
        # and the page show, so that a filter never reads as strategies gone.
        report["page"] = {"offset": offset, "limit": limit, "total": total, "fleet": len(everything)}
        report["counts"] = dict(sorted(Counter(str(s.get("status")) for s in everything).items()))
        report["snapshot"] = {"at": snap.get("at"), "rounds": snap.get("rounds"), "settings": snap.get("settings")}
        self._send(HTTPStatus.OK, json.dumps(report, separators=(",", ":")).encode(), "application/json",
                   {"ETag": etag} if etag and not text else None)

    def _events(self, query: dict[str, list[str]]) -> None:
        strategy = (query.get("strategy") or [None])[0]
        since = _int(query, "since", 0)
        limit = min(_int(query, "limit", 200) or 200, 5000)
        # Only events that can be compared and sorted: one odd line must not cost the page its history.
        picked = [e for e in self.server.source.events() if event_problem(e) is None
                  and (strategy is None or e.get("strategy") == strategy) and e.get("t", 0) >= since]
        picked.sort(key=lambda e: e.get("t", 0))
        self._send(HTTPStatus.OK, json.dumps(picked[-limit:], separators=(",", ":"), default=str).encode(),
                   "application/json")

    def _logs(self, strategy: str, query: dict[str, list[str]]) -> None:
        if not strategy or len(strategy) > 63 or not all(c.isalnum() or c == "-" for c in strategy):
            self._send(HTTPStatus.NOT_FOUND, b"no such strategy\n", "text/plain")
            return
        wait = self.server.limiter.allow(strategy)
        if wait > 0:
            self._send(HTTPStatus.TOO_MANY_REQUESTS, b"asked too often\n", "text/plain",
                       {"Retry-After": str(max(1, round(wait)))})
            return
        if not self.server.limiter.slots.acquire(blocking=False):
            self._send(HTTPStatus.TOO_MANY_REQUESTS, b"other log fetches are under way\n", "text/plain",
                       {"Retry-After": "1"})
            return
        try:
            lines = min(max(1, _int(query, "lines", 200) or 200), LOG_LINES_MAX)
            body = self.server.source.logs(strategy, lines)
        except UnknownTarget as exc:           # not a failure of the server: a strategy it does not know
            self._send(HTTPStatus.NOT_FOUND, f"{exc}\n".encode(), "text/plain; charset=utf-8")
            return
        finally:
            self.server.limiter.slots.release()
        self._send(HTTPStatus.OK, body, "text/plain; charset=utf-8")

    def _send(self, status: HTTPStatus, body: bytes, kind: str | None, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in {**SECURITY_HEADERS, **(extra or {})}.items():
            self.send_header(key, value)
        if kind:
            self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not getattr(self, "_head", False) and status != HTTPStatus.NOT_MODIFIED:
            self.wfile.write(body)


def host_name(header: str) -> str:
    """The name in a Host header, without its port: `[::1]:8421` -> `::1`, `Example:80` -> `example`."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if ":" in header else header


def _int(query: dict[str, list[str]], key: str, default: int) -> int:
    try:
        return max(0, int((query.get(key) or [default])[0]))
    except ValueError:
        return default


def _regular_or_refused(option: str, path: Path) -> None:
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise ServeRefused(f"{option} {path}: {exc.strerror}") from None
    if not stat.S_ISREG(mode):
        raise ServeRefused(f"{option} {path} is {describe_kind(mode)}, not a regular file: give the PEM file")


def make_server(listen: str, source: Source, *, token_file: Path | None = None, tls_cert: Path | None = None,
                tls_key: Path | None = None, insecure_http: bool = False,
                allow_hosts: tuple[str, ...] = ()) -> PageServer:
    """The server as asked, or ServeRefused saying why not (beyond loopback: a token and TLS)."""
    host, port = parse_listen(listen)
    loopback = is_loopback(host)
    token = None
    if token_file is not None:
        # Never a blocking open: a FIFO (or a device) given by mistake would hang the start for ever.
        try:
            token = read_regular(token_file, TOKEN_FILE_CAP).strip()
        except NotARegularFile as exc:
            raise ServeRefused(f"--token-file {exc}: give the file that holds the token") from None
        except OSError as exc:
            raise ServeRefused(f"--token-file {token_file}: {exc.strerror}") from None
        if len(token) < 16:
            raise ServeRefused(f"--token-file {token_file}: the token must be at least 16 characters")
    if not loopback and token is None:
        raise ServeRefused(f"--listen {listen} is reachable beyond this machine: pass --token-file FILE (a bearer "
                           "token of at least 16 characters), or listen on 127.0.0.1")
    tls = None
    if tls_cert is not None or tls_key is not None:
        if tls_cert is None or tls_key is None:
            raise ServeRefused("pass both --tls-cert and --tls-key")
        for option, path in (("--tls-cert", tls_cert), ("--tls-key", tls_key)):
            _regular_or_refused(option, path)       # OpenSSL's own open would block on a FIFO
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            tls.load_cert_chain(str(tls_cert), str(tls_key))
        except (OSError, ssl.SSLError) as exc:
            raise ServeRefused(f"cannot load --tls-cert/--tls-key: {exc}") from None
    elif not loopback and not insecure_http:
        raise ServeRefused(f"--listen {listen} is reachable beyond this machine: pass --tls-cert and --tls-key, or "
                           "--insecure-http if a TLS proxy in front of it terminates TLS")
    names = {"localhost", "127.0.0.1", "::1", host.lower(), *(h.lower() for h in allow_hosts)}
    if host in ("0.0.0.0", "::"):
        names.discard(host)
    try:
        return PageServer((host, port), source, Policy(frozenset(names), token), tls)
    except OSError as exc:
        raise ServeRefused(f"cannot listen on {listen}: {exc.strerror}") from None
