"""Exhaustive interleaving explorer over the shipped release logic (``fastdeploy-pd-fix verify``).

Every tensor-parallel rank sees the same two streams: the layer-0 kv signals (each a tuple of tasks
``(slot, prefilled_token_num)``) and the registrations (lockstep across ranks). Only the *merge* of the two streams
differs from rank to rank. For bounded workloads this module enumerates every merge on a rank, drives a fresh
release object through it (for ``ordered`` and ``upstream`` exactly :func:`fastdeploy_pd_fix.release.make_release`),
and checks the invariants of ``shared/docs/protocol.md``:

1. every rank releases the same sequence of batches (and drops the same tasks);
2. every layer-0 task is released exactly once or dropped, and nothing is released before its registration;
3. progress: when every signalled request registers, every task is released or dropped;
4. the barrier waits the batches cause (``begin_send_cache_barrier`` per batch, ``finish_send_cache_barrier`` per
   completed request) never block on ``threading.Barrier(nranks)``, and the request ids finished per round agree
   (``get_finished_req`` reports rank 0's).

Key reduction: the merges of one rank are independent of the other ranks, and ranks interact only through the
sequences they release. So the explorer computes, once per workload, the set of distinct outcomes one rank can
reach (memoising the reachable ``(release state, outputs)`` per number of delivered events), weighted by how many
merges lead to each; cross-rank checks then compare outcomes, which covers all ``merges ** nranks`` joint
interleavings without enumerating them.

Model of the send thread (``prefill_layerwise_send_cache_thread``), an assumption of this explorer: it consumes a
batch the moment it is released. ``idx_cache_task_dict`` is modelled per slot as a FIFO of registrations: a
registration appends to its slot; the head is the request a released task of that slot belongs to; the head leaves
when a batch holding its final chunk (``prefilled_token_num == need_prefill_tokens``) is released. ``registered``
(what ``upstream`` and ``pr7872`` look at) maps each slot with a head to the head's ``need_prefill_tokens``. The
FIFO equals upstream's plain dict whenever a slot is re-registered only after its previous request was sent (true if
the engine recycles a slot only after ``get_finished_req``); the merges explored include ones where it is not so.
``--slot-model dict`` models the plain dict instead (a registration replaces its slot's entry), to show what the
send thread itself does when that engine assumption fails.

Modes: ``ordered`` and ``upstream`` are the shipped policies of ``release.py``; ``pr7872`` is a small model,
defined here, of the behaviour before #8034 (per signal, the tasks whose slot is registered go out together as one
batch; the others wait in a latest-per-slot pending buffer and are recovered one by one at registration).

Usage: ``fastdeploy-pd-fix verify [--mode ordered|upstream|pr7872] [--quick] [--json-out PATH] [--strict]
[--slot-model fifo|dict] [--show N]``. Prints a progress line on stderr, a table per workload family and rank count
on stdout, the smallest counterexample of each kind found, and as the last line a JSON summary
``{"mode", "configs", "interleavings", "violations"}``; exits 0 iff there is no violation. Released and dropped
tasks are attributed to the signal that produced them by (slot, token number), earliest unmatched first.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Mapping, NamedTuple, Optional, Sequence, Tuple

from fastdeploy_pd_fix.release import (
    ORDERED,
    UPSTREAM,
    Batch,
    OrderedRelease,
    Registration,
    Released,
    Task,
    _check_tasks,
    make_release,
)

PR7872 = "pr7872"
EXPLORER_MODES = (ORDERED, UPSTREAM, PR7872)

BEGIN = "begin_send_cache_barrier"
FINISH = "finish_send_cache_barrier"

FIFO = "fifo"
DICT = "dict"
SLOT_MODELS = (FIFO, DICT)

SIGNAL_EVENT = "S"
REGISTRATION_EVENT = "R"

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

# Known, documented limitations (counted as violations only with --strict). They can only occur in workloads with
# a request that never registers ("ghost"): release.py's rule 3 makes the oldest signal wait for a registration of
# its slot, and rule 4 judges a ghost's task against the slot's next registration.
STALL = "stall"  # a registered request's task waits forever behind a ghost's signal
GHOST_BOUND = "ghost-bound"  # a ghost's task was released as the chunk of the slot's next request
GHOST_DROPPED_VALID = "ghost-dropped-valid"  # a registered request's task dropped after a ghost's task took its place
LIMITATIONS = {
    STALL: "a registered request's task waits forever behind a request that never registers (ordered, rule 3: the "
    "oldest signal waits for a registration of its slot, so a ghost whose slot is never reused blocks every signal "
    "behind it on every rank alike; no rank-invariant timeout exists)",
    GHOST_BOUND: "a never-registering request's task is released as a chunk of the next request registered in its "
    "slot (ordered, rules 2 and 4, on every rank alike); when its token number equals that request's need, that "
    "request is reported finished on the ghost's signal and its own final signal then waits (stall)",
    GHOST_DROPPED_VALID: "after a ghost's task took its place, a registered request's task with the same or a lower "
    "token number is dropped as not advancing (ordered, rule 4)",
}

SHAPE_MERGED = "merged-vs-split"  # s1: one rank put tasks in one batch that another rank split into several
SHAPE_COLLAPSED = "collapsed-chunks"  # s2: one rank released fewer tasks (pending kept only the latest chunk)
SHAPE_REORDERED = "reordered"  # s3: same batches, different order
SCENARIO_OF_SHAPE = {SHAPE_MERGED: "s1", SHAPE_COLLAPSED: "s2", SHAPE_REORDERED: "s3"}
# The most telling cross-rank kind names a counterexample; reports list kinds in this order.
CROSS_RANK_PRIORITY = (DEADLOCK, FINISHED_MISMATCH, DIVERGENT_BATCHES, DIVERGENT_DROPS)
KIND_ORDER = (DEADLOCK, FINISHED_MISMATCH, LOST, UNRELEASED, EARLY, MISBOUND, DROPPED_VALID, DIVERGENT_BATCHES)
KIND_ORDER += (DIVERGENT_DROPS, PHANTOM, CRASH, STALL, GHOST_BOUND, GHOST_DROPPED_VALID)


class Wait(NamedTuple):
    """One barrier wait of the send thread; a finish wait is followed by ``put_finished_req(request_id)``."""

    barrier: str
    request_id: Optional[str] = None

    def describe(self) -> str:
        return "begin" if self.barrier == BEGIN else f"finish({self.request_id})"


# ---------------------------------------------------------------------------------------------------------------
# The pr7872 model (pre-#8034 behaviour), only for showing that the explorer finds the seed deadlock (s1).


class Pr7872Release:
    """Model of #7872: registered tasks of a signal form one batch; the others wait, latest per slot."""

    mode = PR7872

    def __init__(self):
        self._pending: Dict[int, int] = {}

    def add_signal(self, tasks: Sequence[Task], registered: Mapping[int, int]) -> Released:
        ready = []
        for slot, prefilled_token_num in _check_tasks(tasks):
            if slot in registered:
                ready.append((slot, prefilled_token_num))
            else:
                self._pending[slot] = prefilled_token_num  # latest signal per slot wins
        released = Released()
        if ready:
            released.batches.append(tuple(ready))  # whatever this rank happens to have registered: timing-dependent
        return released

    def add_registration(self, registration: Registration, registered: Mapping[int, int]) -> Released:
        released = Released()
        if registration.slot in self._pending:
            released.batches.append(((registration.slot, self._pending.pop(registration.slot)),))
        return released

    def waiting_signals(self) -> List[Batch]:
        return [((slot, prefilled_token_num),) for slot, prefilled_token_num in self._pending.items()]


