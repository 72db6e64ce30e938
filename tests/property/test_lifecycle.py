"""The slot lifecycle: aborts, repeated and late D-parts, requests that never register, the send thread as an actor.

The exhaustive families: ordered mode has no violation; without the engine's notices it releases by upstream's rule
(release rule 10), so its limits there are upstream's findings and invariant 7 holds everywhere; upstream's
send-time failures are found (they need the send thread as a third actor), and mutants of the ordered release (no
send-time binding; a timing-dependent release) are caught with notices. Then a hypothesis property over random
lifecycle histories, driven through random interleavings of the three actors, without the engine's notices (as
upstream) and with them (tests/property/test_lifecycle_notices.py has the notice families).
"""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastdeploy_pd_fix.engine_history.occupancy import IMMEDIATE, LATE, NEVER, NONE, NORMAL, Occupancy
from fastdeploy_pd_fix.engine_history.streams import LifecycleWorkload, build, with_notices
from fastdeploy_pd_fix.policy.release import OrderedRelease
from fastdeploy_pd_fix.verify import command, lifecycle_rank
from fastdeploy_pd_fix.verify.checks import (
    DEADLOCK,
    NOTICES_OFF_LIMIT,
    SEND_BINDING,
    SEND_EARLY,
    SEND_MISSING,
    STUCK,
    WORSE_THAN_UPSTREAM,
)
from fastdeploy_pd_fix.verify.lifecycle import lifecycle_families
from fastdeploy_pd_fix.verify.lifecycle_rank import LifecycleRank, explore_lifecycle_rank
from fastdeploy_pd_fix.verify.report import explore


@pytest.fixture(scope="module")
def lifecycle_report():
    return explore("ordered", quick=True, families=lifecycle_families(quick=True), compare="upstream", progress=False)


def _families(*names):
    return [(family, workloads) for family, workloads in lifecycle_families(quick=True) if family in names]


def test_ordered_has_no_lifecycle_violation_and_upstream_has_many(lifecycle_report):
    assert lifecycle_report.violations == 0 and lifecycle_report.notice_violations == 0
    assert {row.nranks for row in lifecycle_report.rows} == {2, 3}
    rows = {(row.family, row.nranks): row for row in lifecycle_report.rows}
    # Upstream's counts are printed beside; it fails in every lifecycle family that aborts.
    for family in ("abort-between-chunks", "abort-after-final-signal", "issue-ABCD", "abort-reuse+other-slot"):
        assert rows[(family, 2)].compared_violations > 0, family
        # Without notices ordered finds exactly what upstream finds (rule 10), as limits.
        row = rows[(family, 2)]
        assert row.limitations == row.compared_violations + row.compared_limitations, family
    for counterexample in lifecycle_report.counterexamples:
        assert counterexample.limit_reason == NOTICES_OFF_LIMIT and not counterexample.workload.notices


def test_limits_name_their_reason_and_strict_counts_them():
    families = _families("abort-before-signal", "orphan-alone+other-slot")
    report = explore("ordered", families=families, strict=True, progress=False)
    assert report.violations > 0 and report.limitations == 0
    lenient = explore("ordered", families=families, progress=False)
    assert lenient.violations == 0 and lenient.limitations == report.violations
    assert {c.limit_reason for c in lenient.counterexamples} == {NOTICES_OFF_LIMIT}
    # Upstream's own limits on the same families still name what the two streams cannot decide.
    reasons = {c.limit_reason for c in explore("upstream", families=families, progress=False).counterexamples}
    assert any("aborted before its first chunk" in (reason or "") for reason in reasons)


def test_upstream_sends_an_aborted_requests_batch_with_the_next_requests_registration():
    """Abort after the final chunk's signal, batch still queued or in the send thread when the slot's next request
    registers: only visible with the send thread as an actor of its own."""
    (family,) = _families("abort-after-final-signal")
    upstream = explore("upstream", families=[family], rank_counts=(2,), progress=False)
    kinds = {c.kind for c in upstream.counterexamples}
    assert {SEND_BINDING, SEND_MISSING} <= kinds or {SEND_EARLY, SEND_MISSING} <= kinds, kinds
    ordered = explore("ordered", families=[family], rank_counts=(2,), progress=False, notices="on")
    assert ordered.counterexamples == []


