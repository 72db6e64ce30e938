"""The two rank-invariant streams of an engine history, with the ground truth of every signal task.

Every tensor-parallel rank sees the same two streams: the layer-0 kv signals (each a tuple of tasks
``(slot, chunk_offset, prefilled_token_num)``) and the cache info (lockstep across ranks). Only when each rank's
threads see them differs. Two forms:

* :class:`Workload` (the race workloads): requests that start at 0 and complete, one engine schedule
  (:mod:`.schedules`) and one lockstep order of whole registrations (both parts at once)
  (:func:`registration_streams`);
* :class:`LifecycleWorkload` (:func:`build`): a history with its slot lifecycle: signals (``signal_tids``,
  ``tid_owner``: which occupancy each task is); cache info as P-parts and D-parts in lockstep order (a D-part
  completes a registration when its P-part is in ``cache_info``, so a repeat counts again only while the rank has
  not yet cleaned the request up, which depends on the rank's send timing as in the real messager); with the
  engine-side patch on (:func:`with_notices`; release rule 8), also the engine's notices in the same stream:
  ``ABORT(slot, rid, emitted_end)`` for every aborted occupancy, registered or orphan (``emitted_end``: the end of
  its last emitted chunk, None when it emitted nothing), after the occupancy's own parts that the engine puts
  before the abort (a late D-part comes after it) and before the slot's next occupant's parts; and
  ``ORPHAN(slot, rid, need)`` at the admission of every occupancy that does not register, before anything else of
  it. An aborted orphan gets both.

With notices there is no limit: the notices decide every history the two streams alone cannot
(:data:`~.occupancy.LIMIT_REASONS`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from fastdeploy_pd_fix.engine_history.occupancy import (
    ABORT_NOTICE,
    DECODE_PART,
    LATE,
    LIMIT_REASONS,
    NORMAL,
    NOTICE_EVENTS,
    ORPHAN_NOTICE,
    PREFILL_PART,
    Occupancy,
    ambiguity_features,
)
from fastdeploy_pd_fix.engine_history.schedules import same_slot_predecessors
from fastdeploy_pd_fix.policy.release import Registration, SignalTask

#: A cache-info event: (P, D, ABORT or ORPHAN, index of its occupancy).
CacheEvent = Tuple[str, int]
#: An engine schedule: per kv signal, (occupancy index, chunk index) of each task, in the order the signal lists them.
Schedule = Sequence[Sequence[Tuple[int, int]]]


@dataclass(frozen=True)
class LifecycleWorkload:
    """The two streams of one engine history, with the ground truth of every signal task."""

    family: str
    occupancies: Tuple[Occupancy, ...]
    signals: Tuple[Tuple[SignalTask, ...], ...]
    signal_tids: Tuple[Tuple[int, ...], ...]  # ground-truth id of each task, parallel to ``signals``
    tid_owner: Tuple[int, ...]  # task id -> index of its occupancy
    cache: Tuple[CacheEvent, ...]  # in lockstep order
    cache_gate: Tuple[int, ...]  # per cache event: the occupancy whose admission gates it
    features: frozenset = field(default_factory=frozenset)
    notices: bool = False  # the cache info carries the engine's notices (engine-side patch on)

    @property
    def announced(self) -> bool:
        """Whether the cache-info stream starts with the engine's announcement (release rule 10)."""
        return self.notices

    def signal_gates(self, index: int) -> Tuple[int, ...]:
        return tuple(self.tid_owner[tid] for tid in self.signal_tids[index])

    def final_tid(self, occupancy: int) -> int:
        return max(tid for tid, owner in enumerate(self.tid_owner) if owner == occupancy)

    def limit_reason(self) -> Optional[str]:
        """Why the two streams cannot decide this workload, or None when they can (or notices decide it)."""
        if not self.features or self.notices:
            return None
        return "; ".join(f"{feature}: {LIMIT_REASONS[feature]}" for feature in sorted(self.features))

    def event_text(self, position: int) -> str:
        """Cache-info event ``position`` as text: ``P(A)``, ``D(A)``, ``ABORT(A,2)`` (emitted_end), ``ORPHAN(O,4)``."""
        kind, index = self.cache[position]
        occupancy = self.occupancies[index]
        if kind == ABORT_NOTICE:
            return f"{kind}({occupancy.request_id},{occupancy.emitted_end})"
        if kind == ORPHAN_NOTICE:
            return f"{kind}({occupancy.request_id},{occupancy.need})"
        return f"{kind}({occupancy.request_id})"

    def size_key(self) -> tuple:
        return (len(self.occupancies), len(self.signals) + len(self.cache), len(self.signals), self.describe())

    def describe(self) -> str:
        occupancies = "; ".join(occupancy.describe() for occupancy in self.occupancies)
        signals = signals_text(self.signals)
        cache = " ".join(self.event_text(position) for position in range(len(self.cache))) or "-"
        return f"{occupancies} | S: {signals or '-'} | C: {cache}"

    def to_json(self) -> dict:
        return {
            "family": self.family,
            "occupancies": [occupancy.describe() for occupancy in self.occupancies],
            "signals": [[list(task) for task in tasks] for tasks in self.signals],
            "signal_origins": [
                [self.occupancies[self.tid_owner[t]].request_id for t in tids] for tids in self.signal_tids
            ],
            "cache_info": [self.event_text(position) for position in range(len(self.cache))],
            "features": sorted(self.features),
            "notices": self.notices,
        }


