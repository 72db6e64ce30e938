"""What the explorer checks: per-rank findings, cross-rank comparisons of outcomes, and counterexamples.

The invariants of ``docs/protocol.md``:

1. every rank releases the same sequence of batches (and drops the same tasks);
2. every layer-0 task is released exactly once or dropped, and nothing is released before its registration;
3. progress: when every signalled request registers, every task is released or dropped;
4. the barrier waits the batches cause never block on ``threading.Barrier(nranks)``, and the request ids finished per
   round agree (``get_finished_req`` reports rank 0's).

Released and dropped tasks are attributed to the signal that produced them by (slot, token number), earliest
unmatched first (see :mod:`.search`).
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Set, Tuple

from fastdeploy_pd_fix.engine_history.streams import Workload
from fastdeploy_pd_fix.policy.release import Batch, Registration, SignalTask, Task
from fastdeploy_pd_fix.verify.barriers import BarrierRun, Wait, simulate_barriers
from fastdeploy_pd_fix.verify.workloads import FIFO, switches

# Finding kinds. Per rank (one merge): LOST, UNRELEASED, EARLY, MISBOUND, DROPPED_VALID, PHANTOM, CRASH.
# Across ranks: DIVERGENT_BATCHES, DIVERGENT_DROPS, DEADLOCK, FINISHED_MISMATCH.
LOST = "lost"  # (2) a task vanished: neither released nor dropped, and the policy no longer holds it
UNRELEASED = "unreleased"  # (3) every request registered, yet the policy still holds a task at the end
EARLY = "early"  # (2) a task released before its own request registered on this rank
MISBOUND = "misbound"  # a task released while its slot's registration belongs to another (registered) request
DROPPED_VALID = "dropped-valid"  # (2) a valid task of a registered request was dropped
PHANTOM = "phantom"  # a released or dropped task that no signal delivered
CRASH = "crash"  # the policy raised on valid input
DIVERGENT_BATCHES = "divergent-batches"  # (1)
DIVERGENT_DROPS = "divergent-drops"  # (2) same decision on every rank
DEADLOCK = "deadlock"  # (4)
FINISHED_MISMATCH = "finished-mismatch"  # (4) get_finished_req would report a request another rank has not sent

# Slot-lifecycle findings (:mod:`.lifecycle_rank`, where the send thread is an actor of its own).
SEND_BINDING = "send-binding"  # (6) a task sent with another request's registration
SEND_EARLY = "send-early"  # (6) ... whose request had not computed that chunk yet: its blocks sent before they exist
SEND_MISSING = "send-missing"  # the slot had no registration at send time
LIVENESS = "liveness"  # (5) a request that registers and completes is never sent completely or never finished
HANG = "hang"  # (5) the engine can never free a slot: its later requests never appear
STUCK = "stuck"  # (5) a signal held at the head of the log for ever (it blocks every later signal)
DROPPED_LIVE = "dropped-live"  # (5) a task of a request that registers and completes was dropped
WORSE_THAN_UPSTREAM = "worse-than-upstream"  # (7) a class of failure upstream never shows on this configuration
#: Invariant 7 compares modes per class of failure: liveness (5 and 1-4) and safety (6 and 2).
FAILURE_CLASSES = {
    "liveness": frozenset(
        {DEADLOCK, FINISHED_MISMATCH, DIVERGENT_BATCHES, DIVERGENT_DROPS, LOST, UNRELEASED, DROPPED_VALID, LIVENESS}
        | {HANG, STUCK, DROPPED_LIVE, "stall", "ghost-dropped-valid"}
    ),
    "safety": frozenset({EARLY, MISBOUND, PHANTOM, CRASH, SEND_BINDING, SEND_EARLY, SEND_MISSING, "ghost-bound"}),
}

# Known, documented limitations (counted as violations only with --strict). They can only occur in workloads with
# a request that never registers ("ghost"): release.py's rule 5 makes the oldest signal wait for an occupant of its
# slot, and rules 3 and 6 judge a ghost's task against the slot's next registration.
STALL = "stall"  # a registered request's task waits forever behind a ghost's signal
GHOST_BOUND = "ghost-bound"  # a ghost's task was released as the chunk of the slot's next request
GHOST_DROPPED_VALID = "ghost-dropped-valid"  # a registered request's task dropped after a ghost's task took its place
LIMITATIONS = {
    STALL: "a registered request's task waits forever behind a request that never registers (ordered, rule 5: the "
    "oldest signal waits for an occupant of its slot, so a ghost whose slot is never reused blocks every signal "
    "behind it on every rank alike; no rank-invariant timeout exists)",
    GHOST_BOUND: "a never-registering request's task is released as a chunk of the next request registered in its "
    "slot (ordered, rule 3, on every rank alike); when its token number equals that request's need, that "
    "request is reported finished on the ghost's signal and its own final signal then waits (stall)",
    GHOST_DROPPED_VALID: "after a ghost's task took its place, a registered request's task that fits no open "
    "occupant is dropped (ordered, rule 6)",
}

#: Why a finding of ``ordered`` on a workload whose cache info does not start with the engine's announcement is a
#: limit: ordered then releases by upstream's rule (release rule 10), so it finds what upstream finds, never more.
NOTICES_OFF_LIMIT = (
    "engine notices off: an orphan cannot be told from a late registration alike on every rank, so ordered releases "
    "by upstream's rule from the first cache-info read on (release rule 10) and shows upstream's findings here"
)

SHAPE_MERGED = "merged-vs-split"  # s1: one rank put tasks in one batch that another rank split into several
SHAPE_COLLAPSED = "collapsed-chunks"  # s2: one rank released fewer tasks (pending kept only the latest chunk)
SHAPE_REORDERED = "reordered"  # s3: same batches, different order
SCENARIO_OF_SHAPE = {SHAPE_MERGED: "s1", SHAPE_COLLAPSED: "s2", SHAPE_REORDERED: "s3"}
# The most telling cross-rank kind names a counterexample; reports list kinds in this order.
CROSS_RANK_PRIORITY = (DEADLOCK, FINISHED_MISMATCH, DIVERGENT_BATCHES, DIVERGENT_DROPS)
KIND_ORDER = (DEADLOCK, FINISHED_MISMATCH, LOST, UNRELEASED, EARLY, MISBOUND, DROPPED_VALID, DIVERGENT_BATCHES)
KIND_ORDER += (DIVERGENT_DROPS, PHANTOM, CRASH, STALL, GHOST_BOUND, GHOST_DROPPED_VALID, SEND_EARLY, SEND_BINDING)
KIND_ORDER += (SEND_MISSING, LIVENESS, HANG, STUCK, DROPPED_LIVE, WORSE_THAN_UPSTREAM)

Finding = Tuple[str, str]  # (kind, detail)
#: Per slot, the delivered tasks not yet released or dropped: (prefilled_token_num, origin request id, signal index).
Unmatched = Mapping[int, Tuple[Tuple[int, str, int], ...]]


# ---------------------------------------------------------------------------------------------------------------
# Per rank.


def release_finding(
    slot: int,
    prefilled_token_num: int,
    origin: Optional[str],
    owner: Optional[Registration],
    workload: Workload,
    fed: frozenset,
) -> Optional[Finding]:
    """What is wrong, if anything, with releasing a task of ``origin`` while its slot's registration is ``owner``."""
    task = f"task ({slot},{prefilled_token_num})"
    if origin is None:
        return (PHANTOM, f"{task} released but never signalled (or released twice)")
    if owner is None:
        return (EARLY, f"{task} of {origin} released while slot {slot} had no registration")
    if origin not in workload.registering_ids:
        return (GHOST_BOUND, f"{task} of never-registering {origin} released as {owner.request_id}'s")
    if origin not in fed:
        return (EARLY, f"{task} of {origin} released before {origin} registered")
    if owner.request_id != origin:
        return (MISBOUND, f"{task} of {origin} released while slot {slot} belongs to {owner.request_id}")
    return None


