"""Property tests of ``OrderedRelease`` on longer random histories than the explorer enumerates.

A workload is drawn like the engine would produce it (requests with slots, slot reuse, chunk splits, several tasks
per signal, a lockstep registration order); each rank then sees its own random merge of the two streams. The
release must give every rank the same batches and drops, release every task exactly once when every request
registers, never release a task before its request registered, and reject malformed values with ``ValueError``
without touching its state.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from typing import List, Tuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from fastdeploy_pd_fix.engine_history.occupancy import Occupancy, prefill_request
from fastdeploy_pd_fix.engine_history.schedules import runnable_requests, same_slot_predecessors
from fastdeploy_pd_fix.engine_history.streams import Workload, schedule_signals
from fastdeploy_pd_fix.policy.release import OrderedRelease, Registration
from fastdeploy_pd_fix.verify.workloads import REGISTRATION_EVENT, SIGNAL_EVENT, drive

# Deterministic for CI: the same examples on every run.
PROPERTY_SETTINGS = settings(max_examples=60, deadline=None, derandomize=True)
NUM_SLOTS = 3  # few slots, so that requests often reuse one


@st.composite
def requests_strategy(draw, allow_ghosts: bool) -> List[Occupancy]:
    requests = []
    for index in range(draw(st.integers(1, 6))):
        chunk_count = draw(st.integers(1, 3))
        boundaries = draw(st.lists(st.integers(1, 16), min_size=chunk_count, max_size=chunk_count, unique=True))
        registers = draw(st.integers(0, 3)) > 0 if allow_ghosts else True  # a ghost in about one request of four
        requests.append(
            prefill_request(f"r{index}", draw(st.integers(0, NUM_SLOTS - 1)), tuple(sorted(boundaries)), registers)
        )
    return requests


@st.composite
def engine_schedule(draw, requests: List[Occupancy]):
    """Signals as the engine emits them: each step runs the next chunk of a subset of the runnable requests."""
    predecessors = same_slot_predecessors(requests)
    progress = [0] * len(requests)
    schedule = []
    while not all(progress[i] == len(request.ends) for i, request in enumerate(requests)):
        runnable = runnable_requests(requests, progress, predecessors)
        step = sorted(draw(st.sets(st.sampled_from(runnable), min_size=1)), key=lambda i: requests[i].slot)
        schedule.append([(i, progress[i]) for i in step])
        for i in step:
            progress[i] += 1
    return schedule_signals(requests, schedule)


@st.composite
def registration_order(draw, requests: List[Occupancy]) -> Tuple[Registration, ...]:
    """A lockstep registration order: any interleaving that keeps same-slot requests in request order."""
    remaining = [r for r in requests if r.registers]
    order = []
    while remaining:
        available = [r for r in remaining if not any(o.slot == r.slot for o in remaining[: remaining.index(r)])]
        chosen = draw(st.sampled_from(available))
        remaining.remove(chosen)
        order.append(chosen.registration())
    return tuple(order)


@st.composite
def workloads(draw, allow_ghosts: bool = False) -> Workload:
    requests = draw(requests_strategy(allow_ghosts))
    signals, origins = draw(engine_schedule(requests))
    return Workload(tuple(requests), tuple(signals), tuple(origins), draw(registration_order(requests)))


@st.composite
def noisy_workloads(draw, allow_ghosts: bool = True) -> Workload:
    """Workloads with duplicated (stale) signals replayed later in the stream, and by default ghosts."""
    workload = draw(workloads(allow_ghosts))
    signals, origins = list(workload.signals), list(workload.origins)
    for _ in range(draw(st.integers(0, 3))):
        if not signals:
            break
        source = draw(st.integers(0, len(signals) - 1))
        target = draw(st.integers(source + 1, len(signals)))
        signals.insert(target, signals[source])
        origins.insert(target, tuple(f"stale:{origin}" for origin in origins[source]))
    return Workload(workload.requests, tuple(signals), tuple(origins), workload.registrations)


def as_batches(signals) -> Tuple:
    """Signals ``(slot, chunk_offset, prefilled_token_num)`` as the batches they become: ``(slot, n)`` pairs."""
    return tuple(tuple((slot, end) for slot, _, end in signal) for signal in signals)


def merges_of(workload: Workload, count: int):
    """``count`` random merges of the two streams, plus the two extremes (signals first, registrations first)."""
    events = [SIGNAL_EVENT] * len(workload.signals) + [REGISTRATION_EVENT] * len(workload.registrations)
    extremes = st.just(sorted(events, reverse=True)) | st.just(sorted(events))
    return st.lists(st.permutations(events) | extremes, min_size=count, max_size=count)


@dataclass
class RankResult:
    batches: Tuple
    drops: Tuple
    waiting: Tuple
    open_registrations: dict
    fed_at_release: Tuple[frozenset, ...]  # request ids registered when each batch was released


def run_rank(workload: Workload, merge, registrations=None) -> RankResult:
    """Drive a fresh OrderedRelease through one merge.

    Checks on the way that no task is released unless a registration of its slot was fed and is still open (its
    final chunk not yet released): the registrations of a slot are consumed in order, one per final chunk.
    """
    if registrations is not None:
        workload = replace(workload, registrations=registrations)
    release = OrderedRelease()
    fed = set()
    batches, drops, fed_at_release = [], [], []
    for step in drive(release, workload, merge):
        if step.event == REGISTRATION_EVENT:
            fed.add(workload.registrations[step.index].request_id)
        for batch, owners in zip(step.released.batches, step.owners):
            for (slot, prefilled_token_num), owner in zip(batch, owners):
                assert owner is not None, f"({slot},{prefilled_token_num}) released with no registration"
            fed_at_release.append(frozenset(fed))
        batches.extend(step.released.batches)
        drops.extend((drop.slot, drop.prefilled_token_num) for drop in step.released.drops)
    return RankResult(
        tuple(batches),
        tuple(drops),
        tuple(release.waiting_signals()),
        release.open_registrations(),
        tuple(fed_at_release),
    )


@PROPERTY_SETTINGS
@given(st.data())
def test_every_task_released_exactly_once_in_signal_order_when_all_register(data):
    workload = data.draw(workloads())
    for merge in data.draw(merges_of(workload, 8)):
        result = run_rank(workload, merge)
        # One batch per signal, in signal order, with all its tasks: the same on every rank, nothing lost or doubled.
        assert result.batches == as_batches(workload.signals)
        assert result.drops == () and result.waiting == () and result.open_registrations == {}
        # Never before registration: each batch went out after every request it carries had registered.
        for origins, fed in zip(workload.origins, result.fed_at_release):
            assert set(origins) <= fed


@PROPERTY_SETTINGS
@given(st.data())
def test_ranks_agree_with_ghosts_and_stale_signals(data):
    workload = data.draw(noisy_workloads())
    results = [run_rank(workload, merge) for merge in data.draw(merges_of(workload, 8))]
    first = results[0]
    for result in results[1:]:
        assert (result.batches, result.drops, result.waiting) == (first.batches, first.drops, first.waiting)
    # Accounting, exactly once: every delivered task is released, dropped or still waiting. ``waiting_signals()``
    # lists the oldest signal's still unbound tasks only, so the remainder must be the head's already bound tasks.
    delivered = Counter(task for signal in as_batches(workload.signals) for task in signal)
    released = Counter(task for batch in first.batches for task in batch)
    waiting = Counter(task for signal in as_batches(first.waiting) for task in signal)
    accounted = released + Counter(first.drops) + waiting
    assert not accounted - delivered  # nothing released or dropped twice, nothing invented
    bound_head = delivered - accounted
    if first.waiting:
        head = as_batches(workload.signals)[len(workload.signals) - len(first.waiting)]
        assert not bound_head - Counter(head)
    else:
        assert not bound_head


@PROPERTY_SETTINGS
@given(st.data())
def test_only_the_per_slot_registration_order_matters(data):
    """Beyond the lockstep assumption: ranks that register different slots in different orders still agree."""
    workload = data.draw(workloads())
    other_order = data.draw(registration_order(list(workload.requests)))
    merges = data.draw(merges_of(workload, 4))
    for merge in merges:
        assert (
            run_rank(workload, merge).batches
            == run_rank(workload, merge, other_order).batches
            == as_batches(workload.signals)
        )


MALFORMED_TASKS = st.sampled_from(
    [
        (-1, 0, 4),
        (0, 0, -4),
        (0, -1, 4),
        (True, 0, 4),
        (0, 0, False),
        (0, False, 4),
        (1.0, 0, 4),
        (0, 0, 4.0),
        ("0", 0, 4),
        (0, None, 4),
        (0, 4, 4),  # an empty chunk
        (0, 4, 1),  # a chunk ending before it starts
        (0, 4),  # a pair: the chunk offset is missing
        (0, 0, 4, 1),
        (0,),
    ]
)


@PROPERTY_SETTINGS
@given(st.data())
def test_malformed_signal_raises_value_error_and_leaves_the_state_alone(data):
    workload = data.draw(workloads())
    (merge,) = data.draw(merges_of(workload, 1))
    injection_point = data.draw(st.integers(0, len(merge)))
    clean = run_rank(workload, merge)

    release = OrderedRelease()
    next_signal = next_registration = 0
    batches = []
    for position in range(len(merge) + 1):
        if position == injection_point:
            before = (release.waiting_signals(), release.open_registrations())
            valid_prefix = list(workload.signals[0][:1]) if workload.signals else []
            tasks = valid_prefix + [data.draw(MALFORMED_TASKS)]  # a valid task must not slip in either
            with pytest.raises(ValueError):
                release.add_signal(tasks)
            assert (release.waiting_signals(), release.open_registrations()) == before
        if position == len(merge):
            break
        if merge[position] == "S":
            batches.extend(release.add_signal(workload.signals[next_signal]).batches)
            next_signal += 1
        else:
            batches.extend(release.add_registration(workload.registrations[next_registration]).batches)
            next_registration += 1
    assert tuple(batches) == clean.batches


@pytest.mark.parametrize("slot, need", [(-1, 4), (0, 0), (0, -4), (True, 4), (0, 4.0), ("0", 4), (None, 4)], ids=repr)
def test_malformed_registration_is_rejected(slot, need):
    with pytest.raises(ValueError):
        Registration(slot, "r", need)


class RanksMachine(RuleBasedStateMachine):
    """Three ranks consume one workload at independent paces; at any moment their outputs are prefix-consistent.

    Prefix consistency is the online form of invariant 1: the send threads can always catch up with each other, so
    no barrier ever waits for a round another rank will not take.
    """

    NRANKS = 3

    @initialize(workload=st.one_of(workloads(), noisy_workloads(allow_ghosts=False), noisy_workloads()))
    def start(self, workload):
        self.workload = workload
        self.ranks = [OrderedRelease() for _ in range(self.NRANKS)]
        self.positions = [[0, 0] for _ in range(self.NRANKS)]  # signals, registrations delivered
        self.batches = [[] for _ in range(self.NRANKS)]
        self.drops = [[] for _ in range(self.NRANKS)]

    def _collect(self, rank, released):
        self.batches[rank].extend(released.batches)
        self.drops[rank].extend((d.slot, d.prefilled_token_num) for d in released.drops)

    @rule(rank=st.integers(0, NRANKS - 1))
    def deliver_signal(self, rank):
        index = self.positions[rank][0]
        if index < len(self.workload.signals):
            self.positions[rank][0] += 1
            self._collect(rank, self.ranks[rank].add_signal(self.workload.signals[index]))
        else:  # this rank's signal stream is exhausted: deliver its next registration instead (no wasted step)
            self.deliver_registration(rank)

    @rule(rank=st.integers(0, NRANKS - 1))
    def deliver_registration(self, rank):
        index = self.positions[rank][1]
        if index < len(self.workload.registrations):
            self.positions[rank][1] += 1
            self._collect(rank, self.ranks[rank].add_registration(self.workload.registrations[index]))
        elif self.positions[rank][0] < len(self.workload.signals):
            self.deliver_signal(rank)

    @rule(rank=st.integers(0, NRANKS - 1), task=MALFORMED_TASKS)
    def deliver_malformed(self, rank, task):
        before = (self.ranks[rank].waiting_signals(), self.ranks[rank].open_registrations())
        with pytest.raises(ValueError):
            self.ranks[rank].add_signal([task])
        assert (self.ranks[rank].waiting_signals(), self.ranks[rank].open_registrations()) == before

    @invariant()
    def outputs_are_prefix_consistent(self):
        if not hasattr(self, "workload"):
            return
        for sequences in (self.batches, self.drops):
            longest = max(sequences, key=len)
            for sequence in sequences:
                assert longest[: len(sequence)] == sequence

    def teardown(self):
        if not hasattr(self, "workload"):
            return
        for rank in range(self.NRANKS):  # deliver the rest: every rank must end with the same output
            while self.positions[rank][0] < len(self.workload.signals):
                self.deliver_signal(rank)
            while self.positions[rank][1] < len(self.workload.registrations):
                self.deliver_registration(rank)
        assert all(batches == self.batches[0] for batches in self.batches)
        assert all(drops == self.drops[0] for drops in self.drops)


TestRanksMachine = RanksMachine.TestCase
TestRanksMachine.settings = settings(
    max_examples=40,
    stateful_step_count=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
