"""The interleaving explorer finds the known deadlocks (s1, s2, s3) and none for the ordered release.

Each counterexample is checked for its shape, not just counted, and the barrier check is itself tested against a
hand-made mismatched wait sequence and against real ``threading.Barrier`` objects, so that it cannot pass vacuously.
"""

from __future__ import annotations

import json
import threading
from collections import Counter

import pytest

from fastdeploy_pd_fix.engine_history.streams import LifecycleWorkload
from fastdeploy_pd_fix.policy.release import OrderedRelease
from fastdeploy_pd_fix.verify import command, race_rank
from fastdeploy_pd_fix.verify.barriers import BEGIN, FINISH, Wait, simulate_barriers
from fastdeploy_pd_fix.verify.checks import (
    DEADLOCK,
    FINISHED_MISMATCH,
    NOTICES_OFF_LIMIT,
    SHAPE_COLLAPSED,
    SHAPE_MERGED,
    SHAPE_REORDERED,
    Outcome,
    cross_rank_divergences,
)
from fastdeploy_pd_fix.verify.report import explore
from fastdeploy_pd_fix.verify.workloads import build_workloads

GHOST_FAMILIES = {"ghost-reused", "ghost-alone", "ghost-3req"}


@pytest.fixture(scope="module")
def ordered_report():
    return explore("ordered", quick=False, progress=False)


@pytest.fixture(scope="module")
def upstream_report():
    return explore("upstream", quick=True, progress=False)


@pytest.fixture(scope="module")
def pr7872_report():
    return explore("pr7872", quick=True, progress=False)


def _find(report, kind, shape, lifecycle=False):
    matches = [
        c
        for c in report.counterexamples
        if c.kind == kind and c.shape == shape and isinstance(c.workload, LifecycleWorkload) == lifecycle
    ]
    assert (
        matches
    ), f"{report.mode}: no {kind}/{shape} counterexample among {[(c.kind, c.shape) for c in report.counterexamples]}"
    return matches[0]


def _tasks(batches):
    return Counter(task for batch in batches for task in batch)


def test_ordered_has_no_violation_on_the_default_configs(ordered_report):
    assert ordered_report.violations == 0
    assert [c for c in ordered_report.counterexamples if not c.limitation] == []
    # Rank invariance in its strongest form: one outcome per workload, whatever the merge, wherever the engine
    # announces its notices (a classic workload with a ghost is the notices-off case: upstream's rule, rule 10).
    for row in ordered_report.rows:
        if not row.lifecycle and row.family not in GHOST_FAMILIES:
            assert row.outcomes == row.configs, row
    # The limits are upstream's findings where notices are off: ghost workloads and lifecycle ones without notices.
    assert {row.family for row in ordered_report.rows if row.limitations and not row.lifecycle} <= GHOST_FAMILIES
    for counterexample in ordered_report.counterexamples:
        assert not counterexample.workload.announced, counterexample.workload.describe()
        assert counterexample.limit_reason == NOTICES_OFF_LIMIT
    # Coverage that the issue asks for: 2 and 3 ranks, up to 4 requests, chunking, slot reuse, ghosts.
    assert {row.nranks for row in ordered_report.rows} == {2, 3}
    assert {"2req-reuse", "3req-reuse", "ghost-reused", "ghost-alone"} <= {row.family for row in ordered_report.rows}
    assert ordered_report.interleavings > 10**8


def test_pr7872_finds_s1(pr7872_report):
    s1 = _find(pr7872_report, DEADLOCK, SHAPE_MERGED)
    assert s1.scenario == "s1"
    assert s1.nranks == 2 and len(s1.workload.requests) == 2  # the seed: two single-chunk requests, one signal
    split, merged = sorted(s1.rank_outcomes, key=lambda outcome: len(outcome.batches), reverse=True)
    big = [batch for batch in merged.batches if len(batch) >= 2]
    assert big, merged.batches
    assert all(len(batch) == 1 for batch in split.batches)
    assert _tasks(merged.batches) == _tasks(split.batches)  # same tasks, different granularity
    assert s1.barrier_run.deadlocked
    assert {blocked["barrier"] for blocked in s1.barrier_run.blocked} == {BEGIN, FINISH}


