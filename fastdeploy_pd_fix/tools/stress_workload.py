"""Random stress workloads, each a function of its seed (see :mod:`fastdeploy_pd_fix.tools.stress`).

A workload is 2-4 requests of 1-3 chunks on slots 0..7, several requests per kv signal, occasional reuse of a slot
after its previous request's final chunk, every request registering in reads of 1-2 requests; a random merge of the
signal and registration streams per rank; and, from a random stream of its own, the engine's slot lifecycle
(aborts after some chunks or before the first, repeated D-parts, requests computed without registering) and the
engine notices the plugin's engine-side patch would put (an abort right after the aborted request's registration
read, an orphan in place of its registration). The requests and their fates are an engine history
(:mod:`fastdeploy_pd_fix.engine_history`): the signals, the cache-info reads and the ground truth of every signal
task are derived from it.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import replace
from typing import Dict, List, Tuple

from fastdeploy_pd_fix.engine_history.occupancy import (
    ABORT_NOTICE,
    DECODE_PART,
    NOTICE_EVENTS,
    ORPHAN_NOTICE,
    PREFILL_PART,
    Occupancy,
    prefill_request,
)
from fastdeploy_pd_fix.engine_history.scenario import cache_reads, signal_entries
from fastdeploy_pd_fix.engine_history.schedules import runnable_requests, same_slot_predecessors
from fastdeploy_pd_fix.engine_history.streams import CacheEvent, Schedule, ScheduledHistory, schedule_signals
from fastdeploy_pd_fix.standin.scenarios import validate_scenario

REQUEST_IDS = "ABCD"
NUM_SLOTS = 8  # slots are drawn from 0..7, so that slot numbers are not simply the request order
REUSE_PROBABILITY = 0.2  # chance that a request (after the first) takes a slot an earlier request used
JOIN_PROBABILITY = 0.7  # chance that a runnable request advances in a given engine step
MAX_CHUNK_TOKENS = 8
ABORT_PROBABILITY = 0.25  # chance that a request is aborted after some of its chunks (possibly none)
ORPHAN_PROBABILITY = 0.15  # chance that a request (not aborted) is computed without registering
REPEAT_PROBABILITY = 0.2  # chance that a request's D-part comes twice in the read that registers it


def _make_requests(rng: random.Random) -> List[Occupancy]:
    requests: List[Occupancy] = []
    used_slots: set = set()
    for request_id in REQUEST_IDS[: rng.randint(2, 4)]:
        lengths = [rng.randint(1, MAX_CHUNK_TOKENS) for _ in range(rng.randint(1, 3))]
        if used_slots and rng.random() < REUSE_PROBABILITY:
            slot = rng.choice(sorted(used_slots))
        else:
            slot = rng.choice([slot for slot in range(NUM_SLOTS) if slot not in used_slots])
        requests.append(prefill_request(request_id, slot, tuple(itertools.accumulate(lengths))))
        used_slots.add(slot)
    return requests


def _schedule_requests(rng: random.Random, requests: List[Occupancy]) -> ScheduledHistory:
    """Engine steps: each runnable request advances by one chunk with some probability (at least one does)."""
    predecessors = same_slot_predecessors(requests)
    progress = [0] * len(requests)
    schedule: List[Tuple[Tuple[int, int], ...]] = []
    while any(progress[index] < len(request.ends) for index, request in enumerate(requests)):
        runnable = runnable_requests(requests, progress, predecessors)
        advancing = [index for index in runnable if rng.random() < JOIN_PROBABILITY] or [rng.choice(runnable)]
        step = sorted(advancing, key=lambda index: requests[index].slot)
        schedule.append(tuple((index, progress[index]) for index in step))
        for index in step:
            progress[index] += 1
    return ScheduledHistory(tuple(requests), tuple(schedule))


def recycle_dependencies(scheduled: ScheduledHistory) -> Dict[str, set]:
    """For each request that reuses a slot: the requests whose registration its slot's recycling waits for.

    The engine recycles a slot once the previous request was sent on every rank. ``ordered`` sends the previous
    request's final chunk once every signal up to it is released, so once the previous request and every request
    with a chunk in or before that signal are registered (on every rank alike: registration is lockstep).
    """
    dependencies = {}
    signal_indexes = scheduled.signal_indexes
    for request, predecessor in zip(scheduled.occupancies, scheduled.predecessors):
        if predecessor is not None:
            final_signal = signal_indexes[predecessor][-1]
            dependencies[request.request_id] = {
                other.request_id
                for other, indexes in zip(scheduled.occupancies, signal_indexes)
                if indexes[0] <= final_signal
            } | {scheduled.occupancies[predecessor].request_id}
    return dependencies


def _make_registrations(rng: random.Random, scheduled: ScheduledHistory) -> List[List[Occupancy]]:
    """Reads of 1-2 requests; a request that reuses a slot comes in a later read than its recycle dependencies."""
    dependencies = recycle_dependencies(scheduled)
    registered: set = set()
    reads: List[List[Occupancy]] = []
    while len(registered) < len(scheduled.occupancies):
        ready = [
            request
            for request in scheduled.occupancies
            if request.request_id not in registered and dependencies.get(request.request_id, set()) <= registered
        ]
        read = rng.sample(ready, min(len(ready), rng.randint(1, 2)))
        reads.append(read)
        registered.update(request.request_id for request in read)
    return reads


def stream_floors(scheduled: ScheduledHistory, reads: List[List[Occupancy]]):
    """What every rank must have seen before some events, when a request reuses a slot (the engine's order).

    Returns ``(signals_before_read, reads_before_signal)``: a read registering a request that reuses a slot comes
    after the previous request's final chunk signal; the signal of that request's first chunk comes after the reads
    of its recycle dependencies (the engine scheduled it only after its slot was recycled).
    """
    position = {request.request_id: index for index, request in enumerate(scheduled.occupancies)}
    read_of = {request.request_id: index for index, read in enumerate(reads) for request in read}
    signals_before_read = [0] * len(reads)
    reads_before_signal = [0] * len(scheduled.schedule)
    signal_indexes, predecessors = scheduled.signal_indexes, scheduled.predecessors
    for request_id, needed in recycle_dependencies(scheduled).items():
        index = position[request_id]
        final_of_previous = signal_indexes[predecessors[index]][-1]
        read = read_of[request_id]
        signals_before_read[read] = max(signals_before_read[read], final_of_previous + 1)
        first = signal_indexes[index][0]
        reads_before_signal[first] = max(reads_before_signal[first], 1 + max(read_of[other] for other in needed))
    return signals_before_read, reads_before_signal


def _make_schedule(rng: random.Random, signals_before_read: List[int], reads_before_signal: List[int]) -> List[str]:
    """A random merge of the two streams within the floors; ``bias`` (drawn per rank) is the chance of a signal."""
    bias = rng.uniform(0.1, 0.9)
    schedule: List[str] = []
    signal, read = 0, 0
    while signal < len(reads_before_signal) or read < len(signals_before_read):
        can_signal = signal < len(reads_before_signal) and read >= reads_before_signal[signal]
        can_read = read < len(signals_before_read) and signal >= signals_before_read[read]
        if not (can_signal or can_read):
            raise RuntimeError(f"stream floors admit no merge: {signals_before_read} {reads_before_signal}")
        if can_signal and (not can_read or rng.random() < bias):
            schedule.append(f"sig{signal}")
            signal += 1
        else:
            schedule.append(f"reg{read}")
            read += 1
    return schedule


def _drawn_history(
    rng: random.Random, scheduled: ScheduledHistory, reads: List[List[CacheEvent]], schedules: List[List[str]]
) -> List[Occupancy]:
    """Abort some requests, make some orphans, repeat some D-parts (see the module docstring); return the history.

    An abort ends the request after its emitted chunks and puts its abort notice in a read of its own right after its
    registration read (on every rank, so the fence holds: the slot's next request computes only after its recycle
    dependencies' reads). It is drawn only where a chunk of a request that is not aborted stays in the last signal,
    so that the send loop takes every batch before the rank exits. An orphan's registration becomes its orphan notice;
    it is drawn among the requests without a task in the last signal, so that one still carries a batch, and at least
    one request still registers and finishes. ``reads`` and ``schedules`` are updated in place.
    """
    history = list(scheduled.occupancies)
    for index, request in enumerate(scheduled.occupancies):
        if rng.random() >= ABORT_PROBABILITY:
            continue
        aborted = replace(request, aborted_after=rng.randint(0, len(request.ends) - 1))
        if _keeps_a_live_last_signal(history[:index] + [aborted] + history[index + 1 :], scheduled.schedule):
            history[index] = aborted
            _add_read_after_registration(reads, schedules, index, [(ABORT_NOTICE, index)])
    in_last_signal = set(_last_signal_owners(history, scheduled.schedule))  # they keep a batch there: never orphans
    finishing = [index for index, occupancy in enumerate(history) if occupancy.completes]
    for index in finishing[1:]:  # the first one always registers and finishes
        if rng.random() < ORPHAN_PROBABILITY and index not in in_last_signal:
            history[index] = replace(history[index], registers=False)
            read = next(read for read in reads if (PREFILL_PART, index) in read)
            read[read.index((PREFILL_PART, index))] = (ORPHAN_NOTICE, index)
            read.remove((DECODE_PART, index))
    for read in reads:
        for kind, index in list(read):
            if kind == PREFILL_PART and rng.random() < REPEAT_PROBABILITY:
                read.append((DECODE_PART, index))
    return history


def _last_signal_owners(history: List[Occupancy], schedule: Schedule) -> List[int]:
    """The requests (indexes) with a task in the last kv signal that still has one."""
    emitted = [[index for index, chunk in step if chunk < history[index].emitted] for step in schedule]
    return [indexes for indexes in emitted if indexes][-1] if any(emitted) else []


def _keeps_a_live_last_signal(history: List[Occupancy], schedule: Schedule) -> bool:
    """Whether the last kv signal that still has a task has one of a request that is not aborted."""
    return any(history[index].completes for index in _last_signal_owners(history, schedule))


def _add_read_after_registration(
    reads: List[List[CacheEvent]], schedules: List[List[str]], index: int, read: List[CacheEvent]
) -> None:
    """Insert ``read`` right after the read registering request ``index`` (and the notices already there), in the
    stream and in every schedule (renumbering the later ``reg<i>`` events)."""
    after = next(number for number, events in enumerate(reads) if (PREFILL_PART, index) in events)
    while after + 1 < len(reads) and all(kind in NOTICE_EVENTS for kind, _ in reads[after + 1]):
        after += 1  # behind the notices of requests registered in the same read
    reads.insert(after + 1, read)
    renumbered = {f"reg{old}": f"reg{old + 1}" for old in range(after + 1, len(reads) - 1)}
    for schedule in schedules:
        tokens = []
        for token in schedule:
            tokens.append(renumbered.get(token, token))
            if token == f"reg{after}":
                tokens.append(f"reg{after + 1}")
        schedule[:] = tokens


def _drop_empty_signals(scenario: dict) -> None:
    """Remove signals left without a task, renumbering the ``sig<i>`` events of every schedule."""
    kept = [index for index, signal in enumerate(scenario["signals"]) if signal]
    renumbered = {f"sig{old}": f"sig{new}" for new, old in enumerate(kept)}
    scenario["signals"] = [scenario["signals"][index] for index in kept]
    scenario["owners"] = [scenario["owners"][index] for index in kept]
    scenario["schedules"] = [
        [renumbered.get(token, token) for token in schedule if not token.startswith("sig") or token in renumbered]
        for schedule in scenario["schedules"]
    ]


def generate_scenario(seed: int, nranks: int = 2, lifecycle: bool = True) -> dict:
    """The scenario of ``seed``: a random workload and an independent random merge of its two streams per rank;
    with ``lifecycle``, aborts and repeated D-parts drawn from a second stream of the seed."""
    rng = random.Random(seed)
    scheduled = _schedule_requests(rng, _make_requests(rng))
    registration_reads = _make_registrations(rng, scheduled)
    floors = stream_floors(scheduled, registration_reads)
    schedules = [_make_schedule(rng, *floors) for _ in range(nranks)]
    position = {request.request_id: index for index, request in enumerate(scheduled.occupancies)}
    reads = [
        [(part, position[request.request_id]) for request in read for part in (PREFILL_PART, DECODE_PART)]
        for read in registration_reads
    ]
    history = scheduled.occupancies
    if lifecycle:
        history = _drawn_history(random.Random(f"lifecycle-{seed}"), scheduled, reads, schedules)
    signals, owners = schedule_signals(history, scheduled.schedule)
    scenario = {
        "name": f"stress-{seed}",
        "seed": seed,
        "requests": [
            {
                "request_id": request.request_id,
                "slot": request.slot,
                "chunks": [end - start for start, end in zip((0,) + request.ends, request.ends)],
                "after": None if predecessor is None else scheduled.occupancies[predecessor].request_id,
            }
            for request, predecessor in zip(scheduled.occupancies, scheduled.predecessors)
        ],
        "signals": signal_entries(signals),
        "registrations": cache_reads(history, reads),
        "schedules": schedules,
        "owners": [list(step) for step in owners],
    }
    aborted = [occupancy.request_id for occupancy in history if not occupancy.completes]
    if aborted:
        _drop_empty_signals(scenario)
        scenario["aborted"] = aborted
    orphans = [occupancy.request_id for occupancy in history if not occupancy.registers]
    if orphans:
        scenario["orphans"] = orphans
    validate_scenario(scenario)
    return scenario
