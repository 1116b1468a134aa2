"""Secrets out of what people and machines read: a URL's `user:password@` (a worker's proxy) becomes
`***@` in plans, status, events, logs and the fleet page, and the fleet's known secrets (its proxies'
credentials, the notify webhook's tokens) become `***` in text that comes from elsewhere (a host's
error, a strategy's output). Pure; the runner still gets the real URL.

The state keeps what each copy was launched with, to tell when its worker's proxy changed: a proxy
with credentials is kept there redacted, with a salted scrypt digest of the whole URL beside it
(`seal_launch`), so that a copy of the state (`state pull`, a backup) does not give the password away.
"""
from __future__ import annotations

import hashlib
import re
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping, overload

if TYPE_CHECKING:
    from .spec import Fleet

MASK = "***"
# The userinfo after a scheme's `://`, up to the last `@` before the host: a password may hold an
# `@` (URL parsers take the last one); it ends at what ends a URL's authority or a word in running
# text. Without the `:` a strategy's output ("a//b@c", binary bytes) would lose text that is no URL.
_USERINFO = re.compile(r"(?<=://)[^/?#\s\"'<>\\]*@")
# A password or user name shorter than this is not looked for on its own (outside its URL) in text
# from elsewhere: a short one would blot out ordinary words and numbers of a strategy's log.
MIN_BARE_SECRET = 8
# A webhook's path segment this long is taken for a token (Slack's and Discord's keys, a Telegram
# bot token); shorter ones are words like "services" or "api".
MIN_PATH_TOKEN = 12
DIGEST_KEY = "proxyDigest"
_DIGEST_PREFIX = "scrypt:"
# scrypt's cost: about 50 ms and 16 MiB once per distinct proxy and process (cached), which makes
# guessing a password from a copy of the state slow.
_SCRYPT = {"n": 2 ** 14, "r": 8, "p": 1, "dklen": 32}


@overload
def redact_url(text: str) -> str: ...
@overload
def redact_url(text: None) -> None: ...


def redact_url(text: str | None) -> str | None:
    """`http://user:pass@host:3128` -> `http://***@host:3128`, also inside running text; anything
    else as it is."""
    return _USERINFO.sub(MASK + "@", text) if text and "@" in text else text


@lru_cache(maxsize=64)
def _secrets_pattern(secrets: tuple[str, ...]) -> re.Pattern[str] | None:
    # Longest first: a userinfo is masked whole, not its password alone leaving the user name.
    ordered = sorted({s for s in secrets if s}, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, ordered))) if ordered else None


