"""Step two, across documents: the rules no single document can break alone. Ids are unique per
kind, no two workers share a workdir on one host, and no two strategies trade one account and
symbol unless both say they may.

Each rule reads every document of its kind, also one with schema errors, from its fields that
passed the schema (a field that failed cannot be compared), so that one run reports every problem.
"""
from __future__ import annotations

from .documents import Document
from .parsing import ParsedFleet
from .problems import named_id


def unique(parsed: ParsedFleet, docs: list[Document], kind: str) -> list[Document]:
    """`docs` less those that repeat an earlier id (each reported). A document whose id failed
    the schema cannot be compared, and stays."""
    first: dict[str, Document] = {}
    out = []
    for doc in docs:
        ident = doc.ident()
        if ident is not None and ident in first:
            other = first[ident].loc("id")
            parsed.problem(doc.loc("id"), f"duplicate {kind} id {ident!r}: also defined at {other}; ids must be unique")
            continue
        if ident is not None:
            first[ident] = doc
        out.append(doc)
    return out


def shared_accounts(parsed: ParsedFleet, docs: list[Document]) -> None:
    """Two strategies must not trade one account+symbol unless both say shareAccount. A Strategy
    takes part when its account, params and shareAccount passed the schema."""
    seen: dict[tuple[str, str], Document] = {}
    for doc in docs:
        needed = (("requirements", "account"), ("params",), ("scheduling", "shareAccount"))
        if not all(doc.usable(*f) for f in needed):
            continue
        account = doc.value("requirements", "account")
        params = doc.value("params")
        symbol = params.get("symbol") if isinstance(params, dict) else None
        if account is None or not isinstance(symbol, str):
            continue
        key = (account, symbol)
        if key in seen:
            other = seen[key]
            if not (doc.value("scheduling", "shareAccount") and other.value("scheduling", "shareAccount")):
                parsed.problem(
                    doc.loc("requirements", "account"),
                    f"{doc.label()}: account {account} already trades {symbol} in {_named(other, 'strategy')} "
                    f"({other.loc('requirements', 'account')}); set scheduling.shareAccount: true on both "
                    "if they may share it",
                )
            continue
        seen[key] = doc


def workdirs(parsed: ParsedFleet, docs: list[Document]) -> None:
    """Two workers must not share a workdir on one host. A Worker takes part when its host, port,
    user and workdir passed the schema."""
    seen: dict[tuple[str, int | None, str | None, str], Document] = {}
    for doc in docs:
        if not all(doc.usable(f) for f in ("host", "port", "user", "workdir")):
            continue
        workdir, host = doc.value("workdir"), doc.value("host")
        if workdir is None:
            continue
        key = (host, doc.value("port"), doc.value("user"), workdir.rstrip("/"))
        if key in seen:
            parsed.problem(doc.loc("workdir"), f"{doc.label()}: workdir {workdir} on host {host} is "
                           f"also used by {_named(seen[key], 'worker')}; give each worker its own workdir")
            continue
        seen[key] = doc


def _named(doc: Document, noun: str) -> str:
    """"strategy s1" in a message about another document; "another strategy" when its id is not a string."""
    written = doc.data.get("id")
    return f"{noun} {named_id(written)}" if isinstance(written, str) else f"another {noun}"
