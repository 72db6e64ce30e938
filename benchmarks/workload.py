"""A prefill workload as the two rank-invariant streams a cache messager sees, and the release policies driven by it.

Time is virtual, in milliseconds. The engine runs one prefill step every ``step_ms``. Layer 0 of a step is done
``signal_offset_ms`` into it and produces one layer-0 kv signal holding every task of the step, in batch order. A
request is scheduled into the lowest free engine slot, prefilled in one or more chunks (one chunk per step), and
registered (``_add_cache_task_thread`` completes its transfer task) ``registration_delay_ms`` after it was scheduled.
A slot goes to the next request only once its request has run its final chunk and has been registered: the engine
keeps a slot until its transfer is done, and the transfer needs the registration. Registrations of one slot
therefore arrive in scheduling order, as they do in FastDeploy. The requests are an engine history of the model
(:mod:`fastdeploy_pd_fix.engine_history`), each occupancy timed (:class:`TimedRequest`); the model derives the signals
and the explorer's form of the two streams.

:func:`drive_release` feeds the merged, time-ordered streams to the real release policies of
:mod:`fastdeploy_pd_fix.policy.release` through the one-rank driver the explorer uses
(:func:`fastdeploy_pd_fix.verify.workloads.drive`, ``idx_cache_task_dict`` as FastDeploy's plain dict), exactly as
one rank's two threads would, and records what each event released.
"""

from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass
from typing import Deque, Dict, List, Optional, Tuple

from fastdeploy_pd_fix.engine_history import streams
from fastdeploy_pd_fix.engine_history.occupancy import Occupancy, prefill_request
from fastdeploy_pd_fix.policy.release import Batch, SignalTask, Task, make_release
from fastdeploy_pd_fix.verify.workloads import DICT, REGISTRATION_EVENT, SIGNAL_EVENT, drive


@dataclass(frozen=True)
class TimedRequest:
    """One request of the engine history, timed: when it was scheduled and how late it registers."""

    occupancy: Occupancy  # computed from token 0, completing normally
    scheduled_ms: float
    registration_delay_ms: float

    @property
    def registered_ms(self) -> float:
        return self.scheduled_ms + self.registration_delay_ms


@dataclass(frozen=True)
class TimedSignal:
    """One layer-0 kv signal of the history's schedule (:func:`~fastdeploy_pd_fix.engine_history.streams.schedule_signals`)
    at its arrival time: its tasks ``(slot, chunk_offset, prefilled_token_num)`` in engine order, and the request of
    each task."""

    index: int
    time_ms: float
    tasks: Tuple[SignalTask, ...]
    owners: Tuple[str, ...]

    @property
    def batch(self) -> Batch:
        """The signal's tasks as one batch puts them into the queue: ``(slot, prefilled_token_num)``."""
        return tuple((slot, prefilled_token_num) for slot, _, prefilled_token_num in self.tasks)


@dataclass(frozen=True)
class Event:
    time_ms: float
    kind: str  # SIGNAL_EVENT or REGISTRATION_EVENT
    signal: Optional[TimedSignal] = None
    request: Optional[TimedRequest] = None


@dataclass
class TimedHistory:
    """An engine history of the model, timed: its requests (whose registrations form one stream) and the layer-0
    signals of its schedule (the other)."""

    requests: List[TimedRequest]
    signals: List[TimedSignal]

    def events(self) -> List[Event]:
        """Both streams merged by time; at equal times a registration comes first, then stream order."""
        keyed = [
            ((request.registered_ms, 0, index), Event(request.registered_ms, REGISTRATION_EVENT, request=request))
            for index, request in enumerate(self.requests)
        ]
        keyed += [
            ((signal.time_ms, 1, signal.index), Event(signal.time_ms, SIGNAL_EVENT, signal=signal))
            for signal in self.signals
        ]
        return [event for _, event in sorted(keyed, key=lambda item: item[0])]

    def streams(self, events: List[Event]) -> streams.Workload:
        """The two streams as the explorer's workloads hold them, registrations in the order of ``events``."""
        return streams.Workload(
            requests=tuple(request.occupancy for request in self.requests),
            signals=tuple(signal.tasks for signal in self.signals),
            origins=tuple(signal.owners for signal in self.signals),
            registrations=tuple(
                event.request.occupancy.registration() for event in events if event.kind == REGISTRATION_EVENT
            ),
        )


@dataclass(frozen=True)
class WorkloadSpec:
    """Parameters of a generated workload (defaults: a busy prefill instance with moderately late registrations)."""

    requests_per_step: int = 16
    steps: int = 40  # steps that schedule new requests; the workload then runs until every request is prefilled
    seed: int = 0
    step_ms: float = 40.0
    signal_offset_ms: float = 2.0
    delay_median_ms: float = 10.0  # registration delay: lognormal with this median ...
    delay_sigma: float = 1.0  # ... and this sigma of its logarithm
    chunk_tokens: int = 2048
    chunk_weights: Tuple[float, ...] = (0.6, 0.25, 0.1, 0.05)  # P(1 chunk), P(2 chunks), ...
    num_slots: int = 512


