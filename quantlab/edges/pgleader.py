"""The rows several controllers of one PostgreSQL state share besides the state: the leadership
row (who leads, in which term, of which kind) and the queue of plans an interactive `apply` hands
to the leading daemon. Every change is a compare-and-swap on what the caller last saw.
"""
from __future__ import annotations

import json
from typing import Any

from quantlab.core.leadership import LeaderKind, LeaseRow, leader_kind
from .pgstate import PgState

# --- the leadership row -------------------------------------------------------------------------------

# What every renewal of the row by this release sets beside `renewals + 1` (the old value in both).
_RENEWED = "renewed_at = now(), renewed_count = renewals + 1"


class Leadership:
    """The leadership row of one state (see leadership.py for who may take it and when): taking
    it and renewing it are compare-and-swaps on what the caller last saw, so two controllers can
    never both believe they took or renewed the same term."""

    def __init__(self, db: PgState, name: str, kind: LeaderKind = "run"):
        self.db, self.name, self.kind = db, name, kind

    def read(self) -> LeaseRow | None:
        with self.db.session(probe=True) as conn:
            row = conn.execute("SELECT holder, term, renewals, duration_ms, CASE WHEN renewed_count = renewals THEN "
                               "(extract(epoch FROM clock_timestamp() - renewed_at) * 1000)::bigint END, "
                               "CASE WHEN kind_term = term THEN holder_kind END "
                               "FROM quantlab_leader WHERE id = 1").fetchone()
        if row is None:
            return None
        return LeaseRow(row[0], int(row[1]), int(row[2]), int(row[3]), int(row[4]) if row[4] is not None else None,
                        leader_kind(row[0], row[5]))

    def describe(self) -> dict[str, Any] | None:
        """The row for people (`status`): who leads, in which term, since when (epoch ms)."""
        with self.db.session(probe=True) as conn:
            row = conn.execute("SELECT holder, term, (extract(epoch FROM since) * 1000)::bigint, handover, "
                               "duration_ms FROM quantlab_leader WHERE id = 1").fetchone()
        if row is None:
            return None
        return {"holder": row[0], "term": int(row[1]), "since": int(row[2]), "handover": bool(row[3]),
                "leaseSeconds": int(row[4]) / 1000}

    def take(self, seen: LeaseRow | None, term: int, duration_ms: int) -> bool:
        """Become the holder in `term`, if the row is still as `seen` (None: there was none)."""
        with self.db.session(probe=True) as conn:
            if seen is None:
                done = conn.execute("INSERT INTO quantlab_leader (id, holder, term, renewals, duration_ms, "
                                    "renewed_at, renewed_count, holder_kind, kind_term) VALUES "
                                    "(1, %s, %s, 0, %s, now(), 0, %s, %s) ON CONFLICT (id) DO NOTHING",
                                    (self.name, term, duration_ms, self.kind, term))
            else:
                done = conn.execute("UPDATE quantlab_leader SET holder = %s, term = %s, renewals = renewals + 1, "
                                    f"{_RENEWED}, duration_ms = %s, handover = false, since = now(), "
                                    "holder_kind = %s, kind_term = %s WHERE id = 1 AND term = %s "
                                    "AND renewals = %s AND holder IS NOT DISTINCT FROM %s",
                                    (self.name, term, duration_ms, self.kind, term, seen.term, seen.renewals,
                                     seen.holder))
            return done.rowcount == 1

    def renew(self, term: int) -> tuple[bool, bool]:
        """Renew the lead in `term`: (renewed, a hand-over was asked). Not renewed: another
        controller took it meanwhile."""
        with self.db.session(probe=True) as conn:
            row = conn.execute(f"UPDATE quantlab_leader SET renewals = renewals + 1, {_RENEWED} WHERE id = 1 AND "
                               "holder = %s AND term = %s RETURNING handover", (self.name, term)).fetchone()
        return (row is not None, bool(row and row[0]))

    def raise_term(self, term: int, new_term: int) -> bool:
        """Go on leading in a higher term (a host had seen one above ours: a restored database)."""
        with self.db.session(probe=True) as conn:
            done = conn.execute(f"UPDATE quantlab_leader SET term = %s, renewals = renewals + 1, {_RENEWED}, "
                                "kind_term = %s WHERE id = 1 AND holder = %s AND term = %s",
                                (new_term, new_term, self.name, term))
            return done.rowcount == 1

    def step_down(self, term: int) -> bool:
        """Give the lead up on purpose (an upgrade): the row is free at once for a standby."""
        with self.db.session(probe=True) as conn:
            done = conn.execute("UPDATE quantlab_leader SET holder = NULL, handover = false, renewals = renewals + 1 "
                                "WHERE id = 1 AND holder = %s AND term = %s", (self.name, term))
            return done.rowcount == 1

    def ask_handover(self) -> dict[str, Any] | None:
        """Ask whoever leads to step down after its current round (`quantlab leader step-down`):
        the row as it was, or None when nobody leads."""
        with self.db.session(probe=True) as conn:
            row = conn.execute("UPDATE quantlab_leader SET handover = true WHERE id = 1 AND holder IS NOT NULL "
                               "RETURNING holder, term").fetchone()
        return {"holder": row[0], "term": int(row[1])} if row else None


# --- plans handed to the leader by an interactive `apply` ---------------------------------------------

class PlanRequests:
    """The queue of confirmed plans that `apply` hands to the leading daemon. A request carries how
    long its sender waits (`waitSeconds`); the leader takes only requests still inside that time
    (judged on the database's clock, the one clock both sides share), so a plan whose `apply` gave
    up is never carried out later."""

    def __init__(self, db: PgState):
        self.db = db

    def submit(self, by: str, body: dict[str, Any]) -> int:
        with self.db.session() as conn:
            return int(conn.execute("INSERT INTO quantlab_requests (by, body) VALUES (%s, %s) RETURNING id",
                                    (by, json.dumps(body))).fetchone()[0])

    def take(self) -> tuple[int, str, dict[str, Any]] | None:
        """The oldest pending request still inside its sender's wait, marked taken (the ones past it
        marked expired); None when there is none. One at a time, just before it is carried out."""
        with self.db.session() as conn:
            conn.execute("UPDATE quantlab_requests SET status = 'expired', answered_at = now() WHERE status = 'pending' "
                         "AND created_at < now() - make_interval(secs => (body->>'waitSeconds')::float)")
            row = conn.execute("UPDATE quantlab_requests SET status = 'taken' WHERE id = (SELECT id FROM "
                               "quantlab_requests WHERE status = 'pending' ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED) "
                               "RETURNING id, by, body").fetchone()
        return (int(row[0]), str(row[1]), row[2]) if row else None

    def answer(self, request: int, answer: dict[str, Any]) -> None:
        with self.db.session() as conn:
            conn.execute("UPDATE quantlab_requests SET status = 'done', answer = %s, answered_at = now() WHERE id = %s",
                         (json.dumps(answer), request))

    def read(self, request: int) -> tuple[str, dict[str, Any] | None]:
        with self.db.session() as conn:
            row = conn.execute("SELECT status, answer FROM quantlab_requests WHERE id = %s", (request,)).fetchone()
        return (str(row[0]), row[1]) if row else ("gone", None)

    def withdraw(self, request: int) -> bool:
        """Take back a request nobody took yet: True when it will never be carried out."""
        with self.db.session() as conn:
            done = conn.execute("UPDATE quantlab_requests SET status = 'withdrawn', answered_at = now() WHERE id = %s "
                                "AND status = 'pending'", (request,))
            return done.rowcount == 1