def make_policy(mode: str):
    """A fresh release object: exactly ``release.make_release`` for the shipped modes."""
    if mode == PR7872:
        return Pr7872Release()
    return make_release(mode)


# ---------------------------------------------------------------------------------------------------------------
# Workloads.


@dataclass(frozen=True)
class RequestSpec:
    """One prefill request: its engine slot, the cumulative token number after each chunk, and whether it registers."""

    request_id: str
    slot: int
    chunks: Tuple[int, ...]
    registers: bool = True

    @property
    def need(self) -> int:
        return self.chunks[-1]

    def describe(self) -> str:
        chunks = ",".join(map(str, self.chunks))
        return f"{self.request_id}@{self.slot}[{chunks}]" + ("" if self.registers else "(never registers)")


@dataclass(frozen=True)
class Workload:
    """The two rank-invariant streams, plus which request produced each task (the ground truth for the checks)."""

    family: str
    requests: Tuple[RequestSpec, ...]
    signals: Tuple[Tuple[Task, ...], ...]
    origins: Tuple[Tuple[str, ...], ...]  # request id of each task, parallel to ``signals``
    registrations: Tuple[Registration, ...]

    @property
    def has_ghost(self) -> bool:
        return any(not request.registers for request in self.requests)

    @property
    def registering_ids(self) -> frozenset:
        return frozenset(request.request_id for request in self.requests if request.registers)

    def merges(self) -> int:
        """Number of merges of the two streams on one rank."""
        return math.comb(len(self.signals) + len(self.registrations), len(self.signals))

    def size_key(self) -> tuple:
        chunks = sum(len(request.chunks) for request in self.requests)
        return (len(self.requests), chunks, len(self.signals), self.describe())

    def describe(self) -> str:
        requests = " ".join(request.describe() for request in self.requests)
        signals = " ".join("[" + ",".join(f"({s},{n})" for s, n in signal) + "]" for signal in self.signals)
        registrations = " ".join(registration.request_id for registration in self.registrations) or "-"
        return f"{requests} | signals {signals} | registrations {registrations}"

    def to_json(self) -> dict:
        return {
            "family": self.family,
            "requests": [
                {"id": r.request_id, "slot": r.slot, "chunks": list(r.chunks), "registers": r.registers}
                for r in self.requests
            ],
            "signals": [[list(task) for task in signal] for signal in self.signals],
            "signal_origins": [list(origins) for origins in self.origins],
            "registrations": [
                {"slot": r.slot, "request_id": r.request_id, "need_prefill_tokens": r.need_prefill_tokens}
                for r in self.registrations
            ],
        }


def _engine_schedules(requests: Sequence[RequestSpec]) -> Iterator[Tuple[Tuple[Tuple[int, int], ...], ...]]:
    """Every engine schedule: steps of (request index, chunk index), one chunk per request per step.

    A request's chunks run in order in strictly later steps; a request reusing a slot starts only after the slot's
    previous request ran its final chunk. Any non-empty subset of the runnable requests may run in a step.
    """
    predecessor = []
    for index, request in enumerate(requests):
        same_slot = [earlier for earlier in range(index) if requests[earlier].slot == request.slot]
        predecessor.append(same_slot[-1] if same_slot else None)

    def finished(progress, index):
        return progress[index] == len(requests[index].chunks)

    def extend(progress, steps):
        if all(finished(progress, index) for index in range(len(requests))):
            yield tuple(steps)
            return
        runnable = [
            index
            for index in range(len(requests))
            if not finished(progress, index) and (predecessor[index] is None or finished(progress, predecessor[index]))
        ]
        for size in range(1, len(runnable) + 1):
            for subset in itertools.combinations(runnable, size):
                step = tuple(sorted(((index, progress[index]) for index in subset), key=lambda t: requests[t[0]].slot))
                advanced = list(progress)
                for index in subset:
                    advanced[index] += 1
                yield from extend(advanced, steps + [step])

    yield from extend([0] * len(requests), [])