def drop_finding(slot: int, prefilled_token_num: int, origin: Optional[str], reason: str, workload: Workload):
    """What is wrong, if anything, with dropping a task of ``origin``."""
    task = f"task ({slot},{prefilled_token_num})"
    if origin is None:
        return (PHANTOM, f"{task} dropped but never signalled (or handled twice)")
    if origin in workload.registering_ids:
        kind = GHOST_DROPPED_VALID if workload.has_ghost else DROPPED_VALID
        return (kind, f"{task} of {origin} dropped: {reason}")
    return None


def held_tasks(waiting: Sequence[Tuple[SignalTask, ...]], unmatched: Unmatched) -> Set[Tuple[int, int, int]]:
    """The delivered tasks the policy still holds, as (slot, n, signal index), from its ``waiting_signals()``.

    Each waiting task is the latest delivered, still unmatched task with its slot and token number that no other
    waiting task claimed: a pending buffer keeps the latest task per slot, an ordered queue whole trailing signals.
    """
    held: Set[Tuple[int, int, int]] = set()
    for signal in waiting:
        for slot, _, number in signal:
            candidates = [
                index for n, _, index in unmatched.get(slot, ()) if n == number and (slot, n, index) not in held
            ]
            if candidates:
                held.add((slot, number, max(candidates)))
    return held