def build(
    family: str, occupancies: Sequence[Occupancy], signal_slots=None, cache_slots=None, notices: bool = False
) -> LifecycleWorkload:
    """The streams of one engine history. ``signal_slots`` (per signal: a slot, or a tuple of slots for a signal
    listing several) interleaves the per-slot signal sequences, ``cache_slots`` the per-slot P- and D-parts; both
    default to slot by slot.

    With ``notices``, a notice comes right after the slot's cache-info event before it (a slot's leading notices
    first of all), unless that would make it wait for a send the event before it did not wait for: an ``ORPHAN``
    put at an admission that waits for an earlier request on the slot to be sent. Such a notice comes right before
    the slot's next part instead (or last): placed earlier it would hold other slots' parts behind it, which the
    engine puts whenever they arrive, a hang the engine does not have."""
    occupancies = tuple(occupancies)
    slots = sorted({occupancy.slot for occupancy in occupancies})
    slot_signals: Dict[int, List[Tuple[SignalTask, int]]] = {slot: [] for slot in slots}
    slot_cache: Dict[int, List[Tuple[str, int]]] = {slot: [] for slot in slots}
    tid_owner: List[int] = []
    for slot in slots:
        late: List[Tuple[str, int]] = []  # parts put right after the slot's next occupant's D-part
        for index, occupancy in enumerate(occupancies):
            if occupancy.slot != slot:
                continue
            events = slot_cache[slot]
            if not occupancy.registers and notices:
                events.append((ORPHAN_NOTICE, index))  # at its admission, before it computes
            if occupancy.registers:
                events.append((PREFILL_PART, index))
                if occupancy.dpart == NORMAL:
                    events.append((DECODE_PART, index))
                    if occupancy.repeats_immediately:
                        events.append((DECODE_PART, index))
                    events.extend(late)
                    late = []
                late += [(DECODE_PART, index)] * ((occupancy.dpart == LATE) + occupancy.repeats_late)
            if occupancy.aborted_after is not None and notices:
                events.append((ABORT_NOTICE, index))  # before the slot is freed for the next occupant
            for chunk in range(occupancy.emitted):
                slot_signals[slot].append((occupancy.signal_task(chunk), len(tid_owner)))
                tid_owner.append(index)
        slot_cache[slot].extend(late)
    if signal_slots is None:
        signal_slots = [slot for slot in slots for _ in slot_signals[slot]]
    if cache_slots is None:
        cache_slots = [slot for slot in slots for kind, _ in slot_cache[slot] if kind not in NOTICE_EVENTS]
    signals, signal_tids = [], []
    cursor = {slot: 0 for slot in slots}
    for step in signal_slots:
        tasks = []
        for slot in step if isinstance(step, tuple) else (step,):
            tasks.append(slot_signals[slot][cursor[slot]])
            cursor[slot] += 1
        signals.append(tuple(task for task, _ in tasks))
        signal_tids.append(tuple(tid for _, tid in tasks))
    assert all(cursor[slot] == len(slot_signals[slot]) for slot in slots)
    cache, cache_gate, latest = [], [], {}
    cursor = {slot: 0 for slot in slots}

    def put(slot: int) -> None:
        event = slot_cache[slot][cursor[slot]]
        cursor[slot] += 1
        cache.append(event)
        latest[slot] = max(latest.get(slot, -1), event[1])  # a late part sits behind the next occupant's parts
        cache_gate.append(latest[slot])

    def next_is_notice(slot: int) -> bool:
        return cursor[slot] < len(slot_cache[slot]) and slot_cache[slot][cursor[slot]][0] in NOTICE_EVENTS

    def waits_no_longer(slot: int) -> bool:
        """Whether the slot's next notice waits for no send the slot's previous event did not wait for."""
        index = slot_cache[slot][cursor[slot]][1]
        return not any(
            occupancies[j].transfers and occupancies[j].slot == slot for j in range(max(latest.get(slot, 0), 0), index)
        )

    for slot in slots:
        while next_is_notice(slot) and waits_no_longer(slot):
            put(slot)
    for slot in cache_slots:
        while next_is_notice(slot):  # held back so far: right before the slot's next part
            put(slot)
        put(slot)
        while next_is_notice(slot) and waits_no_longer(slot):
            put(slot)
    for slot in slots:
        while next_is_notice(slot):
            put(slot)
    assert all(cursor[slot] == len(slot_cache[slot]) for slot in slots)
    return LifecycleWorkload(
        family,
        occupancies,
        tuple(signals),
        tuple(signal_tids),
        tuple(tid_owner),
        tuple(cache),
        tuple(cache_gate),
        ambiguity_features(occupancies),
        notices,
    )