def _registration_orders(requests: Sequence[RequestSpec]) -> Iterator[Tuple[RequestSpec, ...]]:
    """Every lockstep registration order of the registering requests (same-slot requests keep their order)."""
    registering = [request for request in requests if request.registers]
    for order in itertools.permutations(registering):
        positions = {request.request_id: position for position, request in enumerate(order)}
        if all(
            positions[a.request_id] < positions[b.request_id]
            for a, b in itertools.combinations(registering, 2)
            if a.slot == b.slot
        ):
            yield order


def expand_family(family: str, requests: Sequence[RequestSpec]) -> List[Workload]:
    """All workloads of one request template: every engine schedule times every registration order."""
    workloads = []
    for schedule in _engine_schedules(requests):
        signals = tuple(
            tuple((requests[index].slot, requests[index].chunks[chunk]) for index, chunk in step) for step in schedule
        )
        origins = tuple(tuple(requests[index].request_id for index, _ in step) for step in schedule)
        for order in _registration_orders(requests):
            registrations = tuple(Registration(r.slot, r.request_id, r.need) for r in order)
            workloads.append(Workload(family, tuple(requests), signals, origins, registrations))
    return workloads


def _req(request_id: str, slot: int, *chunks: int, registers: bool = True) -> RequestSpec:
    return RequestSpec(request_id, slot, tuple(chunks), registers)


SINGLE = (4,)
CHUNKED = (2, 4)


def default_families(quick: bool = False) -> List[Tuple[str, List[List[RequestSpec]]]]:
    """Request templates per family; ``quick`` drops the larger templates (every family keeps its smallest ones)."""
    shapes = (SINGLE, CHUNKED)
    full = not quick
    ghost_single, ghost_chunked = (_req("G", 0, *shape, registers=False) for shape in shapes)
    families = [
        ("1req", [[_req("A", 0, *a)] for a in shapes]),
        ("2req", [[_req("A", 0, *a), _req("B", 1, *b)] for a in shapes for b in shapes]),
        (
            "2req-reuse",  # B takes A's slot after A's final chunk; (2, 6) shares a token number with A's chunk
            [[_req("A", 0, *a), _req("B", 0, *b)] for a in shapes for b in (SINGLE, CHUNKED, (2, 6))],
        ),
        (
            "ghost-reused",  # G never registers; A later reuses G's slot (n equal to, below and above A's need)
            [[_req("G", 0, *g, registers=False), _req("A", 0, *a)] for g in (SINGLE, CHUNKED, (6,)) for a in shapes],
        ),
        (
            "ghost-alone",  # G never registers and its slot is never reused: the requests behind it stall
            [[_req("G", 0, *g, registers=False), _req("A", 1, *a)] for g in shapes for a in shapes]
            + [[ghost_single, _req("A", 1, *SINGLE), _req("B", 2, *CHUNKED)]],
        ),
        (
            "3req",
            [[_req("A", 0, *SINGLE), _req("B", 1, *SINGLE), _req("C", 2, *SINGLE)]]
            + [[_req("A", 0, *CHUNKED), _req("B", 1, *SINGLE), _req("C", 2, *SINGLE)]]
            + full * [[_req("A", 0, *CHUNKED), _req("B", 1, *CHUNKED), _req("C", 2, *SINGLE)]]
            + full * [[_req("A", 0, *CHUNKED), _req("B", 1, *CHUNKED), _req("C", 2, *CHUNKED)]],
        ),
        (
            "3req-reuse",  # two requests share a slot, one more beside them; or three in one slot
            [[_req("A", 0, *SINGLE), _req("B", 0, *SINGLE), _req("C", 1, *SINGLE)]]
            + [[_req("A", 0, *a), _req("B", 0, *b), _req("C", 0, *CHUNKED)] for a in shapes for b in shapes]
            + full
            * [
                [_req("A", 0, *a), _req("B", 0, *b), _req("C", 1, *c)]
                for a in shapes
                for b in shapes
                for c in shapes
                if (a, b, c) != (SINGLE, SINGLE, SINGLE)
            ],
        ),
        (
            "ghost-3req",  # a ghost whose slot is reused, beside another request
            [[ghost_single, _req("A", 0, *SINGLE), _req("B", 1, *SINGLE)]]
            + full
            * [
                [g, _req("A", 0, *a), _req("B", 1, *b)]
                for g in (ghost_single, ghost_chunked)
                for a in shapes
                for b in shapes
                if (g, a, b) != (ghost_single, SINGLE, SINGLE)
            ],
        ),
        ("4req", full * [[_req(name, slot, *SINGLE) for slot, name in enumerate("ABCD")]]),
    ]
    return [(family, templates) for family, templates in families if templates]


def build_workloads(quick: bool = False) -> List[Tuple[str, List[Workload]]]:
    """Workloads per family, deduplicated and sorted smallest first (so the first counterexample is minimal)."""
    built = []
    for family, templates in default_families(quick):
        unique = {}
        for template in templates:
            for workload in expand_family(family, template):
                unique.setdefault((workload.requests, workload.signals, workload.registrations), workload)
        built.append((family, sorted(unique.values(), key=Workload.size_key)))
    return built


# ---------------------------------------------------------------------------------------------------------------
# One rank: driving a release object through one merge.


