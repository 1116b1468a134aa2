"""One controller's side of the leadership (quantlab/app/leader.py) on a fake row and a fake clock, and
the lease rule's takeover term."""
from __future__ import annotations

from dataclasses import replace

from quantlab.edges.clock import Clock
from quantlab.app.leader import Leader
from quantlab.core.leadership import LeaseRow
from quantlab.core.spec.models import FleetSettings, MonitorSettings
from quantlab.edges.store import StateError


class FakeRow:
    """The leadership row with the compare-and-swaps of pgleader.Leadership; `down` fails every call."""

    def __init__(self, name: str, shared: dict):
        self.name, self.shared, self.down = name, shared, False

    def _check(self) -> None:
        if self.down:
            raise StateError("the database is away")

    def read(self) -> LeaseRow | None:
        self._check()
        return self.shared.get("row")

    def take(self, seen, term, duration_ms) -> bool:
        self._check()
        if self.shared.get("row") != seen:
            return False
        renewals = seen.renewals + 1 if seen else 0
        self.shared["row"] = LeaseRow(self.name, term, renewals, duration_ms)
        return True

    def renew(self, term) -> tuple[bool, bool]:
        self._check()
        row = self.shared.get("row")
        if row is None or (row.holder, row.term) != (self.name, term):
            return False, False
        self.shared["row"] = replace(row, renewals=row.renewals + 1)
        return True, self.shared.get("handover", False)

    def raise_term(self, term, new) -> bool:
        self._check()
        row = self.shared["row"]
        if (row.holder, row.term) != (self.name, term):
            return False
        self.shared["row"] = replace(row, term=new, renewals=row.renewals + 1)
        return True

    def step_down(self, term) -> bool:
        row = self.shared["row"]
        self.shared["row"] = replace(row, holder=None, renewals=row.renewals + 1)
        return True


def pair(now: list[int]) -> tuple[Leader, Leader, dict]:
    shared: dict = {}
    clock = Clock(wall=lambda: now[0], mono=lambda: now[0], boot_id="b")
    return (Leader(FakeRow("a", shared), clock, 3.0), Leader(FakeRow("b", shared), clock, 3.0), shared)


def test_a_standby_takes_over_only_after_a_whole_lease_unchanged_in_a_term_above_every_host():
    now = [1_000]
    a, b, shared = pair(now)
    a.watch()
    took = a.take(state_term=0, host_terms=[])
    assert took is not None and took.term == 1 and a.leading()
    b.watch()
    for _ in range(5):                                   # a renews every second: b never may
        now[0] += 1_000
        assert a.renew() is None and a.leading()
        assert not b.watch().may_take and b.take(0, []) is None
    now[0] += 2_999                                      # a stops renewing (it died)
    assert not b.watch().may_take
    now[0] += 1
    assert b.watch().may_take
    taken = b.take(state_term=4, host_terms=[2, 7])
    assert taken is not None and taken.term == 8 and b.term == 8
    assert "a (term 1) had not renewed for 3s" in taken.detail


def test_a_leader_is_deposed_by_its_own_clock_while_the_database_is_away_and_at_once_when_another_took_it():
    now = [1_000]
    a, b, shared = pair(now)
    a.watch()
    a.take(0, [])
    a.table.down = True
    now[0] += 1_500
    assert a.renew() is None and a.leading(), "a failed renewal changes nothing yet"
    now[0] += 500                                        # lease 3 s after the last send, minus the 1 s margin
    assert not a.leading() and a.current_term() is None and a.term == 1
    a.table.down = False
    assert a.renew() is None and a.leading(), "nobody took it: the row is still a's in term 1"
    shared["row"] = LeaseRow("b", 2, 9, 3000)
    change = a.renew()
    assert change is not None and change.kind == "deposed" and a.term is None and not a.leading()
    assert a.last_term == 1, "its commands still carry its last term, which the hosts then refuse"


def test_a_leader_goes_on_above_a_term_a_host_reported():
    now = [1_000]
    a, _, shared = pair(now)
    a.watch()
    a.take(0, [])
    assert a.raise_term([1]) is None
    change = a.raise_term([1, 6])
    assert change is not None and change.term == 7 and a.term == a.last_term == 7 and shared["row"].term == 7


def test_the_lease_rule_counts_a_takeover_when_controllers_may_stand_by():
    base = FleetSettings(reconcile_interval_s=1.0, probe_deadline_s=0.5,
                         monitor=MonitorSettings(lease_ttl_s=8.0, controller_restart_s=0.5))
    assert base.lease_rule_problem() is None
    # The default leadership lease (15 s, as Kubernetes) needs a longer strategy lease.
    problem = base.lease_rule_problem(standbys=True)
    assert problem is not None and "a takeover (reconcile.leaderLeaseSeconds + 2 s) (17 s)" in problem
    short = replace(base, leader_lease_s=3.0)
    assert short.lease_rule_problem() is None and short.lease_rule_problem(standbys=True) is None
    assert short.lease_floor_s(standbys=True) == 3.0 + 2.0 + 0.5 + 1.0 + 0.4
    too_short = replace(base, leader_lease_s=2.5)
    assert "shorter than two renewals of the lead" in (too_short.lease_rule_problem() or "")


def test_a_leader_that_stepped_down_leaves_the_lead_to_another_for_a_lease():
    now = [1_000]
    a, b, shared = pair(now)
    a.watch()
    a.take(0, [])
    assert a.step_down() is not None and shared["row"].holder is None
    a.watch()
    b.watch()
    assert a.take(0, []) is None, "not straight back"
    assert b.take(0, []) is not None
    b.step_down()
    now[0] += 3_000
    a.watch()
    assert a.take(0, []) is not None, "a lease later it may lead again"
