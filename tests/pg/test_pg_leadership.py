"""The leadership row in a real PostgreSQL server: taking and renewing it are compare-and-swaps,
so two controllers never both hold one term; a standby takes a row only as it last saw it."""
from __future__ import annotations

import pytest

from quantlab.core.leadership import Watch, may_take_over, next_term, observe
from quantlab.edges.pgleader import Leadership
from quantlab.edges.pgstate import PgState


def test_two_controllers_never_hold_one_term(pg_dsn):
    db = PgState(pg_dsn)
    db.migrate()
    a, b = Leadership(db, "ctl-a"), Leadership(db, "ctl-b")
    assert a.read() is None
    assert a.take(None, term=1, duration_ms=15_000)
    assert not b.take(None, term=1, duration_ms=15_000), "the row exists now: b saw it wrong"
    seen = b.read()
    assert (seen.holder, seen.term) == ("ctl-a", 1)
    assert a.renew(1)[0]
    assert not b.take(seen, term=2, duration_ms=15_000), "a renewed since b looked: b must look again"
    assert not b.renew(1)[0], "only the holder renews"


def test_a_standby_takes_over_a_row_that_stood_still_and_the_old_leader_is_refused(pg_dsn):
    db = PgState(pg_dsn)
    db.migrate()
    a, b = Leadership(db, "ctl-a"), Leadership(db, "ctl-b")
    a.take(None, term=1, duration_ms=15_000)
    watch = observe(Watch(), b.read(), now_ms=0)
    watch = observe(watch, b.read(), now_ms=15_000)          # a renewed nothing for a whole lease
    assert may_take_over(watch, 15_000)
    assert b.take(watch.row, term=next_term(watch.row.term, host_terms=[3]), duration_ms=15_000)
    assert (b.read().holder, b.read().term) == ("ctl-b", 4)
    assert not a.renew(1)[0], "the deposed leader's renewal is refused"
    assert b.step_down(4) and b.read().holder is None


def test_the_rows_age_is_the_databases_and_only_a_renewal_of_this_release_sets_it(pg_empty_dsn):
    """A standby started after the leader died reads how long the row has stood still (on the
    database's clock); a renewal by an earlier release (renewals bumped, nothing else) leaves no age."""
    import time

    db = PgState(pg_empty_dsn)
    db.migrate()
    db.migrate()                                             # twice: the added columns are there once
    a = Leadership(db, "ctl-a")
    assert a.take(None, term=1, duration_ms=1_000)
    assert a.read().age_ms is not None and a.read().age_ms < 1_000
    time.sleep(1.2)                                          # nobody renews for a whole lease
    fresh = observe(Watch(), Leadership(db, "ctl-b").read(), now_ms=0)
    assert fresh.row.age_ms >= 1_000 and may_take_over(fresh, 0), fresh
    assert a.renew(1)[0] and a.read().age_ms < 1_000
    with db.session() as conn:                               # an earlier release's renewal
        conn.execute("UPDATE quantlab_leader SET renewals = renewals + 1 WHERE id = 1")
    assert a.read().age_ms is None


def test_a_new_leader_ends_the_sessions_that_still_hold_the_state_locks(pg_dsn):
    from quantlab.edges.pgstate import PgStore
    from quantlab.edges.store import LockHeld

    frozen, new = PgStore(pg_dsn), PgStore(pg_dsn)
    with frozen.lock(command="quantlab reconcile (frozen)"):
        with pytest.raises(LockHeld):
            with new.lock(timeout=0.2):
                pass
        assert new.break_locks() == 1
        with new.lock(timeout=2.0, command="quantlab reconcile (new leader)"):
            assert new.holder()["command"] == "quantlab reconcile (new leader)"


def test_after_a_failed_connection_calls_fail_at_once_until_the_lead_renewal_gets_through(pg_dsn):
    import time

    from quantlab.edges import pgstate
    from quantlab.edges.store import StateError

    db = pgstate.PgState(pg_dsn)
    db.migrate()
    pgstate._UNREACHABLE[pg_dsn] = (time.monotonic() + 60, "cannot reach the state database (earlier)")
    began = time.monotonic()
    with pytest.raises(StateError, match="earlier"):
        db.load()
    assert time.monotonic() - began < 0.5, "no connect timeout waited on the renewal path"
    assert Leadership(db, "a").read() is None, "the lead's own calls still try, and close the breaker"
    assert db.load().serial == 0


def test_the_row_says_what_kind_of_controller_holds_it_and_an_earlier_releases_take_is_not_misread(pg_dsn):
    """A daemon's row reads as a daemon's whatever its label; when an earlier release (which writes
    no kind) takes the row in a new term, the kind left from the term before is not trusted."""
    db = PgState(pg_dsn)
    db.migrate()
    daemon = Leadership(db, "ctl-a", kind="daemon")
    assert daemon.take(None, term=1, duration_ms=15_000)
    assert daemon.read().kind == "daemon"
    assert daemon.raise_term(1, 5) and daemon.read().kind == "daemon", "a raised term keeps the kind"
    seen = daemon.read()
    with db.session() as conn:                              # an earlier release's `apply` takes it over
        conn.execute("UPDATE quantlab_leader SET holder = 'quantlab apply pid 9 on h', term = 6, "
                     "renewals = renewals + 1 WHERE id = 1 AND renewals = %s", (seen.renewals,))
    assert (daemon.read().holder, daemon.read().kind) == ("quantlab apply pid 9 on h", "run")
    run = Leadership(db, "reconcile pid 3 on h", kind="run")     # `reconcile --once`, by its label a daemon
    assert run.take(daemon.read(), term=7, duration_ms=15_000)
    assert run.read().kind == "run"