def end_findings(
    findings: frozenset, waiting: Sequence[Tuple[SignalTask, ...]], unmatched: Unmatched, workload: Workload
) -> frozenset:
    """Findings once every event was delivered: tasks neither released nor dropped."""
    findings = set(findings)
    held = held_tasks(waiting, unmatched)
    for slot, entries in unmatched.items():
        for number, origin, index in entries:
            task = f"task ({slot},{number}) of {origin} (signal #{index})"
            if (slot, number, index) not in held:
                findings.add((LOST, f"{task} vanished: neither released nor dropped, and no longer held"))
            elif origin not in workload.registering_ids:
                continue  # its request never registers: waiting for it is right
            elif workload.has_ghost:
                findings.add((STALL, f"{task} still waits although {origin} registered"))
            else:
                findings.add((UNRELEASED, f"{task} still waits although every request registered"))
    return frozenset(findings)


@dataclass
class Outcome:
    """One distinct result a rank can reach, with how many interleavings reach it and a simplest witness."""

    batches: Tuple[Batch, ...]
    drops: Tuple[Task, ...]
    waits: Tuple[Wait, ...]
    findings: frozenset
    weight: int
    witness: str


# ---------------------------------------------------------------------------------------------------------------
# Across ranks.


def batch_shape(batches_a: Sequence[Batch], batches_b: Sequence[Batch]) -> Optional[str]:
    """How two different batch sequences differ (None when equal)."""
    if tuple(batches_a) == tuple(batches_b):
        return None
    tasks_a = Counter(task for batch in batches_a for task in batch)
    tasks_b = Counter(task for batch in batches_b for task in batch)
    if tasks_a != tasks_b:
        return SHAPE_COLLAPSED
    if Counter(batches_a) == Counter(batches_b):
        return SHAPE_REORDERED
    return SHAPE_MERGED


def weighted_disagreement(outcomes: Sequence[Outcome], key, nranks: int) -> int:
    """Joint interleavings (out of total ** nranks) in which the ranks' ``key`` values are not all equal."""
    classes = Counter()
    for outcome in outcomes:
        classes[key(outcome)] += outcome.weight
    total = sum(classes.values())
    return total**nranks - sum(weight**nranks for weight in classes.values())


@dataclass
class Counterexample:
    mode: str
    kind: str
    shape: Optional[str]
    workload: Workload
    nranks: int
    rank_outcomes: List[Outcome]
    barrier_run: Optional[BarrierRun]
    details: List[str]
    bad_joint_interleavings: int
    joint_interleavings: int
    slot_model: str = FIFO

    @property
    def scenario(self) -> Optional[str]:
        if self.kind in (DEADLOCK, FINISHED_MISMATCH, DIVERGENT_BATCHES) and self.shape:
            return SCENARIO_OF_SHAPE.get(self.shape)
        return None

    #: Why the two streams cannot decide this workload (lifecycle families), when that makes it a limit.
    limit_reason: Optional[str] = None

    @property
    def limitation(self) -> bool:
        return self.kind in LIMITATIONS or self.limit_reason is not None

    @property
    def reason(self) -> Optional[str]:
        """Why this counterexample is a known limit (None for a violation)."""
        return self.limit_reason or LIMITATIONS.get(self.kind)


@dataclass
class ConfigResult:
    workload: Workload
    nranks: int
    joint_interleavings: int
    counterexamples: List[Counterexample]  # one per (kind, shape) found in this config