def redact_text(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` with every URL's userinfo and every one of `secrets` (see `fleet_secrets`) masked."""
    pattern = _secrets_pattern(tuple(secrets))
    if pattern is not None:
        text = pattern.sub(MASK, text)
    return redact_url(text)


def describe_change(label: str, before: Any, after: Any, *, hidden_change: bool = False) -> str:
    """`label before → after` with URL credentials masked. When the two differ only in what is masked
    (or `hidden_change`: a digest says so), showing both would read as no change: it says which
    credentials changed instead, without them."""
    was, now = redact_url(str(before)), redact_url(str(after))
    if was == now and (before != after or hidden_change):
        return f"{label} {now}: credentials changed"
    return f"{label} {was} → {now}"


def redact_json(value: Any, secrets: Iterable[str] = ()) -> Any:
    """A copy of a JSON-like value (an event, a status report) with every string in it redacted as
    `redact_text` does. Keys are left alone: they are field names."""
    pattern = _secrets_pattern(tuple(secrets))

    def walk(item: Any) -> Any:
        if isinstance(item, str):
            if pattern is not None:
                item = pattern.sub(MASK, item)
            return _USERINFO.sub(MASK + "@", item) if "@" in item else item
        if isinstance(item, Mapping):
            return {k: walk(v) for k, v in item.items()}
        if isinstance(item, (list, tuple)):
            return [walk(v) for v in item]
        return item
    return walk(value)


def _unquote(text: str) -> str:
    """Percent-decoding (as urllib.parse.unquote does, which the core does not import)."""
    if "%" not in text:
        return text
    raw = re.sub(rb"%([0-9A-Fa-f]{2})", lambda m: bytes([int(m.group(1), 16)]), text.encode())
    return raw.decode("utf-8", "replace")


def url_secrets(url: str | None, *, path_tokens: bool = False) -> list[str]:
    """The pieces of `url` that are secret, as they may appear in text: its userinfo, and its user
    name and password when long enough to be looked for alone (each as written and percent-decoded).
    Masking them leaves the rest of the URL readable (`http://***@host:port`). `path_tokens`: a
    webhook, whose query, query values and long path segments are tokens too."""
    if not url:
        return []
    rest = url.partition("//")[2] if "//" in url else url
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
    userinfo = authority.rpartition("@")[0]
    user, _, password = userinfo.partition(":")
    pieces = [userinfo] + [p for p in (user, password) if len(p) >= MIN_BARE_SECRET]
    if path_tokens:
        after = rest[len(authority):]
        path, _, query = after.partition("#")[0].partition("?")
        values = [v.partition("=")[2] for v in query.split("&")]
        pieces += [query] + [v for v in values if len(v) >= MIN_BARE_SECRET]
        pieces += [segment for segment in path.split("/") if len(segment) >= MIN_PATH_TOKEN]
    pieces = [p for p in pieces if p]
    pieces += [_unquote(p) for p in pieces]
    return sorted(set(pieces), key=len, reverse=True)


def fleet_secrets(fleet: "Fleet") -> tuple[str, ...]:
    """Every secret of the fleet's files that text from elsewhere may quote: the credentials of the
    workers' and strategies' proxies and the notify webhook's tokens. Longest first."""
    found: set[str] = set()
    for worker in fleet.workers.values():
        found.update(url_secrets(worker.proxy))
    for spec in fleet.strategies.values():
        found.update(url_secrets(spec.requirements.proxy))
    found.update(url_secrets(fleet.settings.notify.webhook, path_tokens=True))
    return tuple(sorted(found, key=len, reverse=True))


def redact_lines(chunks: Iterable[bytes], secrets: Iterable[str] = (), limit: int = 64 * 1024) -> Iterator[bytes]:
    """A byte stream (a strategy's log) redacted line by line: a secret is never cut in two by a
    chunk's end. A line longer than `limit` goes out in pieces of that size. Bytes that are not UTF-8
    pass through unchanged."""
    secrets = tuple(secrets)

    def clean(data: bytes) -> bytes:
        text = data.decode("utf-8", "surrogateescape")
        kept = redact_text(text, secrets)
        return data if kept == text else kept.encode("utf-8", "surrogateescape")

    pending = b""
    for chunk in chunks:
        pending += chunk
        end = pending.rfind(b"\n") + 1
        if end == 0 and len(pending) >= limit:
            end = len(pending)
        if end:
            yield clean(pending[:end])
            pending = pending[end:]
    if pending:
        yield clean(pending)


# --- the state's copy of a worker's proxy --------------------------------------------------------

@lru_cache(maxsize=1024)
def proxy_digest(proxy: str, salt: str) -> str:
    """`scrypt:SALT:HEX` of `proxy` (the whole URL): equal for the same URL and salt."""
    digest = hashlib.scrypt(proxy.encode(), salt=salt.encode(), maxmem=64 * 1024 * 1024, **_SCRYPT).hex()
    return f"{_DIGEST_PREFIX}{salt}:{digest}"


def _digest_salt(digest: Any) -> str | None:
    if not isinstance(digest, str) or not digest.startswith(_DIGEST_PREFIX):
        return None
    salt, sep, _ = digest[len(_DIGEST_PREFIX):].rpartition(":")
    return salt if sep else None


def seal_launch(launch: Mapping[str, Any], salt: str) -> dict[str, Any]:
    """A worker's launch fields (spec.worker_launch) as the state keeps them: a proxy with
    credentials redacted, and its digest under DIGEST_KEY to tell a change. Already sealed ones, and
    proxies without credentials, as they are."""
    proxy = launch.get("proxy")
    if DIGEST_KEY in launch or not isinstance(proxy, str) or redact_url(proxy) == proxy:
        return dict(launch)
    return {**launch, "proxy": redact_url(proxy), DIGEST_KEY: proxy_digest(proxy, salt)}


def comparable_launch(recorded: Mapping[str, Any], now: Mapping[str, Any]) -> dict[str, Any]:
    """`now` (a worker's launch fields as they are) in the form `recorded` (as the state keeps them)
    was kept in, so that the two compare equal exactly when the worker did not change: sealed with
    the recorded digest's salt, or as it is when the record holds no digest (no credentials, or
    written by an earlier release, which kept the URL in clear)."""
    salt = _digest_salt(recorded.get(DIGEST_KEY))
    return seal_launch(now, salt) if salt is not None else dict(now)


__all__ = ["DIGEST_KEY", "MASK", "comparable_launch", "describe_change", "fleet_secrets", "proxy_digest",
           "redact_json", "redact_lines", "redact_text", "redact_url", "seal_launch", "url_secrets"]