def _clone(value):
    """Copy a release object's state: containers copied, immutable leaves shared (much faster than deepcopy)."""
    if isinstance(value, dict):
        return {key: _clone(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_clone(item) for item in value]
    if isinstance(value, deque):
        return deque(_clone(item) for item in value)
    if hasattr(value, "__dict__") and not isinstance(value, Registration):
        twin = object.__new__(type(value))
        twin.__dict__.update(_clone(vars(value)))
        return twin
    return value  # ints, strings, tuples of those, frozen Registration


def _freeze(value):
    """A hashable snapshot of a release object's state (insertion order kept: it can matter for the outputs)."""
    if isinstance(value, dict):
        return tuple((key, _freeze(item)) for key, item in value.items())
    if isinstance(value, (list, deque)):
        return tuple(_freeze(item) for item in value)
    if hasattr(value, "__dict__") and not isinstance(value, Registration):
        return (type(value).__name__, _freeze(vars(value)))
    return value


@dataclass
class RankRun:
    """The state of one rank after a prefix of a merge: the release object, the send-thread model and outputs."""

    policy: object
    slot_registrations: Dict[int, Tuple[Registration, ...]]  # modelled idx_cache_task_dict (FIFO per slot)
    unmatched: Dict[int, Tuple[Tuple[int, str, int], ...]]  # slot -> delivered tasks (n, origin, signal index)
    fed: frozenset  # request ids whose registration was delivered
    signals_fed: int = 0
    registrations_fed: int = 0
    batches: Tuple[Batch, ...] = ()
    drops: Tuple[Task, ...] = ()
    waits: Tuple[Wait, ...] = ()
    findings: frozenset = frozenset()
    schedule: str = ""
    slot_model: str = FIFO

    @classmethod
    def start(cls, mode: str, slot_model: str = FIFO) -> "RankRun":
        return cls(make_policy(mode), {}, {}, frozenset(), slot_model=slot_model)

    def registered(self) -> Dict[int, int]:
        return {slot: regs[0].need_prefill_tokens for slot, regs in self.slot_registrations.items() if regs}

    def key(self) -> tuple:
        return (
            self.signals_fed,
            _freeze(self.policy),
            tuple(self.slot_registrations.items()),
            tuple(self.unmatched.items()),
            self.batches,
            self.drops,
            self.waits,
            self.findings,
        )

    def branch(self) -> "RankRun":
        return RankRun(
            _clone(self.policy),
            dict(self.slot_registrations),
            dict(self.unmatched),
            self.fed,
            self.signals_fed,
            self.registrations_fed,
            self.batches,
            self.drops,
            self.waits,
            self.findings,
            self.schedule,
            self.slot_model,
        )


def advance(run: RankRun, event: str, workload: Workload) -> Tuple[RankRun, Released]:
    """Deliver the next event of one stream to a copy of ``run``; return the copy and what the policy released."""
    child = run.branch()
    child.schedule += event
    try:
        if event == SIGNAL_EVENT:
            index = child.signals_fed
            child.signals_fed += 1
            for (slot, prefilled_token_num), origin in zip(workload.signals[index], workload.origins[index]):
                child.unmatched[slot] = child.unmatched.get(slot, ()) + ((prefilled_token_num, origin, index),)
            released = child.policy.add_signal(workload.signals[index], registered=child.registered())
        else:
            registration = workload.registrations[child.registrations_fed]
            child.registrations_fed += 1
            # The registration thread stores the task first, then recovers (upstream) or releases (ordered).
            earlier = child.slot_registrations.get(registration.slot, ()) if child.slot_model == FIFO else ()
            child.slot_registrations[registration.slot] = earlier + (registration,)
            child.fed = child.fed | {registration.request_id}
            released = child.policy.add_registration(registration, registered=child.registered())
    except Exception as error:  # a crash on valid input is itself a finding
        child.findings = child.findings | {(CRASH, f"{type(error).__name__}: {error}")}
        return child, Released()
    _record(child, released, workload)
    return child, released


def _match_origin(run: RankRun, slot: int, prefilled_token_num: int) -> Optional[str]:
    """Which delivered task a released or dropped one is: the earliest unmatched one with that slot and number."""
    entries = run.unmatched.get(slot, ())
    for position, (number, origin, _) in enumerate(entries):
        if number == prefilled_token_num:
            run.unmatched[slot] = entries[:position] + entries[position + 1 :]
            return origin
    return None


def _record(run: RankRun, released: Released, workload: Workload) -> None:
    """Append released batches and drops, derive the barrier waits, and note per-rank findings."""
    findings = set(run.findings)
    waits = list(run.waits)
    for batch in released.batches:
        waits.append(Wait(BEGIN))
        for slot, prefilled_token_num in batch:
            task = f"task ({slot},{prefilled_token_num})"
            origin = _match_origin(run, slot, prefilled_token_num)
            head = run.slot_registrations.get(slot, ())
            owner = head[0] if head else None
            ghost = origin is not None and origin not in workload.registering_ids
            if origin is None:
                findings.add((PHANTOM, f"{task} released but never signalled (or released twice)"))
            elif owner is None:
                findings.add((EARLY, f"{task} of {origin} released while slot {slot} had no registration"))
            elif ghost:
                findings.add((GHOST_BOUND, f"{task} of never-registering {origin} released as {owner.request_id}'s"))
            elif origin not in run.fed:
                findings.add((EARLY, f"{task} of {origin} released before {origin} registered"))
            elif owner.request_id != origin:
                findings.add(
                    (MISBOUND, f"{task} of {origin} released while slot {slot} belongs to {owner.request_id}")
                )
            if owner is not None and prefilled_token_num == owner.need_prefill_tokens:
                waits.append(Wait(FINISH, owner.request_id))
                run.slot_registrations[slot] = head[1:]  # the send thread finishes the request and cleans it up
    for drop in released.drops:
        task = f"task ({drop.slot},{drop.prefilled_token_num})"
        origin = _match_origin(run, drop.slot, drop.prefilled_token_num)
        if origin is None:
            findings.add((PHANTOM, f"{task} dropped but never signalled (or handled twice)"))
        elif origin in workload.registering_ids:
            kind = GHOST_DROPPED_VALID if workload.has_ghost else DROPPED_VALID
            findings.add((kind, f"{task} of {origin} dropped: {drop.reason}"))
    run.batches = run.batches + tuple(released.batches)
    run.drops = run.drops + tuple((drop.slot, drop.prefilled_token_num) for drop in released.drops)
    run.waits = tuple(waits)
    run.findings = frozenset(findings)


def _held_tasks(run: RankRun) -> set:
    """Unmatched tasks the policy still holds at the end, as (slot, n, signal index)."""
    held = set()
    if isinstance(run.policy, OrderedRelease):
        # Ordered releases whole signals in arrival order: the waiting ones are the last ones delivered.
        first_waiting = run.signals_fed - len(run.policy.waiting_signals())
        for slot, entries in run.unmatched.items():
            held.update((slot, number, index) for number, _, index in entries if index >= first_waiting)
        return held
    for waiting in run.policy.waiting_signals():  # pending buffers: one latest task per slot
        for slot, number in waiting:
            candidates = [index for n, _, index in run.unmatched.get(slot, ()) if n == number]
            if candidates:
                held.add((slot, number, max(candidates)))
    return held


def end_findings(run: RankRun, workload: Workload) -> frozenset:
    """Findings once every event was delivered: tasks neither released nor dropped."""
    findings = set(run.findings)
    held = _held_tasks(run)
    for slot, entries in run.unmatched.items():
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


# ---------------------------------------------------------------------------------------------------------------
# One rank: every merge, memoised.


@dataclass
class Outcome:
    """One distinct result a rank can reach, with how many merges reach it and a simplest witness merge."""

    batches: Tuple[Batch, ...]
    drops: Tuple[Task, ...]
    waits: Tuple[Wait, ...]
    findings: frozenset
    weight: int
    witness: str


def _switches(schedule: str) -> int:
    return sum(1 for a, b in zip(schedule, schedule[1:]) if a != b)


def _simpler(a: str, b: str) -> str:
    return min(a, b, key=lambda schedule: (_switches(schedule), schedule))


@dataclass
class RankExploration:
    outcomes: List[Outcome]
    merges: int
    states: int


def explore_rank(workload: Workload, mode: str, slot_model: str = FIFO) -> RankExploration:
    """All outcomes of one rank over every merge of the two streams (forward search, merging equal states)."""
    total_events = len(workload.signals) + len(workload.registrations)
    frontier: Dict[tuple, Tuple[RankRun, int]] = {}
    start = RankRun.start(mode, slot_model)
    frontier[start.key()] = (start, 1)
    states = 1
    for _ in range(total_events):
        successors: Dict[tuple, Tuple[RankRun, int]] = {}
        for run, count in frontier.values():
            events = []
            if run.signals_fed < len(workload.signals):
                events.append(SIGNAL_EVENT)
            if run.registrations_fed < len(workload.registrations):
                events.append(REGISTRATION_EVENT)
            for event in events:
                child, _ = advance(run, event, workload)
                key = child.key()
                if key in successors:
                    known, known_count = successors[key]
                    known.schedule = _simpler(known.schedule, child.schedule)
                    successors[key] = (known, known_count + count)
                else:
                    successors[key] = (child, count)
        states += len(successors)
        frontier = successors

    outcomes: Dict[tuple, Outcome] = {}
    for run, count in frontier.values():
        findings = end_findings(run, workload)
        key = (run.batches, run.drops, run.waits, findings)
        if key in outcomes:
            outcome = outcomes[key]
            outcome.weight += count
            outcome.witness = _simpler(outcome.witness, run.schedule)
        else:
            outcomes[key] = Outcome(run.batches, run.drops, run.waits, findings, count, run.schedule)
    merged = sum(outcome.weight for outcome in outcomes.values())
    assert merged == workload.merges(), (merged, workload.merges())
    return RankExploration(sorted(outcomes.values(), key=lambda o: (_switches(o.witness), o.witness)), merged, states)


def replay(workload: Workload, mode: str, schedule: str, slot_model: str = FIFO) -> List[dict]:
    """Re-run one merge and describe, event by event, what the rank released."""
    run = RankRun.start(mode, slot_model)
    steps = []
    for position, event in enumerate(schedule):
        if event == SIGNAL_EVENT:
            index = run.signals_fed
            what = {"event": "signal", "index": index, "tasks": [list(t) for t in workload.signals[index]]}
        else:
            index = run.registrations_fed
            registration = workload.registrations[index]
            what = {
                "event": "registration",
                "index": index,
                "request_id": registration.request_id,
                "slot": registration.slot,
                "need_prefill_tokens": registration.need_prefill_tokens,
            }
        run, released = advance(run, event, workload)
        what["step"] = position
        what["released"] = [[list(task) for task in batch] for batch in released.batches]
        what["dropped"] = [[drop.slot, drop.prefilled_token_num, drop.reason] for drop in released.drops]
        steps.append(what)
    return steps


# ---------------------------------------------------------------------------------------------------------------
# Across ranks: barrier semantics.


@dataclass
class BarrierRun:
    """Result of simulating the send threads of all ranks on ``threading.Barrier(nranks)`` objects."""

    deadlocked: bool
    rounds: List[Tuple[str, Tuple[Optional[str], ...]]] = field(default_factory=list)  # tripped barrier, ids
    blocked: List[dict] = field(default_factory=list)  # per rank, where it blocks forever
    mismatched_round: Optional[int] = None  # first finish round whose request ids differ across ranks

    def to_json(self) -> dict:
        return {
            "deadlocked": self.deadlocked,
            "rounds": [{"barrier": barrier, "request_ids": list(ids)} for barrier, ids in self.rounds],
            "blocked": self.blocked,
            "mismatched_round": self.mismatched_round,
        }


def simulate_barriers(wait_sequences: Sequence[Sequence[Wait]]) -> BarrierRun:
    """Run every rank's waits against shared ``Barrier(nranks)`` objects, the way the manager's barriers behave.

    A barrier trips when all ``nranks`` parties wait on it; a rank waits on one barrier at a time, in order. When no
    barrier can trip while some rank still waits, the waiting ranks block forever (there is no timeout). After each
    finish round the engine's ``get_finished_req`` takes one request id per rank and reports rank 0's.
    """
    nranks = len(wait_sequences)
    positions = [0] * nranks
    result = BarrierRun(deadlocked=False)
    while True:
        waiting = {
            rank: wait_sequences[rank][positions[rank]]
            for rank in range(nranks)
            if positions[rank] < len(wait_sequences[rank])
        }
        if not waiting:
            return result
        parties = Counter(wait.barrier for wait in waiting.values())
        tripped = [barrier for barrier, count in parties.items() if count == nranks]
        if not tripped:
            result.deadlocked = True
            for rank in range(nranks):
                wait = waiting.get(rank)
                result.blocked.append(
                    {
                        "rank": rank,
                        "wait_index": positions[rank],
                        "barrier": wait.barrier if wait else None,
                        "parties_waiting": parties[wait.barrier] if wait else None,
                        "parties_needed": nranks,
                        "note": "waits forever" if wait else "has no more waits; the others wait for it forever",
                    }
                )
            return result
        barrier = tripped[0]
        request_ids = tuple(waiting[rank].request_id for rank in range(nranks))
        if barrier == FINISH and len(set(request_ids)) > 1 and result.mismatched_round is None:
            result.mismatched_round = len(result.rounds)
        result.rounds.append((barrier, request_ids if barrier == FINISH else ()))
        for rank in range(nranks):
            positions[rank] += 1


def describe_barriers(barrier_run: BarrierRun) -> List[str]:
    lines = []
    for number, (barrier, ids) in enumerate(barrier_run.rounds):
        short = "begin" if barrier == BEGIN else "finish"
        detail = f" request ids per rank {list(ids)}" if ids else ""
        flag = "  <-- get_finished_req reports rank 0's id" if number == barrier_run.mismatched_round else ""
        lines.append(f"round {number}: {short} barrier tripped{detail}{flag}")
    for blocked in barrier_run.blocked:
        if blocked["barrier"] is None:
            lines.append(f"rank {blocked['rank']}: {blocked['note']}")
        else:
            short = "begin" if blocked["barrier"] == BEGIN else "finish"
            lines.append(
                f"rank {blocked['rank']}: blocks at wait #{blocked['wait_index']} on the {short} barrier "
                f"({blocked['parties_waiting']}/{blocked['parties_needed']} parties)"
            )
    if barrier_run.deadlocked:
        lines.append("=> DEADLOCK")
    return lines


# ---------------------------------------------------------------------------------------------------------------
# Cross-rank checks and counterexamples.


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


def _weighted_disagreement(outcomes: Sequence[Outcome], key, nranks: int) -> int:
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

    def to_json(self) -> dict:
        ranks = []
        for rank, outcome in enumerate(self.rank_outcomes):
            ranks.append(
                {
                    "rank": rank,
                    "schedule": outcome.witness,
                    "events": replay(self.workload, self.mode, outcome.witness, self.slot_model),
                    "batches": [[list(task) for task in batch] for batch in outcome.batches],
                    "drops": [list(task) for task in outcome.drops],
                    "waits": [wait.describe() for wait in outcome.waits],
                    "findings": sorted(f"{kind}: {detail}" for kind, detail in outcome.findings),
                }
            )
        return {
            "mode": self.mode,
            "slot_model": self.slot_model,
            "kind": self.kind,
            "limitation": self.kind in LIMITATIONS,
            "shape": self.shape,
            "scenario": self.scenario,
            "config": self.workload.to_json(),
            "config_text": self.workload.describe(),
            "nranks": self.nranks,
            "ranks": ranks,
            "barriers": self.barrier_run.to_json() if self.barrier_run else None,
            "details": self.details,
            "bad_joint_interleavings": self.bad_joint_interleavings,
            "joint_interleavings": self.joint_interleavings,
        }

    def render(self) -> str:
        tag = f"[{self.scenario}] " if self.scenario else ""
        shape = f" ({self.shape})" if self.shape else ""
        limitation = " [known limitation]" if self.kind in LIMITATIONS else ""
        lines = [
            f"counterexample {tag}{self.kind}{shape}{limitation}: mode {self.mode}, family {self.workload.family}, "
            f"{self.nranks} ranks ({self.bad_joint_interleavings} of {self.joint_interleavings} joint interleavings)",
            "  requests:      " + "  ".join(request.describe() for request in self.workload.requests),
            "  signals:       "
            + "  ".join(
                f"#{i} [" + ",".join(f"({s},{n}){o}" for (s, n), o in zip(signal, origins)) + "]"
                for i, (signal, origins) in enumerate(zip(self.workload.signals, self.workload.origins))
            ),
            "  registrations: "
            + (
                "  ".join(
                    f"#{i} {r.request_id}@{r.slot} need {r.need_prefill_tokens}"
                    for i, r in enumerate(self.workload.registrations)
                )
                or "-"
            ),
        ]
        for detail in self.details:
            lines.append(f"  {detail}")
        for rank, outcome in enumerate(self.rank_outcomes):
            lines.append(f"  rank {rank}: merge {_describe_schedule(outcome.witness)}")
            for step in replay(self.workload, self.mode, outcome.witness, self.slot_model):
                if step["event"] == "signal":
                    event = f"signal #{step['index']} {_tasks_text(step['tasks'])}"
                else:
                    event = f"register {step['request_id']}@{step['slot']} need {step['need_prefill_tokens']}"
                out = [f"batch {_tasks_text(batch)}" for batch in step["released"]]
                out += [f"drop ({s},{n}): {reason}" for s, n, reason in step["dropped"]]
                lines.append(f"    {step['step']:>2}: {event:<34} -> {', '.join(out) or '-'}")
            lines.append("    batches: " + (" ".join(_tasks_text(batch) for batch in outcome.batches) or "-"))
            lines.append("    waits:   " + (", ".join(wait.describe() for wait in outcome.waits) or "-"))
        if self.barrier_run is not None:
            lines.extend(f"  {line}" for line in describe_barriers(self.barrier_run))
        return "\n".join(lines)


def _tasks_text(tasks) -> str:
    return "[" + ",".join(f"({slot},{number})" for slot, number in tasks) + "]"


def _describe_schedule(schedule: str) -> str:
    signal_index = registration_index = 0
    parts = []
    for event in schedule:
        if event == SIGNAL_EVENT:
            parts.append(f"S{signal_index}")
            signal_index += 1
        else:
            parts.append(f"R{registration_index}")
            registration_index += 1
    return " ".join(parts)


@dataclass
class ConfigResult:
    workload: Workload
    nranks: int
    joint_interleavings: int
    counterexamples: List[Counterexample]  # one per (kind, shape) found in this config


def cross_rank_divergences(
    outcomes: Sequence[Outcome],
) -> Dict[Tuple[str, Optional[str]], Tuple[Outcome, Outcome, List[str]]]:
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
        key=lambda pair: (_switches(representatives[pair[0]].witness) + _switches(representatives[pair[1]].witness)),
    )
    found: Dict[Tuple[str, Optional[str]], Tuple[Outcome, Outcome, List[str]]] = {}
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
    exploration: RankExploration,
    nranks: int,
    divergences: Optional[Dict[Tuple[str, Optional[str]], Tuple[Outcome, Outcome, List[str]]]] = None,
    slot_model: str = FIFO,
) -> ConfigResult:
    """Cross-rank and per-rank checks of one workload for ``nranks`` ranks."""
    outcomes = exploration.outcomes
    joint = exploration.merges**nranks
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
        clean = exploration.merges - weight
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
        DIVERGENT_BATCHES: _weighted_disagreement(outcomes, lambda o: o.batches, nranks),
        DIVERGENT_DROPS: _weighted_disagreement(outcomes, lambda o: o.drops, nranks),
        DEADLOCK: _weighted_disagreement(outcomes, lambda o: tuple(w.barrier for w in o.waits), nranks),
    }
    bad[FINISHED_MISMATCH] = _weighted_disagreement(outcomes, lambda o: o.waits, nranks) - bad[DEADLOCK]
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