Divergences = Dict[Tuple[str, Optional[str]], Tuple[Outcome, Outcome, List[str]]]


def cross_rank_divergences(outcomes: Sequence[Outcome]) -> Divergences:
    """For each (kind, shape), the simplest pair of rank outcomes that disagree that way.

    Rank 0 takes the first outcome, every other rank the second. With ``Barrier(nranks)`` every rank must wait on
    the same barrier for any to pass, so the verdict of a pair holds for any number of ranks.
    """
    observables: Dict[tuple, Outcome] = {}
    for outcome in outcomes:  # already sorted simplest witness first
        observables.setdefault((outcome.batches, outcome.drops, outcome.waits), outcome)
    representatives = list(observables.values())
    barrier_names = [tuple(wait.barrier for wait in outcome.waits) for outcome in representatives]
    pairs = sorted(
        itertools.combinations(range(len(representatives)), 2),
        key=lambda pair: switches(representatives[pair[0]].witness) + switches(representatives[pair[1]].witness),
    )
    found: Divergences = {}
    for a, b in pairs:
        first, second = representatives[a], representatives[b]
        kinds = []
        if barrier_names[a] != barrier_names[b]:
            kinds.append(DEADLOCK)
        elif first.waits != second.waits:
            kinds.append(FINISHED_MISMATCH)
        if first.batches != second.batches:
            kinds.append(DIVERGENT_BATCHES)
        if first.drops != second.drops:
            kinds.append(DIVERGENT_DROPS)
        kind = next(k for k in CROSS_RANK_PRIORITY if k in kinds)
        shape = batch_shape(first.batches, second.batches)
        found.setdefault((kind, shape), (first, second, kinds))
    return found


def check_config(
    workload: Workload,
    mode: str,
    outcomes: Sequence[Outcome],
    merges: int,
    nranks: int,
    divergences: Optional[Divergences] = None,
    slot_model: str = FIFO,
) -> ConfigResult:
    """Cross-rank and per-rank checks of one workload for ``nranks`` ranks, from one rank's ``outcomes``."""
    joint = merges**nranks
    found: List[Counterexample] = []

    # Per-rank findings: any rank reaching such an outcome is a counterexample (shown with all ranks alike).
    per_kind_weight = Counter()
    first_outcome: Dict[str, Outcome] = {}
    for outcome in outcomes:
        for kind in {kind for kind, _ in outcome.findings}:
            per_kind_weight[kind] += outcome.weight
            first_outcome.setdefault(kind, outcome)
    for kind, weight in per_kind_weight.items():
        outcome = first_outcome[kind]
        clean = merges - weight
        details = sorted(f"{k}: {d}" for k, d in outcome.findings if k == kind)
        found.append(
            Counterexample(
                mode,
                kind,
                None,
                workload,
                nranks,
                [outcome] * nranks,
                None,
                details,
                joint - clean**nranks,
                joint,
                slot_model,
            )
        )

    # Across ranks: joint interleavings (out of merges ** nranks) in which the ranks disagree, per kind.
    bad = {
        DIVERGENT_BATCHES: weighted_disagreement(outcomes, lambda o: o.batches, nranks),
        DIVERGENT_DROPS: weighted_disagreement(outcomes, lambda o: o.drops, nranks),
        DEADLOCK: weighted_disagreement(outcomes, lambda o: tuple(w.barrier for w in o.waits), nranks),
    }
    bad[FINISHED_MISMATCH] = weighted_disagreement(outcomes, lambda o: o.waits, nranks) - bad[DEADLOCK]
    if divergences is None:
        divergences = cross_rank_divergences(outcomes)
    for (kind, shape), (first, second, kinds) in divergences.items():
        barrier_run = simulate_barriers([first.waits] + [second.waits] * (nranks - 1))
        details = [f"rank 0 differs from the other ranks: {', '.join(kinds)}"]
        found.append(
            Counterexample(
                mode,
                kind,
                shape,
                workload,
                nranks,
                [first] + [second] * (nranks - 1),
                barrier_run,
                details,
                bad[kind],
                joint,
                slot_model,
            )
        )
    return ConfigResult(workload, nranks, joint, found)
