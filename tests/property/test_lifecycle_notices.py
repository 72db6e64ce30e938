"""The slot lifecycle with the engine's notices (release rules 8 and 9): what the two streams cannot decide, decided.

With the engine-side patch on, the cache-info stream carries ``ABORT`` and ``ORPHAN`` notices and the engine fences
every abort. The shipped ordered release then has no violation and no limit in any lifecycle family; each of the
design doc's smallest undecidable workloads (section 4) is decided with them (without them ordered releases by
upstream's rule, rule 10, and finds what upstream finds); and the
fence is necessary: without its gate, notices leave exactly the divergences of the design doc's "b+c+d unfenced"
column, all in workloads with an abort before the first signal or a next request starting at the aborted end.
"""

from __future__ import annotations

import pytest

from fastdeploy_pd_fix.engine_history.occupancy import (
    ABORT_BEFORE_SIGNAL_REUSE,
    ABORTED_NEVER_REGISTERED,
    LATE,
    LATE_FIRST_DPART,
    NEVER,
    NEXT_STARTS_AT_ABORTED_END,
    ORPHAN_ALONE,
    ORPHAN_SIGNALS,
    Occupancy,
)
from fastdeploy_pd_fix.engine_history.streams import build, with_notices
from fastdeploy_pd_fix.verify.checks import NOTICES_OFF_LIMIT, check_config, cross_rank_divergences
from fastdeploy_pd_fix.verify.explorer import replay
from fastdeploy_pd_fix.verify.lifecycle import lifecycle_families
from fastdeploy_pd_fix.verify.lifecycle_rank import LifecycleRank, explore_lifecycle_rank
from fastdeploy_pd_fix.verify.report import NOTICES_BOTH, explore

#: Design doc section 4: the smallest counterexample of each feature the two streams cannot decide.
SMALLEST_LIMITS = {
    ABORT_BEFORE_SIGNAL_REUSE: [Occupancy("A", 0, 0, (4,), aborted_after=0), Occupancy("B", 0, 0, (4,))],
    NEXT_STARTS_AT_ABORTED_END: [Occupancy("A", 0, 0, (2, 4), aborted_after=1), Occupancy("B", 0, 2, (4,))],
    ORPHAN_SIGNALS: [Occupancy("O", 0, 0, (4,), registers=False), Occupancy("B", 0, 0, (4,))],
    ORPHAN_ALONE: [Occupancy("O", 0, 0, (4,), registers=False), Occupancy("A", 1, 0, (4,))],
    LATE_FIRST_DPART: [Occupancy("A", 0, 0, (2, 4), aborted_after=1, dpart=LATE), Occupancy("B", 0, 0, (4,))],
    ABORTED_NEVER_REGISTERED: [Occupancy("A", 0, 0, (4,), aborted_after=1, dpart=NEVER), Occupancy("B", 0, 0, (4,))],
}

#: The design doc's column "b+c+d: notices, unfenced" (section 3), for the single-slot families: workloads with a
#: violation when the notices are there but the fence gate is not.
UNFENCED_VIOLATIONS = {
    "normal-reuse": 0,
    "abort-before-signal": 8,
    "abort-between-chunks": 1,
    "abort-after-final-signal": 0,
    "repeat-dpart": 0,
    "late-dpart-after-abort": 6,
    "dpart-never-abort": 0,
    "orphan-reuse": 0,
    "issue-ABCD": 1,
    "orphan-between": 0,
}


@pytest.fixture(scope="module")
def notices_report():
    families = lifecycle_families(quick=True)
    return explore("ordered", families=families, compare="upstream", notices=NOTICES_BOTH, progress=False)


def test_with_notices_ordered_has_no_violation_and_no_limit_in_any_family(notices_report):
    assert notices_report.violations == 0
    assert notices_report.notice_violations == 0 and notices_report.notice_limitations == 0
    for row in notices_report.rows:
        assert (row.notice_violations, row.notice_limitations) == (0, 0), row.family
    assert not [c for c in notices_report.counterexamples if c.workload.notices]
    # Without notices the same families keep their limits (the rows show both); upstream is counted beside.
    limited = {row.family for row in notices_report.rows if row.limitations}
    assert {"abort-before-signal", "orphan-reuse", "late-dpart-after-abort", "orphan-alone+other-slot"} <= limited
    assert all(row.without_notices and row.compared_violations is not None for row in notices_report.rows)


