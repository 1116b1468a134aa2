"""Text for people: plans, status and events, with rich markup that plain output strips.

Much of what is shown comes from a host, a strategy (its lastError, its events) or a person (a
suspend --reason): such text never reaches the terminal as control characters (an escape sequence
could rewrite the screen, the title or the clipboard), and a value stays on its line. `escape`
below does both for every value put into markup here; `terminal_safe` is for whole lines printed
elsewhere."""
from __future__ import annotations

import re
from typing import Any

from rich.markup import escape as _markup_escape

from quantlab.edges.follow import Source
from quantlab.core.plan import Action, Plan

# C0 controls but tab and newline, DEL, C1 controls (0x9b is CSI to some terminals), the
# bidirectional overrides that reorder what is shown, and lone surrogates (which cannot be printed).
_UNSAFE = r"\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\ud800-\udfff"
_UNSAFE_IN_TEXT = re.compile(f"[{_UNSAFE}]")
_UNSAFE_IN_LINE = re.compile(f"[{_UNSAFE}\\n]")
_NAMED = {"\n": "\\n", "\r": "\\r"}


def _visible(match: re.Match) -> str:
    ch = match.group()
    return _NAMED.get(ch) or (f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}")


def terminal_safe(text: str) -> str:
    """`text` with every control character (but newline and tab) shown as an escape, e.g. ESC as
    \\x1b, so that printing it cannot drive the terminal."""
    return _UNSAFE_IN_TEXT.sub(_visible, text)


def one_line(text: Any) -> str:
    """Any value as text on one line, terminal-safe: newlines too are shown as \\n."""
    return _UNSAFE_IN_LINE.sub(_visible, text if isinstance(text, str) else str(text))


def escape(text: Any) -> str:
    """A value as markup that prints as itself, on one line and terminal-safe (see one_line)."""
    return _markup_escape(one_line(text))


SYMBOLS = {
    "start": ("+", "green"),
    "stop": ("-", "red"),
    "restart": ("~", "yellow"),
    "move": ("→", "cyan"),
    "pause": ("‖", "magenta"),
    "resume": ("▸", "green"),
}


def _col(text: str, width: int) -> str:
    return escape(text.ljust(width))


def action_line(a: Action, width: int = 16) -> str:
    symbol, color = SYMBOLS[a.action]
    where = f"{a.source} → {a.target}" if a.action == "move" else (
        f"→ {a.worker}" if a.action == "start" else f"  {a.worker}")
    return (f"  [{color}]{symbol} {a.action.ljust(7)}[/] [bold]{_col(a.strategy, width)}[/] "
            f"{_col(where, 24)} [dim]{escape(a.reason)}[/]")


def plan_lines(plan: Plan, header: str | None = None) -> list[str]:
    """The plan as Terraform-like lines: one per action with its reason, then what cannot happen yet."""
    names = [a.strategy for a in plan.actions] + [q.strategy for q in plan.queued] + \
            [w.strategy for w in plan.waiting]
    width = max([16] + [len(n) + 1 for n in names])
    lines: list[str] = []
    if header:
        lines += [header, ""]
    for a in plan.adopt:
        lines.append(f"  [blue]= adopt  [/] [bold]{_col(a.strategy, width)}[/] {_col('  ' + a.worker, 24)} "
                     f"[dim]running copy (epoch {a.epoch}) the state file did not know[/]")
    lines += [action_line(a, width) for a in plan.actions]
    for w in plan.waiting:
        lines.append(f"  [yellow]… wait   [/] [bold]{_col(w.strategy, width)}[/] {_col('  ' + w.worker, 24)} "
                     f"[dim]{escape(w.reason)}[/]")
    if plan.queued or plan.blocked or plan.notes:
        lines.append("")
    for q in plan.queued:
        lines.append(f"  [red]queued   [/] [bold]{_col(q.strategy, width)}[/] {escape(q.reason)}")
    for b in plan.blocked:
        lines.append(f"  [red bold]blocked  [/] {escape(b.guard)}: {escape(b.reason)}")
        lines += ["    " + action_line(a, width).lstrip() for a in b.actions]
    for n in plan.notes:
        where = f" on {n.worker}" if n.worker else ""
        lines.append(f"  [yellow]note     [/] [bold]{_col(n.strategy, width)}[/]{escape(where)}: {escape(n.note)}")
    if lines and lines[-1] != "":
        lines.append("")
    lines.append(f"[bold]{escape(plan.summary())}[/]")
    return lines


