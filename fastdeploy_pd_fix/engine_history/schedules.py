"""The engine's schedules over a history, and the orders in which its cache info can come.

An engine step runs the next chunk of a subset of the runnable requests and emits one layer-0 kv signal with their
tasks in slot order; a request reusing a slot becomes runnable only after the slot's previous request ran its final
chunk. Registration is lockstep across ranks; a slot's requests register in their order.
"""

from __future__ import annotations

import itertools
from typing import Iterator, List, Optional, Sequence, Tuple

from fastdeploy_pd_fix.engine_history.occupancy import Occupancy


def same_slot_predecessors(requests: Sequence[Occupancy]) -> List[Optional[int]]:
    """For each request, the index of the latest earlier request on its slot (None for a slot's first request)."""
    predecessors: List[Optional[int]] = []
    for index, request in enumerate(requests):
        same_slot = [earlier for earlier in range(index) if requests[earlier].slot == request.slot]
        predecessors.append(same_slot[-1] if same_slot else None)
    return predecessors


def runnable_requests(
    requests: Sequence[Occupancy], progress: Sequence[int], predecessors: Sequence[Optional[int]]
) -> List[int]:
    """Indexes of the requests that may run a chunk in the next engine step, given the chunks each has run."""

    def finished(index):
        return progress[index] == len(requests[index].ends)

    return [
        index
        for index in range(len(requests))
        if not finished(index) and (predecessors[index] is None or finished(predecessors[index]))
    ]


def engine_schedules(requests: Sequence[Occupancy]) -> Iterator[Tuple[Tuple[Tuple[int, int], ...], ...]]:
    """Every engine schedule: steps of (request index, chunk index), one chunk per request per step.

    A request's chunks run in order in strictly later steps; a request reusing a slot starts only after the slot's
    previous request ran its final chunk. Any non-empty subset of the runnable requests may run in a step.
    """
    predecessors = same_slot_predecessors(requests)

    def extend(progress, steps):
        if all(progress[index] == len(request.ends) for index, request in enumerate(requests)):
            yield tuple(steps)
            return
        runnable = runnable_requests(requests, progress, predecessors)
        for size in range(1, len(runnable) + 1):
            for subset in itertools.combinations(runnable, size):
                step = tuple(sorted(((index, progress[index]) for index in subset), key=lambda t: requests[t[0]].slot))
                advanced = list(progress)
                for index in subset:
                    advanced[index] += 1
                yield from extend(advanced, steps + [step])

    yield from extend([0] * len(requests), [])


def registration_orders(requests: Sequence[Occupancy]) -> Iterator[Tuple[Occupancy, ...]]:
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


def interleavings(count_a: int, count_b: int, a, b) -> List[list]:
    """Every sequence of ``count_a`` times ``a`` and ``count_b`` times ``b``."""
    sequences = []
    for positions in itertools.combinations(range(count_a + count_b), count_a):
        sequence = [b] * (count_a + count_b)
        for position in positions:
            sequence[position] = a
        sequences.append(sequence)
    return sequences


def engine_steps(count_a: int, count_b: int) -> List[list]:
    """Every engine schedule of ``count_a`` chunks on slot 0 and ``count_b`` on slot 1: each step runs slot 0,
    slot 1, or both (one kv signal listing both slots)."""
    if not count_a and not count_b:
        return [[]]
    schedules = []
    if count_a:
        schedules += [[0] + rest for rest in engine_steps(count_a - 1, count_b)]
    if count_b:
        schedules += [[1] + rest for rest in engine_steps(count_a, count_b - 1)]
    if count_a and count_b:
        schedules += [[(0, 1)] + rest for rest in engine_steps(count_a - 1, count_b - 1)]
    return schedules
