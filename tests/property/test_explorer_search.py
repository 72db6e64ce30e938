"""The explorer's search (:func:`fastdeploy_pd_fix.verify.explorer.explore`) against brute force: on small workloads
of both rank models, every interleaving enumerated one by one, without merging states, gives the same outcomes, the
same number of interleavings reaching each, and as witness the simplest of them (fewest switches, then
alphabetical)."""

from __future__ import annotations

from typing import Dict, List, Tuple

import pytest

from fastdeploy_pd_fix.engine_history.streams import with_notices
from fastdeploy_pd_fix.verify.explorer import explore, replay
from fastdeploy_pd_fix.verify.lifecycle import lifecycle_families
from fastdeploy_pd_fix.verify.lifecycle_rank import LifecycleRank
from fastdeploy_pd_fix.verify.race_rank import RaceRank
from fastdeploy_pd_fix.verify.workloads import DICT, FIFO, build_workloads, switches

#: Small enough to enumerate one interleaving at a time.
MAX_INTERLEAVINGS = 3000


def brute_force(model) -> Dict[tuple, Tuple[int, str]]:
    """Outcome -> (interleavings reaching it, the simplest of them), one interleaving at a time."""
    outcomes: Dict[tuple, List] = {}
    pending = [(model.start(), "")]
    while pending:
        state, trace = pending.pop()
        actors = model.enabled(state)
        if not actors:
            entry = outcomes.setdefault(model.outcome(state), [0, trace])
            entry[0] += 1
            entry[1] = min(entry[1], trace, key=lambda t: (switches(t), t))
        pending.extend((model.step(state, actor), trace + actor) for actor in actors)
    return {outcome: tuple(entry) for outcome, entry in outcomes.items()}


def searched(model) -> Dict[tuple, Tuple[int, str]]:
    exploration = explore(model)
    found = {(o.batches, o.drops, o.waits, o.findings): (o.weight, o.witness) for o in exploration.outcomes}
    assert exploration.interleavings == sum(weight for weight, _ in found.values())
    return found


def _small(workloads, size):
    return [workload for workload in workloads if size(workload) <= MAX_INTERLEAVINGS]


def race_cases():
    cases = []
    for family, workloads in build_workloads(quick=True):
        for workload in _small(workloads, lambda w: w.merges())[:4]:
            for mode in ("ordered", "upstream", "pr7872"):
                for slot_model in (FIFO, DICT):
                    cases.append(pytest.param(workload, mode, slot_model, id=f"{family}-{mode}-{slot_model}"))
    return cases


@pytest.mark.parametrize("workload, mode, slot_model", race_cases())
def test_race_search_agrees_with_brute_force(workload, mode, slot_model):
    model = RaceRank(workload, mode, slot_model)
    assert searched(model) == brute_force(model)


def lifecycle_cases():
    cases = []
    for family, workloads in lifecycle_families(quick=True):
        for workload in workloads[:2]:
            for mode, noticed in (("ordered", False), ("ordered", True), ("upstream", False)):
                chosen = with_notices(workload) if noticed else workload
                cases.append(pytest.param(chosen, mode, id=f"{family}-{mode}{'-notices' if noticed else ''}"))
    return cases


@pytest.mark.parametrize("workload, mode", lifecycle_cases())
def test_lifecycle_search_agrees_with_brute_force(workload, mode):
    model = LifecycleRank(workload, mode)
    brute = brute_force(model)
    if sum(weight for weight, _ in brute.values()) > 20 * MAX_INTERLEAVINGS:
        pytest.skip("too many interleavings to enumerate one by one")
    assert searched(model) == brute


def test_a_replayed_witness_ends_in_its_outcome():
    workload = next(w for _, workloads in lifecycle_families(quick=True) for w in workloads if len(w.occupancies) > 1)
    model = LifecycleRank(workload, "upstream")
    for outcome in explore(model).outcomes:
        state = model.start()
        for actor in outcome.witness:
            assert actor in model.enabled(state)
            state = model.step(state, actor)
        assert not model.enabled(state)
        assert model.outcome(state) == (outcome.batches, outcome.drops, outcome.waits, outcome.findings)
        assert len(replay(model, outcome.witness)) == len(outcome.witness)