@pytest.mark.parametrize("feature", sorted(SMALLEST_LIMITS))
def test_each_smallest_limit_is_decided_with_notices(feature):
    workload = build(feature, SMALLEST_LIMITS[feature])
    assert workload.features == {feature}
    # Without notices ordered releases by upstream's rule (rule 10): upstream's findings, as limits, never more.
    without = explore("ordered", families=[(feature, [workload])], notices="off", compare="upstream", progress=False)
    assert without.violations == 0
    assert all(c.limit_reason == NOTICES_OFF_LIMIT for c in without.counterexamples)
    assert all(row.limitations == row.compared_violations + row.compared_limitations for row in without.rows)
    noticed = with_notices(workload)
    assert noticed.limit_reason() is None  # with notices, a finding would be a violation
    report = explore("ordered", families=[(feature, [workload])], notices="on", progress=False)
    assert report.counterexamples == [] and report.notice_violations == report.notice_limitations == 0
    exploration = explore_lifecycle_rank(noticed, "ordered")
    assert len({(o.batches, o.drops, o.waits) for o in exploration.outcomes}) == 1
    assert all(not outcome.findings for outcome in exploration.outcomes)


def test_the_notices_sit_where_the_engine_puts_them():
    """ABORT after the occupancy's parts put before the abort (a late D-part after it), ORPHAN at admission; an
    ORPHAN whose admission waits for a send is not put ahead of another slot's independent parts."""
    aborted_late = [Occupancy("A", 0, 0, (2, 4), aborted_after=1, dpart=LATE), Occupancy("B", 0, 0, (4,))]
    assert with_notices(build("t", aborted_late)).describe().endswith("C: P(A) ABORT(A,2) P(B) D(B) D(A)")
    orphan_aborted = [Occupancy("O", 0, 0, (2, 4), registers=False, aborted_after=1), Occupancy("B", 0, 0, (4,))]
    assert with_notices(build("t", orphan_aborted)).describe().endswith("C: ORPHAN(O,4) ABORT(O,2) P(B) D(B)")
    other = Occupancy("C", 1, 0, (4,))
    after_send = [Occupancy("A", 0, 0, (4,)), Occupancy("O", 0, 0, (4,), registers=False), Occupancy("B", 0, 0, (1,))]
    workload = build("t", after_send + [other], cache_slots=[0, 0, 1, 1, 0, 0], notices=True)
    assert workload.describe().endswith("C: P(A) D(A) P(C) D(C) ORPHAN(O,4) P(B) D(B)")
    after_abort = [Occupancy("A", 0, 0, (4,), aborted_after=0), Occupancy("B", 0, 0, (1,))]
    workload = build("t", after_abort + [other], cache_slots=[0, 0, 1, 1, 0, 0], notices=True)
    assert workload.describe().endswith("C: P(A) D(A) ABORT(A,None) P(C) D(C) P(B) D(B)")


def test_the_fence_is_necessary():
    """Without the fence gate, a rank may read the next request's signal before the ABORT: the design doc's
    "b+c+d unfenced" column comes back, and only in workloads with a feature that needs the fence."""
    single_slot = [
        (name, workloads) for name, workloads in lifecycle_families(quick=True) if name in UNFENCED_VIOLATIONS
    ]
    found = {}
    for family, workloads in single_slot:
        found[family] = 0
        for workload in map(with_notices, workloads):
            fenced = explore_lifecycle_rank(workload, "ordered")
            assert not cross_rank_divergences(fenced.outcomes), workload.describe()
            unfenced = explore_lifecycle_rank(workload, "ordered", fence=False)
            result = check_config(workload, "ordered", unfenced.outcomes, unfenced.interleavings, 2)
            if result.counterexamples:
                found[family] += 1
                assert workload.features & {ABORT_BEFORE_SIGNAL_REUSE, NEXT_STARTS_AT_ABORTED_END}
                assert cross_rank_divergences(unfenced.outcomes), workload.describe()  # the ranks diverge
    assert found == UNFENCED_VIOLATIONS


def test_a_drop_and_a_release_of_the_same_content_in_one_call_are_told_apart():
    """D's registration releases D's signal, drops the dead B's (0,0-4) and releases C's (0,0-4) in one call: the
    explorer must attribute the batch to C's signal (the policy numbers it) and the drop to B's, not the reverse."""
    occupancies = [
        Occupancy("B", 0, 0, (4,), aborted_after=1, dpart=NEVER),
        Occupancy("C", 0, 0, (4,)),
        Occupancy("D", 1, 0, (4,)),
    ]
    workload = with_notices(build("t", occupancies, signal_slots=[1, 0, 0], cache_slots=[0, 0, 0, 1, 1]))
    assert workload.describe().endswith("C: P(B) ABORT(B,4) P(C) D(C) P(D) D(D)")
    exploration = explore_lifecycle_rank(workload, "ordered")
    assert [outcome.findings for outcome in exploration.outcomes] == [frozenset()]
    steps = replay(LifecycleRank(workload, "ordered"), "SSCCSCCCCXYXY")
    assert steps[8].endswith("batch [(1, 4)]; batch [(0, 4)]; drop (0, 4)"), steps[8]
