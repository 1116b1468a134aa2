"""Who leads, judged as Kubernetes' client-go leader election judges it: each side on its own
monotonic clock, never on the other's or on a wall clock. Pure: the lease row comes in as data,
the time as an argument.

- A standby takes over only after it has seen the lease row unchanged for the full lease duration
  (a renewing leader changes the row every round, so an unchanged row means nobody renews) — or
  once the row's age on the database's clock (the one clock every controller shares) is the full
  lease: a standby that has just started (every controller was restarted at once) then need not
  watch the row for a whole lease of its own while the strategies' leases run out.
- A leader considers itself deposed at the lease duration after the *send* time of its last
  successful renewal, minus a margin (its renewal may have reached the database late, and clocks
  run at slightly different rates).
- The row says what kind of controller holds it: a reconcile daemon (which carries out the plans an
  interactive `apply` hands to it) or a run that leads for its duration (`apply`, `reconcile
  --once`), which an `apply` waits for instead.
- Each term is a fencing token: a new term is above the row's and above every term a host has
  reported, so a database restored from a backup cannot hand out a term the hosts already refuse.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from .spec.models import LEADER_DEPOSE_MARGIN_S

# A leader gives up this much before its lease could have run out on the database's side.
DEPOSE_MARGIN_MS = int(LEADER_DEPOSE_MARGIN_S * 1000)


LeaderKind = Literal["daemon", "run"]
LEADER_KINDS: tuple[LeaderKind, ...] = get_args(LeaderKind)


def leader_kind(holder: str | None, recorded: str | None) -> LeaderKind | None:
    """What holds the row (None: nobody). As its holder recorded it; a row taken by an earlier
    release records no kind, and its holder's label tells it (its daemons were "reconcile pid …")."""
    if holder is None:
        return None
    for kind in LEADER_KINDS:
        if recorded == kind:
            return kind
    return "daemon" if holder.startswith("reconcile ") else "run"


@dataclass(frozen=True)
class LeaseRow:
    """The leadership row as read: who holds it, in which term, and a counter its holder bumps
    with every renewal (so that an unchanged row is one nobody renewed)."""

    holder: str | None
    term: int
    renewals: int
    duration_ms: int
    # Since the last renewal, on the database's clock, when a renewal of this release set it (None:
    # unknown). Not part of what "unchanged" means: it grows between two reads of the same row.
    age_ms: int | None = field(default=None, compare=False)
    # Who holds it: see leader_kind (it changes only with the holder).
    kind: LeaderKind | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Watch:
    """A standby's memory of the row: the row as last seen, and since when (its monotonic ms) it
    has been that way."""

    row: LeaseRow | None = None
    since_ms: int | None = None


def observe(watch: Watch, row: LeaseRow | None, now_ms: int) -> Watch:
    """The watch after reading `row` at `now_ms`: the clock restarts whenever the row changed."""
    if watch.row != row or watch.since_ms is None:
        return Watch(row, now_ms)
    return Watch(row, watch.since_ms)          # unchanged, with its age as read now


def may_take_over(watch: Watch, now_ms: int) -> bool:
    """Whether a standby may take the lead now: nobody holds the row, or it has stayed unchanged
    for the full lease duration on this standby's clock, or (as last read) on the database's."""
    row = watch.row
    if row is None or row.holder is None:
        return True
    if row.age_ms is not None and row.age_ms >= row.duration_ms:
        return True
    return watch.since_ms is not None and now_ms - watch.since_ms >= row.duration_ms


def still_leads(last_renewal_sent_ms: int | None, now_ms: int, duration_ms: int,
                margin_ms: int = DEPOSE_MARGIN_MS) -> bool:
    """Whether a leader may still act: its last successful renewal was sent less than the lease
    duration (minus a margin) ago, on its own clock."""
    return last_renewal_sent_ms is not None and now_ms < last_renewal_sent_ms + duration_ms - margin_ms


def next_term(row_term: int, host_terms: list[int]) -> int:
    """The term a new leader takes: above the row's and above every term any host has reported."""
    return max([row_term] + host_terms) + 1


def inherited_leases_end_at(took_at_ms: int, lease_ttl_s: float, probe_deadline_s: float,
                            connect_timeout_s: float) -> int:
    """The takeover rule, the one place it is written: until when (the new leader's clock) every
    strategy lease the previous term may have granted counts as running on every worker it knew.
    Its leader sent nothing more once this term was taken (its row stood still for a lease, see
    may_take_over), but a renewal sent just before may have reached its host up to a connect
    timeout and a probe deadline later, granting a whole lease from there. The lease book adds each
    strategy's stop timeout and the failover margin before anything starts elsewhere
    (health.lease_surely_expired_at)."""
    return took_at_ms + int((lease_ttl_s + probe_deadline_s + connect_timeout_s) * 1000)
