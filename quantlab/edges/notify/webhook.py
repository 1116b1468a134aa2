"""The webhook destination: the notice's JSON POSTed to `notify.webhook`, and `post_json`, the
POST whose every step — DNS, connect, TLS, send and the whole reply — ends by one Watchdog's
deadline (the chats post through it too). Log lines name a webhook as `scheme://host[:port]` only:
tokens live in the path, query or userinfo.
"""
from __future__ import annotations

import base64
import http.client
import socket
import ssl
import threading
from typing import Any
from urllib.parse import SplitResult, unquote, urlsplit

from .delivery import BACKSTOP_S, Watchdog

MAX_REPLY_BYTES = 64 * 1024      # a webhook's answer is read (it is part of the delivery) but not kept


class Webhook:
    """The webhook as a sink's destination; its target is the URL."""

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
    def deliver(url: str, body: bytes, watchdog: Watchdog) -> None:
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


def post_json(url: str, body: bytes, watchdog: Watchdog) -> None:
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


def _connect(host: str, port: int, watchdog: Watchdog) -> socket.socket:
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


def _start_tls(sock: socket.socket, hostname: str, watchdog: Watchdog) -> ssl.SSLSocket:
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