def with_notices(workload: LifecycleWorkload) -> LifecycleWorkload:
    """The same engine history and interleavings of the two streams, its cache info carrying the engine's notices."""
    signal_slots = [
        tuple(slot for slot, _, _ in tasks) if len(tasks) > 1 else tasks[0][0] for tasks in workload.signals
    ]
    cache_slots = [workload.occupancies[index].slot for kind, index in workload.cache if kind not in NOTICE_EVENTS]
    return build(workload.family, workload.occupancies, signal_slots, cache_slots, notices=True)


@dataclass(frozen=True)
class Workload:
    """The two rank-invariant streams, plus which request produced each task (the ground truth for the checks)."""

    requests: Tuple[Occupancy, ...]  # each a prefill_request
    signals: Tuple[Tuple[SignalTask, ...], ...]
    origins: Tuple[Tuple[str, ...], ...]  # request id of each task, parallel to ``signals``
    registrations: Tuple[Registration, ...]
    family: str = ""

    @property
    def has_ghost(self) -> bool:
        return any(not request.registers for request in self.requests)

    @property
    def announced(self) -> bool:
        """Whether the cache-info stream starts with the engine's announcement (release rule 10). A classic workload
        models the default deployment, notices on, where the engine announces a request computed without
        registering; a ghost here is one it did not announce, so a workload with a ghost is the notices-off case
        (the lifecycle families explore announced orphans)."""
        return not self.has_ghost

    @property
    def registering_ids(self) -> frozenset:
        return frozenset(request.request_id for request in self.requests if request.registers)

    def merges(self) -> int:
        """Number of merges of the two streams on one rank."""
        return math.comb(len(self.signals) + len(self.registrations), len(self.signals))

    def size_key(self) -> tuple:
        chunks = sum(len(request.ends) for request in self.requests)
        return (len(self.requests), chunks, len(self.signals), self.describe())

    def describe(self) -> str:
        requests = " ".join(map(request_text, self.requests))
        signals = signals_text(self.signals)
        registrations = " ".join(registration.request_id for registration in self.registrations) or "-"
        return f"{requests} | signals {signals} | registrations {registrations}"

    def to_json(self) -> dict:
        return {
            "family": self.family,
            "requests": [
                {"id": r.request_id, "slot": r.slot, "chunks": list(r.ends), "registers": r.registers}
                for r in self.requests
            ],
            "signals": [[list(task) for task in signal] for signal in self.signals],
            "signal_origins": [list(origins) for origins in self.origins],
            "registrations": [
                {"slot": r.slot, "request_id": r.request_id, "need_prefill_tokens": r.need_prefill_tokens}
                for r in self.registrations
            ],
        }