# --- status --------------------------------------------------------------------------------------

def _age(ms: int | None) -> str:
    from quantlab.core.health import format_duration
    return "—" if ms is None else format_duration(ms / 1000)


CLOCK_SKEW_NOTE_MS = 2000


def _worker_note(w: dict) -> str:
    if w["error"]:
        return w["error"][:100]
    if w.get("diskLow"):
        return f"disk full ({w.get('diskFreeMb')} MB free): no new copy starts here"
    skew = w.get("clockSkewMs")
    if skew is not None and abs(skew) > CLOCK_SKEW_NOTE_MS:
        return f"host clock {'ahead' if skew > 0 else 'behind'} by {abs(skew) / 1000:.1f}s (leases are not affected)"
    return ""


def status_tables(report: dict, now_ms: int) -> list:
    from rich.table import Table

    colors = {"idle": "green", "busy": "green", "unreachable": "yellow", "offline": "red",
              "running": "green", "paused": "magenta", "pending": "yellow", "queued": "yellow",
              "error": "red", "stopped": "dim"}
    workers = Table(title="Workers", title_justify="left", expand=False)
    for name in ("WORKER", "HOST", "REGION", "STATUS", "STRATEGIES", "CPU", "FREE MEM", "LAST SEEN", "CONTAINMENT",
                 "NOTE"):
        workers.add_column(name)
    for w in report["workers"]:
        flags = " cordoned" if w["cordoned"] else ""
        flags += " draining" if w["drain"] else ""
        seen = "now" if w["status"] in ("idle", "busy") else (
            _age(now_ms - w["lastSeen"]) + " ago" if w["lastSeen"] else "never")
        workers.add_row(
            escape(w["id"]), escape(w["host"]), escape(w["region"] or "—"),
            f"[{colors.get(w['status'], 'white')}]{w['status']}[/]{flags}",
            f"{len(w['runningStrategies'])}/{w['maxStrategies']}",
            "—" if w["cpu"] is None else f"{w['cpu']:.2f}",
            "—" if w["memory"] is None else f"{w['memory']} MB", seen, escape(w.get("containment") or "—"),
            escape(_worker_note(w)))
    strategies = Table(title="Strategies", title_justify="left", expand=False)
    for name in ("STRATEGY", "STATUS", "WORKER", "HEARTBEAT", "ERRORS", "RESTARTS", "REVISION", "LEASE", "NOTE"):
        strategies.add_column(name)
    for s in report["strategies"]:
        status = s["status"] + ("" if s["healthy"] or s["status"] in ("stopped",) else " (unhealthy)")
        revision = escape(s["revision"] or "—")
        if not s["upToDate"] and s["desiredSpecHash"]:
            revision += " [yellow](changed)[/]"
        lease = "—" if s["leaseLeftSeconds"] is None else _age(s["leaseLeftSeconds"] * 1000)
        note = one_line("; ".join(s.get("problems") or ()) or s["lastError"] or s["reason"] or s.get("note") or "")
        strategies.add_row(
            escape(s["id"]), f"[{colors.get(s['status'], 'white')}]{status}[/]", escape(s["workerId"] or "—"),
            _age(s["heartbeatAgeMs"]), "—" if s["errorCount"] is None else str(s["errorCount"]),
            str(s["restarts"] or 0), revision, lease, escape(note[:80]))
    held = [_suspension_line(t, h) for t, h in report.get("suspended", {}).items()]
    loop = report.get("loop") or {}
    source = Source.from_key(loop)
    synced = []
    if source is not None:
        at = _epoch_ms(loop.get("at"))
        since = f" since {_age(now_ms - at)} ago" if at else ""
        synced.append(f"Reconcile loop applies {escape(source.words())}; last synced revision "
                      f"{escape(str(loop.get('revision') or '—'))}{since}")
    return [*held, *synced, workers, strategies]