def test_the_issues_abort_then_reuse_case_finishes_every_later_request():
    """Issue 11: A (needs 4) aborted after its first chunk; B, C, D take the slot in turn."""
    occupancies = [
        Occupancy("A", 3, 0, (2, 4), aborted_after=1),
        Occupancy("B", 3, 0, (1,)),
        Occupancy("C", 3, 0, (2, 4)),
        Occupancy("D", 3, 0, (1,)),
    ]
    exploration = explore_lifecycle_rank(with_notices(build("issue", occupancies)), "ordered")
    assert len({(o.batches, o.drops, o.waits) for o in exploration.outcomes}) == 1
    (outcome,) = {(o.batches, o.waits, o.findings) for o in exploration.outcomes}
    batches, waits, findings = outcome
    assert findings == frozenset()
    assert [wait.request_id for wait in waits if wait.request_id] == ["B", "C", "D"]
    assert batches == (((3, 2),), ((3, 1),), ((3, 2),), ((3, 4),), ((3, 1),))


def test_never_worse_than_upstream(lifecycle_report):
    """Invariant 7 without limits: an orphan alone no longer holds the log without notices (rule 10)."""
    assert [c for c in lifecycle_report.counterexamples if c.kind == WORSE_THAN_UPSTREAM] == []
    orphan_alone = next(row for row in lifecycle_report.rows if row.family == "orphan-alone+other-slot")
    assert orphan_alone.limitations == orphan_alone.compared_limitations


def test_a_release_without_send_time_binding_is_caught(monkeypatch):
    """Non-vacuity of invariant 6: the ordered rules with the send thread reading the dict at send time."""

    class DictRead(OrderedRelease):
        def _release_ready_batches(self):
            released = super()._release_ready_batches()
            released.bindings.clear()
            return released

    monkeypatch.setattr(lifecycle_rank, "make_policy", lambda mode: DictRead())
    families = _families("abort-after-final-signal")
    report = explore("ordered", families=families, rank_counts=(2,), progress=False, notices="on")
    assert report.violations > 0
    assert {SEND_BINDING, SEND_EARLY, SEND_MISSING} & {c.kind for c in report.counterexamples}


def test_a_timing_dependent_release_diverges_in_the_lifecycle_families(monkeypatch):
    class NewestFirst(OrderedRelease):
        def _release_ready_batches(self):
            released = super()._release_ready_batches()
            released.batches.reverse()
            released.bindings.reverse()
            return released

    monkeypatch.setattr(lifecycle_rank, "make_policy", lambda mode: NewestFirst())
    report = explore("ordered", families=_families("normal-2slot"), rank_counts=(2,), progress=False, notices="on")
    assert DEADLOCK in {c.kind for c in report.counterexamples}


def test_verify_prints_both_modes_side_by_side(capsys, tmp_path):
    """Without and with notices and upstream, per lifecycle family; the JSON file carries all three."""
    out_path = tmp_path / "verify.json"
    assert command.main(["--quick", "--show", "1", "--json-out", str(out_path)]) == 0
    out = capsys.readouterr().out
    assert "upstream viol." in out and "abort-after-final-signal" in out and "orphan-alone+other-slot" in out
    assert "notices viol." in out and "notices limits" in out
    saved = json.loads(out_path.read_text())
    assert saved["notices"] == "both" and saved["notice_violations"] == saved["notice_limitations"] == 0
    lifecycle_rows = [row for row in saved["table"] if row["lifecycle"]]
    assert lifecycle_rows and all(row["notice_limitations"] == 0 for row in lifecycle_rows)
    assert sum(row["limitations"] for row in lifecycle_rows) > 0  # without notices, the limits stay


