"""The engine's slot lifecycle as workloads: engine histories per slot, the two streams they produce, ground truth.

A workload is an engine history: per slot, a sequence of occupancies, each one request computed on that slot with

* its first chunk offset (0, or a prefix-cached length) and its cumulative chunk ends (the last is its need);
* whether it registers (it has ``disaggregate_info``; one that does not is an *orphan*);
* its fate: it completes, or it is aborted after ``k`` emitted chunk signals (0: before the first signal;
  between chunks; all: after the final chunk's signal, before or while it is sent);
* its D-part: normal, late (after the slot's next occupant registered) or never; and D-part repeats (none,
  immediately, or late: after the slot's next occupant registered).

From it come the two rank-invariant streams and the ground truth the checks use (never the policies):

* signals: layer-0 kv-signal tasks ``(slot, chunk_offset, prefilled_token_num)``, and which occupancy each task is
  (``signal_tids``, ``tid_owner``);
* cache info: P-parts and D-parts in lockstep order; a D-part completes a registration when its P-part is in
  ``cache_info``, so a repeat counts again only while the rank has not yet cleaned the request up (sent its final
  chunk), which depends on the rank's send timing as in the real messager;
* with the engine-side patch on (:func:`with_notices`; release rule 8), also the engine's notices in the same
  stream: ``ABORT(slot, rid, emitted_end)`` for every aborted occupancy, registered or orphan (``emitted_end``: the
  end of its last emitted chunk, None when it emitted nothing), after the occupancy's own parts that the engine puts
  before the abort (a late D-part comes after it) and before the slot's next occupant's parts; and
  ``ORPHAN(slot, rid, need)`` at the admission of every occupancy that does not register, before anything else of
  it. An aborted orphan gets both.

The engine gate (:mod:`.lifecycle_search`): an occupancy's events exist only after the slot's previous occupancy was
freed. An abort frees the slot at once, and so does an orphan's completion; a registered request's normal
completion frees it only after this rank's send thread finished it (a necessary condition of the real cross-rank
gate, so the model allows more behaviours than the engine: sound for finding violations). With notices, the fence
(rule 9) gates the slot's next occupancy too: its signals and its admission record come only after this rank's
registration thread has handed the previous occupancy's ``ABORT`` to the policy.

:data:`LIMIT_REASONS` lists what the two streams cannot decide (design doc section 4): workloads with such a
feature are where any messager-side rule may err, alike on every rank; their findings count as limits. With
notices there is no limit: the notices decide every such workload, so every finding there is a violation.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from fastdeploy_pd_fix.policy.release import SignalTask

NORMAL, LATE, NEVER, NONE, IMMEDIATE = "normal", "late", "never", "none", "immediate"
PREFILL_PART, DECODE_PART = "P", "D"
#: Engine notices as cache-info events (release rule 8), named like the parts by what they carry.
ABORT_NOTICE, ORPHAN_NOTICE = "ABORT", "ORPHAN"
NOTICE_EVENTS = (ABORT_NOTICE, ORPHAN_NOTICE)

ABORT_BEFORE_SIGNAL_REUSE = "abort-before-signal-then-reuse"
NEXT_STARTS_AT_ABORTED_END = "next-starts-at-aborted-end"
ORPHAN_SIGNALS = "orphan-signals"
ORPHAN_ALONE = "orphan-alone"
LATE_FIRST_DPART = "late-first-dpart"
ABORTED_NEVER_REGISTERED = "aborted-never-registered"
LIMIT_REASONS: Dict[str, str] = {
    ABORT_BEFORE_SIGNAL_REUSE: "a request aborted before its first chunk, its slot reused: the next request's first "
    "chunk can be the same triple as the aborted one's, and an open registration followed by a newer one does not "
    "say whether the aborted request emitted it",
    NEXT_STARTS_AT_ABORTED_END: "a request aborted between chunks, and the slot's next request's prefix-cached first "
    "chunk starts exactly where it stopped: its content is that of the aborted request's next chunk",
    ORPHAN_SIGNALS: "a request computed without registering, its slot reused: its signal is identical to the next "
    "request's first one and nothing in either stream names it",
    ORPHAN_ALONE: "a request computed without registering whose slot is not reused: its signal waits for a "
    "registration that never comes and holds every later signal",
    LATE_FIRST_DPART: "an aborted request's first D-part arrives after its slot's next request registered: the "
    "registration order contradicts the occupancy order",
    ABORTED_NEVER_REGISTERED: "an aborted request whose D-part never comes (decode gave up): its signals look like "
    "the slot's next request's",
}


@dataclass(frozen=True)
class Occupancy:
    """One request computed on one slot."""

    request_id: str
    slot: int
    start: int
    ends: Tuple[int, ...]
    registers: bool = True
    aborted_after: Optional[int] = None  # None: completes; k: aborted after k emitted chunk signals
    dpart: str = NORMAL
    repeat: str = NONE

    @property
    def need(self) -> int:
        return self.ends[-1]

    @property
    def emitted(self) -> int:
        """How many of its chunks' layer-0 signals the engine emits."""
        return len(self.ends) if self.aborted_after is None else self.aborted_after

    @property
    def emitted_end(self) -> Optional[int]:
        """The end of its last emitted chunk, as its ``ABORT`` notice says (None: it emitted nothing)."""
        return self.ends[self.emitted - 1] if self.emitted else None

    @property
    def completes(self) -> bool:
        return self.aborted_after is None

    @property
    def transfers(self) -> bool:
        """Registers and completes: invariant 5 requires it sent completely and finished."""
        return self.registers and self.completes

    def signal_task(self, chunk: int) -> SignalTask:
        return (self.slot, self.ends[chunk - 1] if chunk else self.start, self.ends[chunk])

    def describe(self) -> str:
        offsets = (self.start,) + self.ends[:-1]
        text = f"{self.request_id}@{self.slot}[" + ",".join(f"{o}-{e}" for o, e in zip(offsets, self.ends)) + "]"
        if not self.registers:
            text += " orphan"
        if self.aborted_after is not None:
            text += f" abort-after-{self.aborted_after}"
        if self.registers and self.dpart != NORMAL:
            text += f" D:{self.dpart}"
        if self.repeat != NONE:
            text += f" repeat:{self.repeat}"
        return text


