"""Secrets out of what people and machines read: a URL's `user:password@` (a worker's proxy) becomes
`***@` in plans, status, events, logs and the fleet page. Pure; the runner still gets the real URL."""
from __future__ import annotations

import re

_USERINFO = re.compile(r"(?<=//)[^/@\s]+@")


def redact_url(text: str | None) -> str | None:
    """`http://user:pass@host:3128` -> `http://***@host:3128`; anything else as it is."""
    return _USERINFO.sub("***@", text) if text else text