def make_workload(spec: WorkloadSpec) -> TimedHistory:
    """A seeded workload: up to ``requests_per_step`` tasks per signal, chunked requests, late registrations. The
    engine history and its schedule are timed here; the signals they make come from the model
    (:func:`fastdeploy_pd_fix.engine_history.streams.schedule_signals`)."""
    rng = random.Random(spec.seed)
    requests: List[TimedRequest] = []
    schedule: List[List[Tuple[int, int]]] = []  # per signal: (request index, chunk index), in batch order
    times_ms: List[float] = []
    free_from: Dict[int, float] = {}  # used slot -> time from which it may be scheduled again
    active: List[List[int]] = []  # [request index, index of its next chunk], in batch order
    step = 0
    while step < spec.steps or active:
        start_ms = step * spec.step_ms
        if step < spec.steps:
            busy = {requests[index].occupancy.slot for index, _ in active}
            while len(active) < spec.requests_per_step:
                slot = _lowest_free_slot(free_from, busy, start_ms, spec.num_slots)
                if slot is None:
                    break
                requests.append(_new_request(rng, spec, f"r{len(requests)}", slot, start_ms))
                active.append([len(requests) - 1, 0])
                busy.add(slot)
        if active:
            time_ms = start_ms + spec.signal_offset_ms
            schedule.append([(index, chunk) for index, chunk in active])
            times_ms.append(time_ms)
            for entry in active:
                entry[1] += 1
            for index, chunk in active:
                request = requests[index]
                if chunk == len(request.occupancy.ends):
                    free_from[request.occupancy.slot] = max(time_ms, request.registered_ms)
            active = [entry for entry in active if entry[1] < len(requests[entry[0]].occupancy.ends)]
        step += 1
    tasks, owners = streams.schedule_signals([request.occupancy for request in requests], schedule)
    signals = [TimedSignal(number, time_ms, tasks[number], owners[number]) for number, time_ms in enumerate(times_ms)]
    return TimedHistory(requests, signals)


def _lowest_free_slot(free_from: Dict[int, float], busy, start_ms: float, num_slots: int) -> Optional[int]:
    """The lowest slot free at ``start_ms``; slots are first used in increasing order, so unused ones come last."""
    reusable = [slot for slot, since in free_from.items() if since <= start_ms and slot not in busy]
    if reusable:
        return min(reusable)
    next_unused = len(set(free_from) | busy)
    return next_unused if next_unused < num_slots else None


def _new_request(
    rng: random.Random, spec: WorkloadSpec, request_id: str, slot: int, scheduled_ms: float
) -> TimedRequest:
    num_chunks = rng.choices(range(1, len(spec.chunk_weights) + 1), weights=spec.chunk_weights)[0]
    last_chunk = rng.randint(64, spec.chunk_tokens)
    chunk_ends = tuple(spec.chunk_tokens * index for index in range(1, num_chunks)) + (
        spec.chunk_tokens * (num_chunks - 1) + last_chunk,
    )
    delay_ms = rng.lognormvariate(math.log(spec.delay_median_ms), spec.delay_sigma)
    return TimedRequest(prefill_request(request_id, slot, chunk_ends), scheduled_ms, delay_ms)


class SlotOwners:
    """Which request a released task belongs to: per slot, requests in scheduling order, the oldest unfinished."""

    def __init__(self, requests: List[TimedRequest]):
        self._queues: Dict[int, Deque[TimedRequest]] = {}
        for request in sorted(requests, key=lambda r: r.scheduled_ms):
            self._queues.setdefault(request.occupancy.slot, deque()).append(request)

    def take(self, task: Task) -> Tuple[TimedRequest, bool]:
        """The owner of ``task`` and whether the task is its final chunk (then the slot moves on)."""
        slot, prefilled_token_num = task
        owner = self._queues[slot][0]
        if prefilled_token_num > owner.occupancy.need:
            raise ValueError(f"task {task} exceeds need_prefill_tokens of {owner.occupancy.request_id}")
        final = prefilled_token_num == owner.occupancy.need
        if final:
            self._queues[slot].popleft()
        return owner, final


@dataclass(frozen=True)
class ReleasedBatch:
    """A batch as put into ``cache_prefilled_engine_ids_queue``: when, what, and which event released it."""

    time_ms: float
    batch: Batch
    trigger: Event


@dataclass
class ReleaseTrace:
    mode: str
    batches: List[ReleasedBatch]
    drops: list


def drive_release(mode: str, workload: TimedHistory) -> ReleaseTrace:
    """Feed the time-ordered streams to a fresh release policy, as one rank's two threads would."""
    events = workload.events()
    driven = drive(make_release(mode), workload.streams(events), [event.kind for event in events], slot_model=DICT)
    batches: List[ReleasedBatch] = []
    drops: list = []
    for event, step in zip(events, driven):
        batches.extend(ReleasedBatch(event.time_ms, batch, event) for batch in step.released.batches)
        drops.extend(step.released.drops)
    return ReleaseTrace(mode, batches, drops)