# ---------------------------------------------------------------------------------------------------------------
# Driver.


@dataclass
class FamilyRow:
    family: str
    nranks: int
    configs: int = 0
    interleavings: int = 0
    states: int = 0
    outcomes: int = 0
    violations: int = 0
    limitations: int = 0
    seconds: float = 0.0


@dataclass
class Report:
    mode: str
    slot_model: str
    rows: List[FamilyRow]
    counterexamples: List[Counterexample]  # smallest per (kind, shape), in discovery order
    configs: int
    interleavings: int
    violations: int
    limitations: int
    seconds: float
    strict: bool

    def summary(self) -> dict:
        return {
            "mode": self.mode,
            "configs": self.configs,
            "interleavings": self.interleavings,
            "violations": self.violations,
        }


class _Progress:
    """A one-line progress indicator on stderr (redrawn in place on a terminal, sparse lines otherwise)."""

    def __init__(self, mode: str, total: int, stream=None):
        self.mode = mode
        self.total = total
        self.stream = stream or sys.stderr
        self.started = time.monotonic()
        self.last = 0.0
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def update(self, done: int, family: str) -> None:
        now = time.monotonic()
        interval = 0.2 if self.tty else 5.0
        if done < self.total and now - self.last < interval:
            return
        self.last = now
        line = f"verify {self.mode}: {done}/{self.total} configs ({family}), {now - self.started:.1f} s"
        self.stream.write(("\r" + line) if self.tty else (line + "\n"))
        if self.tty and done == self.total:
            self.stream.write("\n")
        self.stream.flush()


