"""Category 7, HTTP requests to `quantlab serve`: one server per module (a real `python -m quantlab
serve` on a loopback port, with a bearer token) over the world's snapshot. Each request is sent as
raw bytes — unknown paths, a missing or wrong token, methods that would write, absurd query strings,
request lines and headers past any bound, path traversal, bytes that are not HTTP — and must get its
answer at once, with the status and words expected. After each: the server still answers, nothing
on the hosts changed and the state is as it was. A client that sends half a request (or a TLS
greeting to the plain port) holds nobody up and is let go within the server's read timeout."""
from __future__ import annotations

import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest

from tests.corpus.kit import World, file_picture, params
from tests.integration.harness import REPO, cli_env, processes, tree, wait_for
from tests.support import free_port

TOKEN = "corpus-token-0123456789abcdef"
ANSWER_S = 10.0          # a request that gets no full answer in this long counts as hung
READ_TIMEOUT_S = 10.0    # quantlab.face.web.server.READ_TIMEOUT_S: a stalled client is let go after this


@dataclass(frozen=True)
class Ask:
    """One request: `send` as bytes ({port} filled in), the HTTP status expected (0: an HTTP/0.9-style
    answer, a body without a status line) and fragments of the answer."""

    category: str
    id: str
    send: bytes
    status: int
    says: tuple[str, ...]

    def param(self):
        return pytest.param(self, id=self.id)


def ask(id: str, status: int, says: tuple[str, ...] | str, method: str = "GET", path: str = "/api/status", *,
        token: str | None = TOKEN, host: str | None = "127.0.0.1:{port}", headers: bytes = b"",
        version: str = "HTTP/1.0", raw: bytes | None = None) -> Ask:
    if raw is None:
        lines = [f"{method} {path} {version}".encode()]
        if host is not None:
            lines.append(f"Host: {host}".encode())
        if token is not None:
            lines.append(f"Authorization: Bearer {token}".encode())
        raw = b"\r\n".join(lines) + b"\r\n" + headers + b"\r\n"
    return Ask("http", id, raw, status, (says,) if isinstance(says, str) else says)


TOKEN_NEEDED = "a bearer token is required"
READ_ONLY = ("read only: GET and HEAD", "Allow: GET, HEAD")
WRONG_HOST = "unknown Host header (pass --allow-host NAME to serve it)"

ASKS = [
    # --- paths ---
    ask("unknown-path", 404, "not found", path="/admin"),
    ask("dot-dot-path", 404, "not found", path="/../../etc/passwd"),
    ask("encoded-dot-dot", 404, "not found", path="/%2e%2e/%2e%2e/etc/passwd"),
    ask("nul-in-path", 404, "not found", path="/app.js%00.html"),
    ask("raw-non-ascii-path", 404, "not found", raw=b"GET /api/st\xc3\xa4tus\xff HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n"
                                                  b"Authorization: Bearer " + TOKEN.encode() + b"\r\n\r\n"),
    ask("logs-traversal", 404, "no such strategy", path="/api/logs/..%2F..%2Fetc%2Fpasswd"),
    ask("logs-of-a-strategy-nobody-knows", 404, "unknown strategy zz: not in the fleet", path="/api/logs/zz"),
    # --- the token ---
    ask("no-token", 401, (TOKEN_NEEDED, 'WWW-Authenticate: Bearer realm="quantlab"'), token=None),
    ask("wrong-token", 401, TOKEN_NEEDED, token="corpus-token-0123456789abcdeX"),
    ask("empty-bearer", 401, TOKEN_NEEDED, token=""),
    ask("basic-credentials", 401, TOKEN_NEEDED, token=None, headers=b"Authorization: Basic b3BzOm9wcw==\r\n"),
    ask("token-with-control-bytes", 401, TOKEN_NEEDED, token=TOKEN + "\x1b[2J"),
    ask("metrics-without-token", 401, TOKEN_NEEDED, path="/metrics", token=None),
    ask("healthz-needs-no-token", 200, "ok", path="/healthz", token=None),
    # --- methods ---
    ask("post", 405, READ_ONLY, method="POST", headers=b"Content-Length: 5\r\n\r\nhello"),
    ask("delete", 405, READ_ONLY, method="DELETE"),
    ask("options", 405, READ_ONLY, method="OPTIONS"),
    ask("trace", 501, "Unsupported method ('TRACE')", method="TRACE"),
    ask("made-up-method", 501, "Unsupported method ('BREW')", method="BREW"),
    ask("head", 200, "Content-Type: application/json", method="HEAD"),
    # --- the Host header (DNS rebinding) ---
    ask("no-host-header", 421, WRONG_HOST, host=None),
    ask("foreign-host", 421, WRONG_HOST, host="attacker.example"),
    ask("unclosed-ipv6-host", 421, WRONG_HOST, host="[::1"),
    # --- query strings ---
    ask("limit-negative-offset-text", 200, '"page":{"offset":0,"limit":0,', path="/api/status?limit=-5&offset=abc&q="),
    ask("limit-of-5000-digits", 200, '"strategies":[', path="/api/status?limit=" + "9" * 5000),
    ask("events-since-infinity", 200, "[]", path="/api/events?since=1e999&limit=x&strategy=%00"),
    ask("query-of-60-kib", 200, '"strategies":[', path="/api/status?" + "a=1&" * 15_000),
    ask("if-none-match-of-60-kib", 200, '"strategies":[', headers=b"If-None-Match: " + b"x" * 60_000 + b"\r\n"),
    ask("lines-of-5000-digits", 404, "s1 has never been placed", path="/api/logs/s1?lines=" + "9" * 5000),
    # --- past any bound, or not HTTP ---
    ask("request-line-over-64-kib", 414, "Request-URI Too Long", path="/" + "a" * 70_000),
    ask("header-over-64-kib", 431, "Line too long", headers=b"X-Big: " + b"a" * 70_000 + b"\r\n"),
    ask("two-hundred-headers", 431, "Too many headers", headers=b"".join(b"X-%d: a\r\n" % i for i in range(200))),
    ask("body-of-a-terabyte-announced", 200, "ok", path="/healthz", headers=b"Content-Length: 1000000000000\r\n\r\nabc"),
    ask("http-2-request-line", 0, ("Error code: 505", "Invalid HTTP version (2.0)"), version="HTTP/2.0"),
    ask("not-http", 0, "Bad request syntax", raw=b"\x00\x01\x02 garbage\r\n\r\n"),
]


