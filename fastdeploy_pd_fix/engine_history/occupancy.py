"""One request computed on one slot (an occupancy), and what a history of them hides from the two streams.

An engine history is, per slot, a sequence of occupancies, each one request computed on that slot with

* its first chunk offset (0, or a prefix-cached length) and its cumulative chunk ends (the last is its need);
* whether it registers (it has ``disaggregate_info``; one that does not is an *orphan*);
* its fate: it completes, or it is aborted after ``k`` emitted chunk signals (0: before the first signal;
  between chunks; all: after the final chunk's signal, before or while it is sent);
* its D-part: normal, late (after the slot's next occupant registered) or never; and D-part repeats (none,
  immediately, late: after the slot's next occupant registered, or both).

A request of the race workloads (:func:`prefill_request`) is an occupancy that starts at token 0 and completes
normally. :data:`LIMIT_REASONS` lists what the two streams cannot decide (design doc section 4): a history with such
a feature (:func:`ambiguity_features`) is where any messager-side rule may err, alike on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

from fastdeploy_pd_fix.policy.release import Registration, SignalTask

NORMAL, LATE, NEVER, NONE, IMMEDIATE = "normal", "late", "never", "none", "immediate"
IMMEDIATE_AND_LATE = "immediate+late"  # a D-part repeated twice: at once, and late
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
    def repeats_immediately(self) -> bool:
        return self.repeat in (IMMEDIATE, IMMEDIATE_AND_LATE)

    @property
    def repeats_late(self) -> bool:
        return self.repeat in (LATE, IMMEDIATE_AND_LATE)

    @property
    def completes(self) -> bool:
        return self.aborted_after is None

    @property
    def transfers(self) -> bool:
        """Registers and completes: invariant 5 requires it sent completely and finished."""
        return self.registers and self.completes

    def registration(self) -> Registration:
        """Its transfer task as the messager stores it once both cache-info parts came."""
        return Registration(self.slot, self.request_id, self.need)

    def signal_task(self, chunk: int) -> SignalTask:
        """Chunk ``chunk`` as a kv-signal task ``(slot, chunk_offset, prefilled_token_num)``: each chunk starts where
        the previous one ended, the first at ``start``."""
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


def prefill_request(request_id: str, slot: int, ends: Tuple[int, ...], registers: bool = True) -> Occupancy:
    """A request of the race workloads: computed from token 0 to its need, completing normally."""
    return Occupancy(request_id, slot, 0, tuple(ends), registers)