def test_upstream_finds_s2(upstream_report):
    s2 = _find(upstream_report, DEADLOCK, SHAPE_COLLAPSED)
    assert s2.scenario == "s2"
    (request,) = s2.workload.requests  # smallest config: one chunked request
    assert len(request.ends) == 2
    full, collapsed = sorted(s2.rank_outcomes, key=lambda outcome: -len(outcome.batches))
    assert full.batches == (((request.slot, request.ends[0]),), ((request.slot, request.need),))
    assert collapsed.batches == (((request.slot, request.need),),)  # the first chunk vanished in the pending buffer
    # On the collapsing rank both chunk signals beat the registration.
    assert collapsed.witness == "SSR"
    assert s2.barrier_run.deadlocked


def test_upstream_finds_s3(upstream_report):
    s3 = _find(upstream_report, DEADLOCK, SHAPE_REORDERED)
    assert s3.scenario == "s3"
    requests = s3.workload.requests
    assert len(requests) == 2 and sorted(len(r.ends) for r in requests) == [1, 2]
    first, second = s3.rank_outcomes
    assert first.batches != second.batches
    assert Counter(first.batches) == Counter(second.batches)  # the same batches, recovered in different orders
    assert [w.barrier for w in first.waits] != [w.barrier for w in second.waits]
    assert s3.barrier_run.deadlocked
    # Without a chunked request, a different order "only" makes get_finished_req report the wrong request.
    mismatch = _find(upstream_report, FINISHED_MISMATCH, SHAPE_REORDERED)
    assert mismatch.barrier_run.mismatched_round is not None and not mismatch.barrier_run.deadlocked


def test_upstream_and_pr7872_fail_the_exit_code_and_export_json(tmp_path, capsys):
    path = tmp_path / "cx.json"
    assert command.main(["--mode", "upstream", "--quick", "--json-out", str(path)]) == 1
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    summary = json.loads(last_line)
    assert summary["mode"] == "upstream" and summary["violations"] > 0 and summary["configs"] > 0
    exported = json.loads(path.read_text())
    assert exported["summary"] == summary
    scenarios = {c["scenario"] for c in exported["counterexamples"] if c["kind"] == DEADLOCK}
    assert {"s2", "s3"} <= scenarios
    s2 = next(
        c
        for c in exported["counterexamples"]
        if c["kind"] == DEADLOCK and c["scenario"] == "s2" and "requests" in c["config"]  # a classic workload
    )
    assert s2["barriers"]["deadlocked"] and len(s2["ranks"]) == s2["nranks"]
    assert [step["event"] for step in s2["ranks"][1]["events"]] == ["signal", "signal", "registration"]