def task_text(task: SignalTask) -> str:
    """A signal task as ``(slot,offset-end)``."""
    slot, chunk_offset, prefilled_token_num = task
    return f"({slot},{chunk_offset}-{prefilled_token_num})"


def signals_text(signals: Sequence[Sequence[SignalTask]]) -> str:
    """Kv signals as ``[(slot,offset-end),...] [...]``."""
    return " ".join("[" + ",".join(map(task_text, tasks)) + "]" for tasks in signals)


def request_text(request: Occupancy) -> str:
    """A request of a race workload as ``A@0[2,4]`` (its chunk ends), ``(never registers)`` for a ghost."""
    chunks = ",".join(map(str, request.ends))
    return f"{request.request_id}@{request.slot}[{chunks}]" + ("" if request.registers else "(never registers)")


def registration_streams(
    family: str,
    requests: Sequence[Occupancy],
    schedule: Schedule,
    order: Sequence[Occupancy],
) -> Workload:
    """The streams of ``requests`` run by the engine ``schedule`` and registered in ``order``."""
    signals, origins = schedule_signals(requests, schedule)
    registrations = tuple(request.registration() for request in order)
    return Workload(tuple(requests), signals, origins, registrations, family)


def schedule_signals(
    occupancies: Sequence[Occupancy], schedule: Schedule
) -> Tuple[Tuple[Tuple[SignalTask, ...], ...], Tuple[Tuple[str, ...], ...]]:
    """The kv signals of an engine ``schedule`` and the request of each task: the chunks an occupancy emits (an
    aborted one's later chunks are not computed; a step left without a task gives an empty signal)."""
    steps = [[(index, chunk) for index, chunk in step if chunk < occupancies[index].emitted] for step in schedule]
    signals = tuple(tuple(occupancies[index].signal_task(chunk) for index, chunk in step) for step in steps)
    origins = tuple(tuple(occupancies[index].request_id for index, _ in step) for step in steps)
    return signals, origins


@dataclass(frozen=True)
class ScheduledHistory:
    """An engine history and one engine schedule over it."""

    occupancies: Tuple[Occupancy, ...]
    schedule: Tuple[Tuple[Tuple[int, int], ...], ...]

    @property
    def predecessors(self) -> List[Optional[int]]:
        """Per occupancy, the index of the one that used its slot before (None for a slot's first)."""
        return same_slot_predecessors(self.occupancies)

    @property
    def signal_indexes(self) -> List[List[int]]:
        """Per occupancy, the kv signal of each of its chunks."""
        indexes: List[List[int]] = [[] for _ in self.occupancies]
        for number, step in enumerate(self.schedule):
            for index, _ in step:
                indexes[index].append(number)
        return indexes
