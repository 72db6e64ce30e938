"""Random stress workloads, each a function of its seed (see :mod:`fastdeploy_pd_fix.tools.stress`).

A workload is 2-4 requests of 1-3 chunks on slots 0..7, several requests per kv signal, occasional reuse of a slot
after its previous request's final chunk, every request registering in reads of 1-2 requests; a random merge of the
signal and registration streams per rank; and, from a random stream of its own, the engine's slot lifecycle
(aborts after some chunks or before the first, repeated D-parts, requests computed without registering) with the
ground truth of every signal task and the engine notices the plugin's engine-side patch would put (an abort right
after the aborted request's registration read, an orphan in place of its registration).
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from typing import Dict, List, Optional

from fastdeploy_pd_fix.standin.fastdeploy._standin.contract import NOTICE_ENTRY
from fastdeploy_pd_fix.standin.scenarios import validate_scenario
from fastdeploy_pd_fix.verify.workloads import RequestSpec, runnable_requests, same_slot_predecessors

REQUEST_IDS = "ABCD"
NUM_SLOTS = 8  # slots are drawn from 0..7, so that slot numbers are not simply the request order
REUSE_PROBABILITY = 0.2  # chance that a request (after the first) takes a slot an earlier request used
JOIN_PROBABILITY = 0.7  # chance that a runnable request advances in a given engine step
MAX_CHUNK_TOKENS = 8
ABORT_PROBABILITY = 0.25  # chance that a request is aborted after some of its chunks (possibly none)
ORPHAN_PROBABILITY = 0.15  # chance that a request (not aborted) is computed without registering
REPEAT_PROBABILITY = 0.2  # chance that a request's D-part comes twice in the read that registers it


@dataclass(frozen=True)
class GeneratedWorkload:
    """Requests (in scheduling order), the engine's steps, and the kv signal carrying each chunk of each request."""

    requests: List[RequestSpec]
    predecessors: List[Optional[int]]  # index of the request that used the slot before, per request
    steps: List[List[int]]  # per kv signal, the indexes of the requests running a chunk in it, in slot order
    signal_indexes: List[List[int]]  # per request, the kv signal of each of its chunks

    def predecessor_id(self, index: int) -> Optional[str]:
        predecessor = self.predecessors[index]
        return None if predecessor is None else self.requests[predecessor].request_id

    def signals(self) -> List[List[List[int]]]:
        """The kv signals as the stand-in takes them: ``[slot, chunk_token_offset, current_chunk_len]`` per task."""
        signals = []
        for number, step in enumerate(self.steps):
            signal = []
            for index in step:
                request = self.requests[index]
                chunk = self.signal_indexes[index].index(number)
                offset = request.chunks[chunk - 1] if chunk else 0
                signal.append([request.slot, offset, request.chunks[chunk] - offset])
            signals.append(signal)
        return signals


def _make_requests(rng: random.Random) -> List[RequestSpec]:
    requests: List[RequestSpec] = []
    used_slots: set = set()
    for request_id in REQUEST_IDS[: rng.randint(2, 4)]:
        lengths = [rng.randint(1, MAX_CHUNK_TOKENS) for _ in range(rng.randint(1, 3))]
        if used_slots and rng.random() < REUSE_PROBABILITY:
            slot = rng.choice(sorted(used_slots))
        else:
            slot = rng.choice([slot for slot in range(NUM_SLOTS) if slot not in used_slots])
        requests.append(RequestSpec(request_id, slot, tuple(itertools.accumulate(lengths))))
        used_slots.add(slot)
    return requests


def _make_workload(rng: random.Random, requests: List[RequestSpec]) -> GeneratedWorkload:
    """Engine steps: each runnable request advances by one chunk with some probability (at least one does)."""
    predecessors = same_slot_predecessors(requests)
    progress = [0] * len(requests)
    steps: List[List[int]] = []
    signal_indexes: List[List[int]] = [[] for _ in requests]
    while any(progress[index] < len(request.chunks) for index, request in enumerate(requests)):
        runnable = runnable_requests(requests, progress, predecessors)
        advancing = [index for index in runnable if rng.random() < JOIN_PROBABILITY] or [rng.choice(runnable)]
        step = sorted(advancing, key=lambda index: requests[index].slot)
        for index in step:
            progress[index] += 1
            signal_indexes[index].append(len(steps))
        steps.append(step)
    return GeneratedWorkload(requests, predecessors, steps, signal_indexes)