@dataclass(frozen=True)
class LifecycleWorkload:
    """The two streams of one engine history, with the ground truth of every signal task."""

    family: str
    occupancies: Tuple[Occupancy, ...]
    signals: Tuple[Tuple[SignalTask, ...], ...]
    signal_tids: Tuple[Tuple[int, ...], ...]  # ground-truth id of each task, parallel to ``signals``
    tid_owner: Tuple[int, ...]  # task id -> index of its occupancy
    cache: Tuple[Tuple[str, int], ...]  # (P, D, ABORT or ORPHAN, occupancy index), in lockstep order
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
        signals = " ".join("[" + ",".join(f"({s},{o}-{e})" for s, o, e in tasks) + "]" for tasks in self.signals)
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


def ambiguity_features(occupancies: Sequence[Occupancy]) -> frozenset:
    """The features of an engine history that the two streams cannot decide (:data:`LIMIT_REASONS`)."""
    features = set()
    for slot in {occupancy.slot for occupancy in occupancies}:
        on_slot = [occupancy for occupancy in occupancies if occupancy.slot == slot]
        for position, occupancy in enumerate(on_slot):
            later = on_slot[position + 1 :]
            registered_later = any(other.registers and other.dpart != NEVER for other in later)
            emitting = [other for other in later if other.emitted]
            if not occupancy.registers and occupancy.emitted:
                features.add(ORPHAN_SIGNALS if registered_later else ORPHAN_ALONE)
            if occupancy.aborted_after is not None and emitting:
                if occupancy.emitted == 0 and occupancy.registers and occupancy.dpart != NEVER:
                    features.add(ABORT_BEFORE_SIGNAL_REUSE)
                stopped_at = occupancy.ends[occupancy.emitted - 1] if occupancy.emitted else None
                if 0 < occupancy.emitted < len(occupancy.ends) and emitting[0].start == stopped_at:
                    features.add(NEXT_STARTS_AT_ABORTED_END)  # the next request that computes anything
            if occupancy.registers and occupancy.aborted_after is not None and occupancy.dpart == LATE and later:
                features.add(LATE_FIRST_DPART)  # its registration comes after the next occupant's, whatever it emits
            if occupancy.registers and occupancy.aborted_after is not None and occupancy.dpart == NEVER:
                if occupancy.emitted:
                    features.add(ABORTED_NEVER_REGISTERED)
    return frozenset(features)


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
                    if occupancy.repeat == IMMEDIATE:
                        events.append((DECODE_PART, index))
                    events.extend(late)
                    late = []
                late += [(DECODE_PART, index)] * ((occupancy.dpart == LATE) + (occupancy.repeat == LATE))
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
