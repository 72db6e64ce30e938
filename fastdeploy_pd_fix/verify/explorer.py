"""The explorer: every interleaving of one rank's threads over one workload, reduced to the rank's distinct outcomes.

What a rank does is a :class:`RankModel`: its start state, the threads (actors, one letter each) that can step in a
state, one step of one of them, the key that says two states behave alike from here on, and the outcome of a state
where no thread can step. Two models exist, over the same engine histories: the race families'
(:mod:`.race_rank`: the signal and registration threads, the send thread sending each batch as it is released) and
the slot-lifecycle families' (:mod:`.lifecycle_rank`: the send thread a third actor, with the engine's gates).

The search goes forward one step at a time, merging states with equal keys after each number of steps, each weighted
by how many interleavings reach it; a state where no thread can step ends its interleavings. The witness of each
outcome is its simplest interleaving (fewest thread switches, then alphabetical), exactly. Ranks interact only
through what they release, so the cross-rank checks (:mod:`.checks`) compare outcomes, which covers all
``interleavings ** nranks`` joint interleavings without enumerating them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Generic, Hashable, List, Protocol, Sequence, Tuple, TypeVar

from fastdeploy_pd_fix.verify.checks import Outcome
from fastdeploy_pd_fix.verify.workloads import simpler_merge, switches

State = TypeVar("State")
Step = TypeVar("Step", covariant=True)
#: What a rank ended with: (batches, drops, waits, findings); equal keys are one outcome.
OutcomeKey = Tuple[tuple, tuple, tuple, frozenset]


class RankModel(Protocol, Generic[State, Step]):
    """One rank's threads over one workload, for one release mode."""

    def start(self) -> State:
        ...

    def enabled(self, state: State) -> Sequence[str]:
        """The actors that can step in ``state`` (none: the rank is done, or can never go on)."""

    def step(self, state: State, actor: str) -> State:
        """A new state: ``state`` after one step of ``actor`` (``state`` is left as it was)."""

    def key(self, state: State) -> Hashable:
        """Equal for states of one step count from which every continuation behaves alike."""

    def outcome(self, state: State) -> OutcomeKey:
        """What the rank ended with, in a state where no actor can step."""

    def describe(self, position: int, before: State, actor: str, after: State) -> Step:
        """Step ``position`` of a replay: what ``actor`` did from ``before`` to ``after``."""


@dataclass
class RankExploration:
    outcomes: List[Outcome]  # simplest witness first
    interleavings: int  # of the rank's threads: the weights of the outcomes summed
    states: int  # distinct states, the start one included


def explore(model: RankModel) -> RankExploration:
    """All outcomes of one rank over every interleaving of its threads."""
    start = model.start()
    # key -> [state, interleavings reaching it, {last actor: simplest trace ending with it, as (switches, trace)}]:
    # the switches a continuation adds depend only on the last actor, and traces to one state have one length, so
    # the simplest trace of each last actor is a prefix of the simplest trace through the state
    frontier: Dict[Hashable, list] = {model.key(start): [start, 1, {"": (0, "")}]}
    states = 1
    ends: Dict[OutcomeKey, Outcome] = {}
    while frontier:
        successors: Dict[Hashable, list] = {}
        for state, count, traces in frontier.values():
            actors = model.enabled(state)
            if not actors:
                _end(ends, model.outcome(state), count, min(traces.values()))
            for actor in actors:
                child = model.step(state, actor)
                trace = min(
                    (switched + (last not in ("", actor)), prefix + actor)
                    for last, (switched, prefix) in traces.items()
                )
                known = successors.setdefault(model.key(child), [child, 0, {}])
                known[1] += count
                known[2][actor] = min(known[2].get(actor, trace), trace)
        states += len(successors)
        frontier = successors
    outcomes = sorted(ends.values(), key=lambda outcome: (switches(outcome.witness), outcome.witness))
    return RankExploration(outcomes, sum(outcome.weight for outcome in outcomes), states)


def _end(ends: Dict[OutcomeKey, Outcome], key: OutcomeKey, count: int, trace: Tuple[int, str]) -> None:
    known = ends.get(key)
    if known is None:
        ends[key] = Outcome(*key, count, trace[1])
    else:
        known.weight += count
        known.witness = simpler_merge(known.witness, trace[1])


def replay(model: RankModel[State, Step], trace: str) -> List[Step]:
    """Re-run one interleaving and describe it step by step."""
    state = model.start()
    steps = []
    for position, actor in enumerate(trace):
        after = model.step(state, actor)
        steps.append(model.describe(position, state, actor, after))
        state = after
    return steps