def recycle_dependencies(workload: GeneratedWorkload) -> Dict[str, set]:
    """For each request that reuses a slot: the requests whose registration its slot's recycling waits for.

    The engine recycles a slot once the previous request was sent on every rank. ``ordered`` sends the previous
    request's final chunk once every signal up to it is released, so once the previous request and every request
    with a chunk in or before that signal are registered (on every rank alike: registration is lockstep).
    """
    dependencies = {}
    for index, request in enumerate(workload.requests):
        predecessor = workload.predecessors[index]
        if predecessor is not None:
            final_signal = workload.signal_indexes[predecessor][-1]
            dependencies[request.request_id] = {
                other.request_id
                for other, indexes in zip(workload.requests, workload.signal_indexes)
                if indexes[0] <= final_signal
            } | {workload.requests[predecessor].request_id}
    return dependencies


def _make_registrations(rng: random.Random, workload: GeneratedWorkload) -> List[List[RequestSpec]]:
    """Reads of 1-2 requests; a request that reuses a slot comes in a later read than its recycle dependencies."""
    dependencies = recycle_dependencies(workload)
    registered: set = set()
    reads: List[List[RequestSpec]] = []
    while len(registered) < len(workload.requests):
        ready = [
            request
            for request in workload.requests
            if request.request_id not in registered and dependencies.get(request.request_id, set()) <= registered
        ]
        read = rng.sample(ready, min(len(ready), rng.randint(1, 2)))
        reads.append(read)
        registered.update(request.request_id for request in read)
    return reads


def stream_floors(workload: GeneratedWorkload, reads: List[List[RequestSpec]]):
    """What every rank must have seen before some events, when a request reuses a slot (the engine's order).

    Returns ``(signals_before_read, reads_before_signal)``: a read registering a request that reuses a slot comes
    after the previous request's final chunk signal; the signal of that request's first chunk comes after the reads
    of its recycle dependencies (the engine scheduled it only after its slot was recycled).
    """
    position = {request.request_id: index for index, request in enumerate(workload.requests)}
    read_of = {request.request_id: index for index, read in enumerate(reads) for request in read}
    signals_before_read = [0] * len(reads)
    reads_before_signal = [0] * len(workload.steps)
    for request_id, needed in recycle_dependencies(workload).items():
        index = position[request_id]
        final_of_previous = workload.signal_indexes[workload.predecessors[index]][-1]
        read = read_of[request_id]
        signals_before_read[read] = max(signals_before_read[read], final_of_previous + 1)
        first = workload.signal_indexes[index][0]
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


def owners_of(workload: GeneratedWorkload) -> List[List[str]]:
    """The ground truth: the request of each task of each kv signal."""
    return [[workload.requests[index].request_id for index in step] for step in workload.steps]


