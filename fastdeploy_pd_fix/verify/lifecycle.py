"""The slot-lifecycle families the explorer runs: engine histories (:mod:`fastdeploy_pd_fix.engine_history`) with
aborts, repeats and orphans, and the interleavings of their streams.

The engine gate (:mod:`.lifecycle_rank`): an occupancy's events exist only after the slot's previous occupancy was
freed. An abort frees the slot at once, and so does an orphan's completion; a registered request's normal
completion frees it only after this rank's send thread finished it (a necessary condition of the real cross-rank
gate, so the model allows more behaviours than the engine: sound for finding violations). With notices, the fence
(rule 9) gates the slot's next occupancy too: its signals and its admission record come only after this rank's
registration thread has handed the previous occupancy's ``ABORT`` to the policy.

A workload with a feature the two streams cannot decide (:data:`~fastdeploy_pd_fix.engine_history.occupancy.
LIMIT_REASONS`) is where any messager-side rule may err, alike on every rank; its findings count as limits. With
notices there is no limit: the notices decide every such workload, so every finding there is a violation.
"""

from __future__ import annotations

from typing import List, Tuple

from fastdeploy_pd_fix.engine_history.occupancy import IMMEDIATE, LATE, NEVER, Occupancy
from fastdeploy_pd_fix.engine_history.schedules import engine_steps, interleavings
from fastdeploy_pd_fix.engine_history.streams import LifecycleWorkload, build

# ---------------------------------------------------------------------------------------------------------------
# Families (the design doc's, section 3): single-slot histories, then two slots with every signal interleaving.

SINGLE = (0, (4,))
CHUNKED = (0, (2, 4))
SHORT = (0, (1,))
PREFIXED = (2, (4,))  # prefix-cached: the first chunk starts at 2
UNEVEN = (0, (1, 3))
NEXT_SHAPES = (SINGLE, CHUNKED, SHORT, PREFIXED)


def _occupancy(request_id: str, slot: int, shape, **fate) -> Occupancy:
    return Occupancy(request_id, slot, shape[0], shape[1], **fate)


def _single_slot_families() -> List[Tuple[str, List[List[Occupancy]]]]:
    def A(shape, **fate):  # noqa: N802 (named like the request)
        return _occupancy("A", 0, shape, **fate)

    def B(shape, **fate):  # noqa: N802
        return _occupancy("B", 0, shape, **fate)

    first_shapes = (SINGLE, CHUNKED)
    return [
        ("normal-reuse", [[A(a), B(b)] for a in first_shapes for b in NEXT_SHAPES]),
        ("abort-before-signal", [[A(a, aborted_after=0), B(b)] for a in first_shapes for b in NEXT_SHAPES]),
        ("abort-between-chunks", [[A(a, aborted_after=1), B(b)] for a in (CHUNKED, UNEVEN) for b in NEXT_SHAPES]),
        (
            "abort-after-final-signal",  # with A's final batch queued or in the send thread when B registers
            [[A(a, aborted_after=len(a[1])), B(b)] for a in first_shapes for b in NEXT_SHAPES],
        ),
        (
            "repeat-dpart",
            [[A(a, repeat=r), B(b)] for a in first_shapes for b in first_shapes for r in (IMMEDIATE, LATE)]
            + [[A(CHUNKED, repeat=IMMEDIATE, aborted_after=1), B(b)] for b in first_shapes],
        ),
        (
            "late-dpart-after-abort",
            [
                [A(a, aborted_after=k, **late), B(b)]
                for late in ({"dpart": LATE}, {"repeat": LATE})
                for a in first_shapes
                for k in (0, 1)
                if k < len(a[1]) or (k == 0 and "dpart" in late)
                for b in (SINGLE, CHUNKED, SHORT)
            ],
        ),
        (
            "dpart-never-abort",
            [
                [A(a, aborted_after=k, dpart=NEVER), B(b)]
                for a in first_shapes
                for k in range(len(a[1]) + 1)
                for b in first_shapes
            ],
        ),
        (
            "orphan-reuse",  # computed without registering, then its slot reused
            [[_occupancy("O", 0, o, registers=False), B(b)] for o in first_shapes for b in (SINGLE, CHUNKED, SHORT)]
            + [
                [_occupancy("O", 0, CHUNKED, registers=False, aborted_after=1), B(b)] for b in (SINGLE, CHUNKED, SHORT)
            ],
        ),
        (
            "issue-ABCD",
            [
                [A(CHUNKED, aborted_after=1), B(SHORT), _occupancy("C", 0, CHUNKED)],
                [A(CHUNKED, aborted_after=1), B(SHORT), _occupancy("C", 0, CHUNKED), _occupancy("D", 0, SHORT)],
                [A(CHUNKED, aborted_after=1), B(SINGLE, aborted_after=0), _occupancy("C", 0, SINGLE)],
                [A(CHUNKED, aborted_after=1, repeat=LATE), B(CHUNKED, aborted_after=1), _occupancy("C", 0, SINGLE)],
            ],
        ),
        (
            "orphan-between",
            [
                [A(a), _occupancy("O", 0, o, registers=False), B(b)]
                for a in first_shapes
                for o in first_shapes
                for b in (SINGLE, SHORT)
            ],
        ),
    ]