def explore(
    mode: str = ORDERED,
    quick: bool = False,
    rank_counts: Sequence[int] = (2, 3),
    strict: bool = False,
    families: Optional[List[Tuple[str, List[Workload]]]] = None,
    progress: bool = True,
    slot_model: str = FIFO,
) -> Report:
    """Explore every configured workload under ``mode``; return the table rows and the minimal counterexamples."""
    if mode not in EXPLORER_MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(EXPLORER_MODES)}")
    if slot_model not in SLOT_MODELS:
        raise ValueError(f"unknown slot model {slot_model!r}; expected one of {', '.join(SLOT_MODELS)}")
    families = build_workloads(quick) if families is None else families
    total = sum(len(workloads) for _, workloads in families)
    indicator = _Progress(mode, total) if progress else None
    started = time.monotonic()
    rows: List[FamilyRow] = []
    smallest: Dict[Tuple[str, Optional[str]], Counterexample] = {}
    done = 0
    for family, workloads in families:
        family_rows = {nranks: FamilyRow(family, nranks) for nranks in rank_counts}
        family_started = time.monotonic()
        for workload in workloads:
            exploration = explore_rank(workload, mode, slot_model)
            divergences = cross_rank_divergences(exploration.outcomes)  # the same for any number of ranks
            for nranks in rank_counts:
                result = check_config(workload, mode, exploration, nranks, divergences, slot_model)
                row = family_rows[nranks]
                row.configs += 1
                row.interleavings += result.joint_interleavings
                row.states += exploration.states
                row.outcomes += len(exploration.outcomes)
                for counterexample in result.counterexamples:
                    if counterexample.kind in LIMITATIONS and not strict:
                        row.limitations += 1
                    else:
                        row.violations += 1
                    key = (counterexample.kind, counterexample.shape)
                    if key not in smallest or _smaller(counterexample, smallest[key]):
                        smallest[key] = counterexample
            done += 1
            if indicator:
                indicator.update(done, family)
        elapsed = time.monotonic() - family_started
        for nranks in rank_counts:
            family_rows[nranks].seconds = elapsed
            rows.append(family_rows[nranks])
    return Report(
        mode=mode,
        slot_model=slot_model,
        rows=rows,
        counterexamples=sorted(smallest.values(), key=_counterexample_order),
        configs=sum(row.configs for row in rows),
        interleavings=sum(row.interleavings for row in rows),
        violations=sum(row.violations for row in rows),
        limitations=sum(row.limitations for row in rows),
        seconds=time.monotonic() - started,
        strict=strict,
    )