def test_verify_notices_on_leaves_out_the_runs_without(capsys):
    assert command.main(["--quick", "--notices", "on", "--compare", "none"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("abort-before-signal"))
    assert row.split()[6:10] == ["-", "-", "0", "0"]  # violations, limits (without notices); with notices


# --- Random lifecycle histories ---------------------------------------------------------------------------------

SHAPES = [(0, (4,)), (0, (2, 4)), (0, (1,)), (2, (4,)), (0, (1, 3)), (0, (2, 4, 6))]


@st.composite
def occupancy_strategy(draw, request_id: str, slot: int) -> Occupancy:
    start, ends = draw(st.sampled_from(SHAPES))
    registers = draw(st.integers(0, 4)) > 0
    aborted_after = draw(st.one_of(st.none(), st.integers(0, len(ends))))
    dpart = draw(st.sampled_from([NORMAL, NORMAL, LATE, NEVER])) if registers and aborted_after is not None else NORMAL
    repeat = draw(st.sampled_from([NONE, NONE, IMMEDIATE, LATE])) if registers and dpart == NORMAL else NONE
    if repeat == LATE and aborted_after is None:
        repeat = IMMEDIATE  # a late repeat of a completing request would land after the next one's registration
    return Occupancy(request_id, slot, start, ends, registers, aborted_after, dpart, repeat)


@st.composite
def lifecycle_workloads(draw) -> LifecycleWorkload:
    """A history of 1-4 occupancies on slot 0, and maybe one request on slot 1; its signals interleaved at random
    (also as joint signals); slot 1's cache info anywhere before the engine must wait for a slot-0 send (the
    engine puts cache info at admission, so nothing of another slot queues behind a request not yet admitted)."""
    names = iter("ABCDEFG")
    slot0 = [draw(occupancy_strategy(next(names), 0)) for _ in range(draw(st.integers(1, 4)))]
    other = [draw(occupancy_strategy(next(names), 1))] if draw(st.booleans()) else []
    if other and other[0].aborted_after is not None:
        other = [Occupancy(other[0].request_id, 1, other[0].start, other[0].ends)]
    plain = build("random", slot0 + other)
    counts = Counter(plain.tid_owner[tid] for tids in plain.signal_tids for tid in tids)
    count_0 = sum(n for owner, n in counts.items() if owner < len(slot0))
    count_1 = sum(counts.values()) - count_0
    steps = [0] * count_0 + [1] * count_1
    order = draw(st.permutations(steps))
    signal_slots, index = [], 0
    while index < len(order):  # merge a slot-0 step with a following slot-1 step into one signal, sometimes
        if index + 1 < len(order) and {order[index], order[index + 1]} == {0, 1} and draw(st.booleans()):
            signal_slots.append((0, 1))
            index += 2
        else:
            signal_slots.append(order[index])
            index += 1
    slot_0_events = [event for event in plain.cache if plain.occupancies[event[1]].slot == 0]
    gated = [
        position
        for position, (_, index) in enumerate(slot_0_events)
        if any(occupancy.transfers for occupancy in slot0[:index])
    ]
    first_gated = gated[0] if gated else len(slot_0_events)
    count_other = len(plain.cache) - len(slot_0_events)
    positions = sorted(draw(st.lists(st.integers(0, first_gated), min_size=count_other, max_size=count_other)))
    cache_slots = [0] * len(slot_0_events)
    for offset, position in enumerate(positions):
        cache_slots.insert(position + offset, 1)
    return build("random", slot0 + other, signal_slots, cache_slots)


def run_schedule(workload: LifecycleWorkload, seed: int, mode: str = "ordered"):
    """Drive one rank through a seeded random interleaving: at each step, one of the enabled actors."""
    chooser = random.Random(seed)
    model = LifecycleRank(workload, mode)
    rank = model.start()
    while True:
        actors = model.enabled(rank)
        if not actors:
            return rank, model.end_findings(rank)
        rank = model.step(rank, chooser.choice(actors))


@settings(max_examples=400, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(workload=lifecycle_workloads(), seeds=st.lists(st.integers(0, 2**32), min_size=6, max_size=6))
def test_random_lifecycle_histories_without_notices_run_as_upstream(workload, seeds):
    """Without the engine's notices, ordered hands over to upstream's rule at the first cache-info event (rule 10):
    on every interleaving it does exactly what upstream does. Before that event both release nothing; a history
    with no cache info at all (orphans only) leaves ordered holding the orphans' signals (nothing transfers)."""
    for seed in seeds + [0, 1]:
        ordered_rank, ordered_findings = run_schedule(workload, seed)
        upstream_rank, upstream_findings = run_schedule(workload, seed, mode="upstream")
        assert (ordered_rank.batches, ordered_rank.drops, ordered_rank.waits) == (
            upstream_rank.batches,
            upstream_rank.drops,
            upstream_rank.waits,
        )
        if workload.cache:
            assert ordered_findings == upstream_findings, workload.describe()
        else:
            assert {kind for kind, _ in ordered_findings - upstream_findings} <= {STUCK}


@settings(max_examples=250, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(workload=lifecycle_workloads(), seeds=st.lists(st.integers(0, 2**32), min_size=6, max_size=6))
def test_random_lifecycle_histories_with_notices_are_decided(workload, seeds):
    """With the engine's notices (and the fence), every random history is decided: identical outputs for any two
    interleavings, and no finding at all, ambiguity feature or not."""
    noticed = with_notices(workload)
    results = [run_schedule(noticed, seed) for seed in seeds + [0, 1]]
    first_rank, _ = results[0]
    for rank, findings in results:
        assert (rank.batches, rank.drops, rank.waits) == (first_rank.batches, first_rank.drops, first_rank.waits)
        assert not findings, (noticed.describe(), sorted(findings))