def exchange(port: int, data: bytes) -> bytes:
    """Send `data`, read until the server closes; fail as hung after ANSWER_S."""
    with socket.create_connection(("127.0.0.1", port), timeout=ANSWER_S) as sock:
        sock.sendall(data.replace(b"{port}", str(port).encode()))
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except socket.timeout:
            pytest.fail(f"no full answer within {ANSWER_S:g}s; got {b''.join(chunks)[:200]!r}")
    return b"".join(chunks)


def status_of(answer: bytes) -> int:
    first = answer.split(b"\r\n", 1)[0]
    return int(first.split()[1]) if first.startswith(b"HTTP/") else 0


@dataclass
class Served:
    world: World
    port: int
    proc: subprocess.Popen

    def healthy(self) -> bool:
        try:
            return self.proc.poll() is None and exchange(self.port, b"GET /healthz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n") \
                .endswith(b"ok\n")
        except OSError:
            return False


@pytest.fixture(scope="module")
def served(world: World):
    (world.root / "token").write_text(TOKEN + "\n")
    port = free_port()
    with open(world.root / "serve.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "quantlab", "serve", "--fleet", str(world.fleet), "--state",
                                 str(world.state), "--listen", f"127.0.0.1:{port}", "--token-file",
                                 str(world.root / "token")], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                env=cli_env(), cwd=REPO, start_new_session=True)
    server = Served(world, port, proc)
    try:
        wait_for(lambda: server.healthy() or proc.poll() is not None, 30, "serve to answer /healthz")
        assert proc.poll() is None, (world.root / "serve.log").read_text()
        yield server
    finally:
        proc.kill()
        proc.wait(10)


def unchanged(served: Served, before: tuple, shown: str) -> None:
    world = served.world
    assert served.healthy(), f"the server stopped answering\n{shown}"
    assert tree(world.hosts) == before[0], f"something changed on the hosts\n{shown}"
    assert file_picture(world.state) == before[1], f"the state file changed\n{shown}"
    assert not processes(world.marker), f"processes run on the hosts\n{shown}"
    log = (world.root / "serve.log").read_text(errors="replace")
    assert "Traceback" not in log, f"serve printed a traceback\n{log}"


@pytest.mark.parametrize("asked", params(ASKS))
def test_request(asked, served):
    before = (tree(served.world.hosts), file_picture(served.world.state))
    started = time.monotonic()
    answer = exchange(served.port, asked.send)
    shown = f"{asked.id}: answered in {time.monotonic() - started:.2f}s:\n{answer[:2000].decode(errors='replace')}"
    assert status_of(answer) == asked.status, shown
    for fragment in asked.says:
        assert fragment.encode() in answer, f"expected {fragment!r}\n{shown}"
    unchanged(served, before, shown)


# Stalled before the request line ends: half a request, and a TLS greeting on the plain port.
STALLS = [b"GET /api/status HTTP/1.0\r\nHost: 127", b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03"] * 2


def test_clients_that_stall_hold_nobody_up_and_are_let_go(served):
    before = (tree(served.world.hosts), file_picture(served.world.state))
    stalled = [socket.create_connection(("127.0.0.1", served.port), timeout=ANSWER_S) for _ in STALLS]
    try:
        opened = time.monotonic()
        for sock, data in zip(stalled, STALLS):
            sock.sendall(data)
        for _ in range(3):
            began = time.monotonic()
            answer = exchange(served.port, ask("", 200, "").send)
            assert status_of(answer) == 200 and time.monotonic() - began < 2, answer[:200]
        for sock in stalled:
            sock.settimeout(READ_TIMEOUT_S + 10)
            assert sock.recv(65536) == b"", "a stalled client got an answer to half a request"
        held = time.monotonic() - opened
        assert held < READ_TIMEOUT_S + 5, f"stalled clients were held {held:.1f}s"
    finally:
        for sock in stalled:
            sock.close()
    unchanged(served, before, f"after {len(stalled)} stalled clients")