def _epoch_ms(value: Any) -> float | None:
    """A time in epoch ms as the state file holds it, or None when it holds anything else there (a
    hand edit, another release): text, NaN, or a number no clock reaches."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if abs(value) < 1e15 else None


def _suspension_line(target: str, hold: dict) -> str:
    what = "everything" if target == "*" else escape(target)
    who = f" by {escape(str(hold.get('by')))}{': ' + escape(str(hold['reason'])) if hold.get('reason') else ''}"
    if hold.get("stopAll"):
        return (f"[red bold]Stopped by stop-all:[/] {what}{who} — every strategy was stopped and no lease is "
                "renewed; `quantlab resume` brings them back")
    return (f"[yellow bold]Suspended:[/] {what}{who} — nothing starts, stops or moves there until "
            "`quantlab resume`; leases are renewed")


# --- events --------------------------------------------------------------------------------------

def parse_since(text: str, now_ms: int) -> int:
    """'90s', '10m', '2h', '3d' ago, or an ISO 8601 time."""
    import datetime
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    # ASCII digits only: str.isdigit() also takes '²', which float() does not.
    if text and text[-1] in units and text[:-1].isascii() and text[:-1].replace(".", "", 1).isdigit():
        # Further back than the epoch is "everything" (and 10^400 days is a float infinity, no int).
        return now_ms - int(min(float(text[:-1]) * units[text[-1]] * 1000, now_ms))
    try:
        moment = datetime.datetime.fromisoformat(text)
        if moment.tzinfo is None:
            moment = moment.astimezone()
        return int(moment.timestamp() * 1000)
    except (ValueError, OverflowError, OSError):      # also a time this machine cannot place (year 1)
        raise ValueError(f"--since {text!r}: use a duration like 10m, 2h, 3d or an ISO time") from None


def event_line(e: dict) -> str:
    """One event on one line. Any field may hold any type (EventLog.read skips lines whose names and
    time are odd, but hosts report events too): each is shown as text, never raises."""
    import datetime
    try:
        when = datetime.datetime.fromtimestamp(e.get("t", 0) / 1000).strftime("%Y-%m-%d %H:%M:%S")
    except (TypeError, ValueError, OverflowError, OSError):
        when = "????-??-?? ??:??:??"
    what = e.get("event") or "?"
    where = e.get("worker") or (f"{e.get('from')} → {e.get('to')}" if e.get("to") else "")
    outcome = e.get("outcome")
    mark = "" if outcome is None else (" [green]ok[/]" if outcome == "ok" else " [red]failed[/]")
    why = e.get("error") or e.get("detail") or e.get("reason") or e.get("message") or ""
    if e.get("kind"):           # a notification: what kind it was, then its text
        why = f"{e['kind']}: {why}"
    rev = f" @{e['revision']}" if e.get("revision") else ""
    return (f"{when}  {escape(what):<13} {escape(str(e.get('strategy') or '')):<18} {escape(str(where)):<24}"
            f"{mark} [dim]{escape(e.get('actor') or '')}{escape(rev)}[/] {escape(why)}")


# --- explain -------------------------------------------------------------------------------------

def explain_lines(report: dict) -> list[str]:
    """`quantlab explain`: the outcome, then one line per worker, feasible ones by rank first."""
    lines = [f"{escape(report['strategy'])} ({escape(report['policy'])}): {escape(report['outcome'])}", ""]
    rows = sorted(report["workers"], key=lambda w: (w["rank"] is None, w["rank"] or 0, w["worker"]))
    for w in rows:
        if w["feasible"]:
            lines.append(f"  [green]fits   [/] {escape(w['worker']):<20} rank {w['rank']}")
            continue
        refused = "; ".join(r["filter"] + (f" ({r['detail']})" if r["detail"] else "") for r in w["refusedBy"])
        lines.append(f"  [red]refused[/] {escape(w['worker']):<20} {escape(refused)} — fits if "
                     f"{escape('; and '.join(w['wouldFitIf']))}")
    if not rows:
        lines.append("  no workers in the fleet")
    return lines


def leader_line(row: dict[str, Any] | None, now_wall: int) -> str:
    """Who leads a PostgreSQL state's daemons, for people."""
    if row is None or row.get("holder") is None:
        return "Leader: nobody leads (no reconcile daemon holds the lead)"
    since = max(0, now_wall - int(row["since"])) // 1000
    asked = "; asked to step down" if row.get("handover") else ""
    return f"Leader: {row['holder']}, term {row['term']}, since {since} s ago{asked}"