def _two_slot_families(quick: bool) -> List[Tuple[str, List[LifecycleWorkload]]]:
    thin = 2 if quick else 1  # --quick keeps every other interleaving of the larger families
    normal = []
    for a, b in [(CHUNKED, SINGLE), (CHUNKED, CHUNKED), (SINGLE, SINGLE)]:
        occupancies = [_occupancy("A", 0, a), _occupancy("B", 1, b)]
        for signal_slots in interleavings(len(a[1]), len(b[1]), 0, 1):
            for cache_slots in interleavings(2, 2, 0, 1)[::thin]:
                normal.append(build("normal-2slot", occupancies, signal_slots, cache_slots))
    split, joint = [], []
    for shapes, target, stride, schedules in [
        ([(CHUNKED, SINGLE, SINGLE), (CHUNKED, PREFIXED, SINGLE), (SINGLE, SINGLE, CHUNKED)], split, 2, "split"),
        ([(CHUNKED, SINGLE, CHUNKED), (CHUNKED, CHUNKED, SINGLE), (SINGLE, SINGLE, CHUNKED)], joint, 3, "joint"),
    ]:
        for a, b, c in shapes:
            for k in range(min(2, len(a[1]))):
                occupancies = [_occupancy("A", 0, a, aborted_after=k), _occupancy("B", 0, b), _occupancy("C", 1, c)]
                count_0 = k + len(b[1])
                if schedules == "split":
                    signal_orders = interleavings(count_0, len(c[1]), 0, 1)
                else:
                    signal_orders = [
                        s for s in engine_steps(count_0, len(c[1])) if any(isinstance(x, tuple) for x in s)
                    ]
                family = "abort-reuse+other-slot" if schedules == "split" else "abort-reuse+joint-signals"
                for signal_slots in signal_orders[::thin]:
                    for cache_slots in interleavings(4, 2, 0, 1)[::stride]:  # P and D of A, B; of C
                        target.append(build(family, occupancies, signal_slots, cache_slots))
    alone = []
    for o, a in [(SINGLE, SINGLE), (SINGLE, CHUNKED), (CHUNKED, SINGLE)]:
        occupancies = [_occupancy("O", 0, o, registers=False), _occupancy("A", 1, a)]
        for signal_slots in interleavings(len(o[1]), len(a[1]), 0, 1):  # the orphan puts no cache info
            alone.append(build("orphan-alone+other-slot", occupancies, signal_slots))
    return [
        ("normal-2slot", normal),
        ("abort-reuse+other-slot", split),
        ("abort-reuse+joint-signals", joint),
        ("orphan-alone+other-slot", alone),
    ]


def lifecycle_families(quick: bool = False) -> List[Tuple[str, List[LifecycleWorkload]]]:
    """Workloads per lifecycle family, deduplicated, smallest first (so the first counterexample is minimal)."""
    families = [
        (name, [build(name, occupancies) for occupancies in histories]) for name, histories in _single_slot_families()
    ]
    families += _two_slot_families(quick)
    built = []
    for name, workloads in families:
        unique = {}
        for workload in workloads:
            unique.setdefault((workload.occupancies, workload.signals, workload.cache), workload)
        built.append((name, sorted(unique.values(), key=LifecycleWorkload.size_key)))
    return built