def test_ordered_cli_exits_zero_with_a_json_last_line(capsys):
    assert command.main(["--quick"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary == {
        "mode": "ordered",
        "configs": summary["configs"],
        "interleavings": summary["interleavings"],
        "violations": 0,
    }


def test_strict_counts_the_notices_off_limits_as_upstreams_findings(capsys):
    """A ghost is a request the engine did not announce: ordered then releases by upstream's rule (rule 10), so with
    --strict it has exactly upstream's counterexample kinds there, each named with that reason."""
    families = [(f, w) for f, w in build_workloads(quick=True) if f == "ghost-alone"]
    ordered = explore("ordered", families=families, strict=True, progress=False)
    upstream = explore("upstream", families=families, strict=True, progress=False)
    assert ordered.violations == upstream.violations > 0
    assert {(c.kind, c.shape) for c in ordered.counterexamples} == {
        (c.kind, c.shape) for c in upstream.counterexamples
    }
    assert {c.limit_reason for c in ordered.counterexamples} == {NOTICES_OFF_LIMIT}


# --- The barrier check itself -----------------------------------------------------------------------------------


def _real_barriers(wait_sequences, timeout=0.3):
    """Run the waits on real threading.Barrier objects; return (deadlocked, finished ids per rank)."""
    nranks = len(wait_sequences)
    barriers = {BEGIN: threading.Barrier(nranks), FINISH: threading.Barrier(nranks)}
    broken = [False] * nranks
    finished = [[] for _ in range(nranks)]

    def rank(index):
        for wait in wait_sequences[index]:
            try:
                barriers[wait.barrier].wait(timeout)
            except threading.BrokenBarrierError:
                broken[index] = True
                return
            if wait.barrier == FINISH:
                finished[index].append(wait.request_id)

    threads = [threading.Thread(target=rank, args=(index,)) for index in range(nranks)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5)
    for barrier in barriers.values():
        barrier.abort()
    return any(broken), finished


begin, finish_a, finish_b = Wait(BEGIN), Wait(FINISH, "A"), Wait(FINISH, "B")
BARRIER_CASES = [
    ([[begin, finish_a], [begin, finish_a]], False),
    ([[begin, finish_a, begin, finish_b]] * 3, False),
    ([[begin, finish_a, finish_b], [begin, finish_a, begin, finish_b]], True),  # s1: merged vs split
    ([[begin, begin, finish_a], [begin, finish_a]], True),  # s2: one batch fewer
    ([[begin, finish_b, begin, begin, finish_a], [begin, begin, finish_a, begin, finish_b]], True),  # s3
    ([[begin, finish_a], [begin, finish_a], [begin, finish_a, begin]], True),  # one rank has one wait more
]


@pytest.mark.parametrize("sequences, deadlocks", BARRIER_CASES)
def test_simulated_barriers_agree_with_real_threading_barriers(sequences, deadlocks):
    simulated = simulate_barriers(sequences)
    assert simulated.deadlocked == deadlocks
    real_deadlock, _ = _real_barriers(sequences)
    assert real_deadlock == deadlocks
    if deadlocks:
        assert simulated.blocked and any(b["barrier"] is not None for b in simulated.blocked)


def test_finished_ids_must_agree_per_round():
    run = simulate_barriers([[begin, finish_a, begin, finish_b], [begin, finish_b, begin, finish_a]])
    assert not run.deadlocked and run.mismatched_round == 1
    assert run.rounds[1] == (FINISH, ("A", "B"))


def test_cross_rank_check_flags_hand_made_mismatched_outcomes():
    """Feed the checker two made-up rank outcomes whose waits do not match: it must report a deadlock."""
    merged = Outcome(
        batches=(((0, 4), (1, 4)),),
        drops=(),
        waits=(begin, finish_a, finish_b),
        findings=frozenset(),
        weight=1,
        witness="RRS",
    )
    split = Outcome(
        batches=(((0, 4),), ((1, 4),)),
        drops=(),
        waits=(begin, finish_a, begin, finish_b),
        findings=frozenset(),
        weight=1,
        witness="RSR",
    )
    found = cross_rank_divergences([merged, split])
    assert set(found) == {(DEADLOCK, SHAPE_MERGED)}
    assert cross_rank_divergences([merged, merged]) == {}


def test_a_timing_dependent_mutant_of_ordered_is_caught(monkeypatch):
    """Non-vacuity end to end: release two ready signals newest first, and the explorer must see ranks diverge."""

    class NewestFirst(OrderedRelease):
        def _release_ready_batches(self):
            released = super()._release_ready_batches()
            released.batches.reverse()
            return released

    monkeypatch.setattr(race_rank, "make_policy", lambda mode: NewestFirst())
    families = [(f, w) for f, w in build_workloads(quick=True) if f in ("1req", "2req")]
    report = explore("ordered", families=families, progress=False)
    assert report.violations > 0
    deadlock = _find(report, DEADLOCK, SHAPE_REORDERED)
    assert deadlock.barrier_run.deadlocked
