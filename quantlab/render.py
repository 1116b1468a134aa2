"""Text for people: plans, status and events, with rich markup that plain output strips."""
from __future__ import annotations

from rich.markup import escape

from .plan import Action, Plan

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


def plan_summary(plan: Plan) -> str:
    counts = plan.counts()
    verbs = {"start": "to start", "restart": "to restart", "move": "to move", "stop": "to stop",
             "pause": "to pause", "resume": "to resume"}
    parts = [f"{counts[k]} {v}" for k, v in verbs.items() if counts[k]]
    extra = []
    if plan.queued:
        extra.append(f"{len(plan.queued)} queued")
    if plan.waiting:
        extra.append(f"{len(plan.waiting)} waiting")
    held = sum(len(b.actions) for b in plan.blocked)
    if held:
        extra.append(f"{held} blocked")
    head = "Plan: " + ", ".join(parts) + "." if parts else "No changes."
    return head + (" " + ", ".join(extra) + "." if extra else "")


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
    lines.append(f"[bold]{escape(plan_summary(plan))}[/]")
    return lines
