"""Leadership judged on each side's own monotonic clock (a fake one here), as client-go does."""
from __future__ import annotations

from quantlab.core.leadership import LeaseRow, Watch, inherited_leases_end_at, may_take_over, next_term, observe, still_leads

ROW = LeaseRow(holder="ctl-a", term=4, renewals=10, duration_ms=15_000)


def test_a_standby_takes_over_only_after_the_row_stood_still_for_a_whole_lease():
    watch = observe(Watch(), ROW, now_ms=1_000)
    assert not may_take_over(watch, 15_999)
    renewed = LeaseRow("ctl-a", 4, 11, 15_000)
    watch = observe(watch, renewed, now_ms=14_000)        # the leader renewed: the clock restarts
    assert not may_take_over(watch, 28_999)
    watch = observe(watch, renewed, now_ms=20_000)        # unchanged since 14 000
    assert may_take_over(watch, 29_000)


def test_a_free_row_may_be_taken_at_once():
    assert may_take_over(observe(Watch(), None, 5), 5)
    assert may_take_over(observe(Watch(), LeaseRow(None, 4, 0, 15_000), 5), 5)


def test_a_leader_counts_from_the_send_time_of_its_last_renewal_minus_a_margin():
    assert still_leads(last_renewal_sent_ms=10_000, now_ms=23_999, duration_ms=15_000)
    assert not still_leads(last_renewal_sent_ms=10_000, now_ms=24_000, duration_ms=15_000)
    assert not still_leads(None, 0, 15_000), "a leader that never renewed does not lead"


def test_a_new_term_is_above_the_row_and_every_host():
    assert next_term(4, []) == 5
    assert next_term(4, [2, 9, 7]) == 10, "a database restored from a backup cannot reuse a term the hosts saw"


def test_a_new_leader_counts_the_old_terms_leases_as_running_until_a_late_renewal_would_have_run_out():
    # A renewal sent just before the takeover: connected (10 s), probed (5 s), then a whole lease (25 s).
    assert inherited_leases_end_at(took_at_ms=50_000, lease_ttl_s=25, probe_deadline_s=5,
                                   connect_timeout_s=10) == 90_000


def test_a_row_that_stood_still_for_a_lease_on_the_databases_clock_may_be_taken_at_once():
    """Every controller restarted at once: the fresh standby need not watch for a whole lease of its own
    while the strategies' leases run out; the row's age on the database's clock says enough."""
    from quantlab.core.leadership import LeaseRow, Watch, may_take_over, observe
    fresh = observe(Watch(), LeaseRow("ctl-a", 3, 41, 15_000, age_ms=15_200), now_ms=0)
    assert may_take_over(fresh, 0)
    young = observe(Watch(), LeaseRow("ctl-a", 3, 41, 15_000, age_ms=9_000), now_ms=0)
    assert not may_take_over(young, 0)
    # The age grows between reads of the same row; the watch keeps its clock and takes the new age.
    later = observe(young, LeaseRow("ctl-a", 3, 41, 15_000, age_ms=15_000), now_ms=6_000)
    assert later.since_ms == 0 and may_take_over(later, 6_000)
    # A row renewed last by an earlier release has no age it can trust: a whole lease of watching.
    unknown = observe(Watch(), LeaseRow("ctl-a", 3, 41, 15_000, age_ms=None), now_ms=0)
    assert not may_take_over(unknown, 14_999) and may_take_over(unknown, 15_000)


def test_the_leaders_kind_is_what_it_recorded_and_an_earlier_releases_row_is_read_by_its_label():
    from quantlab.core.leadership import leader_kind

    assert leader_kind(None, "daemon") is None                                  # nobody leads
    assert leader_kind("quantlab apply pid 7 on h", "daemon") == "daemon"       # the record decides, not the label
    assert leader_kind("reconcile pid 7 on h", "run") == "run"                  # e.g. `reconcile --once`
    # A row an earlier release took records no kind (or one from a term before): its label says.
    assert leader_kind("reconcile pid 7 on h", None) == "daemon"
    assert leader_kind("quantlab apply pid 7 on h", None) == "run"
    assert leader_kind("reconcile pid 7 on h", "leader") == "daemon"           # not a kind: not trusted