def add_lifecycle(scenario: dict, rng: random.Random) -> None:
    """Abort some requests, make some orphans, repeat some D-parts (see the module docstring).

    An abort removes the request's later chunks from the signals (an emptied signal goes, with its schedule events),
    lists it in ``aborted`` and puts its abort notice in a read of its own right after its registration read (on
    every rank, so the fence holds: the slot's next request computes only after its recycle dependencies'
    reads). It is drawn only where a chunk of a request that is not aborted stays in the last signal, so that the
    send loop takes every batch before the rank exits. An orphan's registration entry becomes its orphan notice
    (``orphans``); it is drawn among the requests without a task in the last signal, so that one still carries a
    batch, and at least one request still registers and finishes.
    """
    signals, owners = scenario["signals"], scenario["owners"]
    aborted = []
    for request in scenario["requests"]:
        if rng.random() >= ABORT_PROBABILITY:
            continue
        emitted = rng.randint(0, len(request["chunks"]) - 1)
        positions = [(index, task) for index, tasks in enumerate(owners) for task, owner in enumerate(tasks)]
        mine = [position for position in positions if owners[position[0]][position[1]] == request["request_id"]]
        kept = {(index, task) for index, task in positions if (index, task) not in mine[emitted:]}
        survivors = [index for index, task in kept if owners[index][task] not in aborted + [request["request_id"]]]
        if not survivors or max(survivors) < max(index for index, _ in kept):
            continue
        for index, task in reversed(mine[emitted:]):
            del signals[index][task], owners[index][task]
        aborted.append(request["request_id"])
        emitted_end = sum(request["chunks"][:emitted]) if emitted else None
        _add_read_after_registration(scenario, request, abort_entry(request, emitted_end))
    if aborted:
        _drop_empty_signals(scenario)
        scenario["aborted"] = aborted
    finishing = [request for request in scenario["requests"] if request["request_id"] not in aborted]
    orphans = []
    in_last_signal = set(scenario["owners"][-1])  # they keep a batch in the last signal (see above): never orphans
    for request in finishing[1:]:  # the first one always registers and finishes
        if rng.random() < ORPHAN_PROBABILITY and request["request_id"] not in in_last_signal:
            orphans.append(request["request_id"])
            read = _registration_read(scenario, request["request_id"])
            position = [entry.get("request_id") for entry in read].index(request["request_id"])
            read[position] = orphan_entry(request)
    if orphans:
        scenario["orphans"] = orphans
    for read in scenario["registrations"]:
        for request in list(read):
            if NOTICE_ENTRY not in request and rng.random() < REPEAT_PROBABILITY:
                read.append({**request, "parts": "decode"})


def abort_entry(request: dict, emitted_end: Optional[int]) -> dict:
    return {
        NOTICE_ENTRY: "abort",
        "request_id": request["request_id"],
        "slot": request["slot"],
        "emitted_end": emitted_end,
    }


def orphan_entry(request: dict) -> dict:
    need = sum(request["chunks"])
    return {
        NOTICE_ENTRY: "orphan",
        "request_id": request["request_id"],
        "slot": request["slot"],
        "need_prefill_tokens": need,
    }


def _registration_read(scenario: dict, request_id: str) -> list:
    return next(
        read for read in scenario["registrations"] if any(entry.get("request_id") == request_id for entry in read)
    )


def _add_read_after_registration(scenario: dict, request: dict, entry: dict) -> None:
    """Insert a read of ``entry`` right after the read registering ``request`` (and the notices already there), in
    the stream and in every schedule (renumbering the later ``reg<i>`` events)."""
    reads = scenario["registrations"]
    after = reads.index(_registration_read(scenario, request["request_id"]))
    while after + 1 < len(reads) and all(NOTICE_ENTRY in entry for entry in reads[after + 1]):
        after += 1  # behind the notices of requests registered in the same read
    reads.insert(after + 1, [entry])
    renumbered = {f"reg{old}": f"reg{old + 1}" for old in range(after + 1, len(reads) - 1)}
    schedules = []
    for schedule in scenario["schedules"]:
        tokens = []
        for token in schedule:
            tokens.append(renumbered.get(token, token))
            if token == f"reg{after}":
                tokens.append(f"reg{after + 1}")
        schedules.append(tokens)
    scenario["schedules"] = schedules


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
    workload = _make_workload(rng, _make_requests(rng))
    reads = _make_registrations(rng, workload)
    floors = stream_floors(workload, reads)
    scenario = {
        "name": f"stress-{seed}",
        "seed": seed,
        "requests": [
            {
                "request_id": request.request_id,
                "slot": request.slot,
                "chunks": [end - start for start, end in zip((0,) + request.chunks, request.chunks)],
                "after": workload.predecessor_id(index),
            }
            for index, request in enumerate(workload.requests)
        ],
        "signals": workload.signals(),
        "registrations": [
            [{"request_id": r.request_id, "slot": r.slot, "need_prefill_tokens": r.need} for r in read]
            for read in reads
        ],
        "schedules": [_make_schedule(rng, *floors) for _ in range(nranks)],
        "owners": owners_of(workload),
    }
    if lifecycle:
        add_lifecycle(scenario, random.Random(f"lifecycle-{seed}"))
    validate_scenario(scenario)
    return scenario