def _smaller(a: Counterexample, b: Counterexample) -> bool:
    def size(c: Counterexample):
        return (c.workload.size_key()[:3], c.nranks, sum(_switches(o.witness) for o in c.rank_outcomes))

    return size(a) < size(b)


def _counterexample_order(c: Counterexample):
    return (KIND_ORDER.index(c.kind), c.scenario or "~", c.shape or "", c.workload.size_key()[:3], c.nranks)


def render_table(report: Report) -> str:
    header = ("family", "ranks", "configs", "interleavings", "states", "outcomes", "violations", "limits", "family s")
    rows = [header]
    for row in report.rows:
        rows.append(
            (
                row.family,
                str(row.nranks),
                str(row.configs),
                str(row.interleavings),
                str(row.states),
                str(row.outcomes),
                str(row.violations),
                str(row.limitations),
                f"{row.seconds:.2f}",
            )
        )
    rows.append(
        (
            "total",
            "",
            str(report.configs),
            str(report.interleavings),
            str(sum(r.states for r in report.rows)),
            str(sum(r.outcomes for r in report.rows)),
            str(report.violations),
            str(report.limitations),
            f"{report.seconds:.2f}",
        )
    )
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    lines = []
    for number, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells))
        if number == 0 or number == len(rows) - 2:
            lines.append("  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _parse(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="fastdeploy-pd-fix verify",
        description="Enumerate every interleaving, on every rank, of the layer-0 signal and registration streams "
        "for bounded workloads, and check the cross-rank invariants of the release logic.",
    )
    parser.add_argument("--mode", choices=EXPLORER_MODES, default=ORDERED, help="release policy (default ordered)")
    parser.add_argument("--json-out", metavar="PATH", help="write the counterexamples and the summary as JSON")
    parser.add_argument("--quick", action="store_true", help="smaller workloads (fewer three-request templates)")
    parser.add_argument(
        "--strict", action="store_true", help="count the known limitations (stalls behind ghosts) as violations"
    )
    parser.add_argument(
        "--slot-model",
        choices=SLOT_MODELS,
        default=FIFO,
        help="idx_cache_task_dict as a per-slot FIFO (default; a slot is re-registered only after its request was "
        "sent) or as upstream's plain dict (a registration replaces the slot's entry)",
    )
    parser.add_argument("--show", type=int, default=3, metavar="N", help="print at most N counterexamples (default 3)")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    """``fastdeploy-pd-fix verify``: exit 0 iff no violation was found."""
    args = _parse(sys.argv[1:] if argv is None else argv)
    report = explore(args.mode, quick=args.quick, strict=args.strict, slot_model=args.slot_model)
    print(
        f"mode {report.mode}, slot model {report.slot_model}: {report.configs} configurations (workload x ranks), "
        "every merge of the two streams on every rank"
    )
    print(render_table(report))
    print(
        "interleavings: joint ones covered (merges per rank ** ranks); states: distinct (release state, outputs) "
        "per rank; outcomes: distinct per-rank results; violations: (configuration, kind) findings; limits: known, "
        "documented limitations, not counted"
        + (" (--strict: counted)" if args.strict else f" ({', '.join(LIMITATIONS)})")
    )
    violations = [c for c in report.counterexamples if args.strict or c.kind not in LIMITATIONS]
    limitations = [c for c in report.counterexamples if not args.strict and c.kind in LIMITATIONS]
    if violations:
        print(f"\n{len(violations)} kinds of violation; smallest counterexample of each (showing {args.show}):")
        for counterexample in violations[: args.show]:
            print()
            print(counterexample.render())
        for counterexample in violations[args.show :]:
            tag = f"[{counterexample.scenario}] " if counterexample.scenario else ""
            print(
                f"  also: {tag}{counterexample.kind} ({counterexample.shape}) in {counterexample.workload.describe()}"
            )
    if limitations:
        print("\nknown, documented limitations (not counted; --strict counts them):")
        for counterexample in limitations:
            print(f"  {counterexample.kind}: {LIMITATIONS[counterexample.kind]}")
            print(f"    e.g. {counterexample.workload.describe()}: {counterexample.details[0]}")
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as handle:
            json.dump(
                {
                    "summary": report.summary(),
                    "limitations": report.limitations,
                    "strict": report.strict,
                    "seconds": round(report.seconds, 3),
                    "table": [vars(row) for row in report.rows],
                    "counterexamples": [c.to_json() for c in report.counterexamples],
                },
                handle,
                indent=1,
            )
    print()
    print(json.dumps(report.summary()))
    return 0 if report.violations == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
