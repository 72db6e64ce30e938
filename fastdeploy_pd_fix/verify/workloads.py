"""The race workloads the explorer runs, and one rank's drive through a merge of their two streams.

A race workload (:class:`~fastdeploy_pd_fix.engine_history.streams.Workload`) is an engine history of requests that
start at 0 and complete, one engine schedule and one lockstep registration order (the engine model:
:mod:`fastdeploy_pd_fix.engine_history`). Only the *merge* of the two streams differs from rank to rank; a merge is
written as a string of :data:`SIGNAL_EVENT` and :data:`REGISTRATION_EVENT`. The families expand each request template
into every engine schedule times every registration order.

The send-thread model (:func:`drive`): the send thread consumes a batch the moment it is released.
``idx_cache_task_dict`` is modelled per slot as a FIFO of registrations (:data:`FIFO`): a registration appends to its
slot; a released task belongs to the registration the policy bound it to (``Released.bindings``, what
``BoundTaskDict`` shows the send thread), else to the slot's head (upstream's read at send time); that registration
leaves when a batch holding its final chunk (``prefilled_token_num == need_prefill_tokens``) is released.
``registered`` (what ``upstream`` and ``pr7872`` look at) maps each slot with a head to the head's
``need_prefill_tokens``. The FIFO equals upstream's plain dict whenever a slot is re-registered only after its
previous request was sent (true if the engine recycles a slot only after ``get_finished_req``). :data:`DICT` models
the plain dict instead (a registration replaces its slot's entry).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from fastdeploy_pd_fix.engine_history.occupancy import Occupancy, prefill_request
from fastdeploy_pd_fix.engine_history.schedules import engine_schedules, registration_orders
from fastdeploy_pd_fix.engine_history.streams import Workload, registration_streams
from fastdeploy_pd_fix.policy.release import Registration, Released, ReleasePolicy

SIGNAL_EVENT = "S"
REGISTRATION_EVENT = "R"

FIFO = "fifo"
DICT = "dict"
SLOT_MODELS = (FIFO, DICT)

#: The modelled ``idx_cache_task_dict``: per slot, its registrations still open, oldest first.
SlotRegistrations = Dict[int, Tuple[Registration, ...]]


def expand_family(family: str, requests: Sequence[Occupancy]) -> List[Workload]:
    """All workloads of one request template: every engine schedule times every registration order."""
    orders = list(registration_orders(requests))
    return [
        registration_streams(family, requests, schedule, order)
        for schedule in engine_schedules(requests)
        for order in orders
    ]


def _req(request_id: str, slot: int, *chunks: int, registers: bool = True) -> Occupancy:
    return prefill_request(request_id, slot, chunks, registers)


SINGLE = (4,)
CHUNKED = (2, 4)


def default_families(quick: bool = False) -> List[Tuple[str, List[List[Occupancy]]]]:
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
# One rank: the send-thread model and a drive through one merge.


def store_registration(slots: SlotRegistrations, registration: Registration, slot_model: str = FIFO) -> None:
    """``idx_cache_task_dict[slot] = task``: appended to the slot's FIFO, or replacing its entry (:data:`DICT`)."""
    earlier = slots.get(registration.slot, ()) if slot_model == FIFO else ()
    slots[registration.slot] = earlier + (registration,)


def registered_needs(slots: SlotRegistrations) -> Dict[int, int]:
    """What the policies see as ``registered``: each slot with an open registration -> its ``need_prefill_tokens``."""
    return {slot: registrations[0].need_prefill_tokens for slot, registrations in slots.items() if registrations}


def send_task(
    slots: SlotRegistrations, slot: int, prefilled_token_num: int, bound: Optional[Registration] = None
) -> Optional[Registration]:
    """The send thread takes one released task: returns the registration it reads (``bound``, the one the policy
    bound the task to, else the slot's head; None if there is none); a final chunk finishes that request and cleans
    its registration up."""
    head = slots.get(slot, ())
    owner = bound if bound is not None else (head[0] if head else None)
    if owner is not None and prefilled_token_num == owner.need_prefill_tokens:
        slots[slot] = tuple(registration for registration in head if registration != owner)
    return owner


def batch_bindings(released: Released, number: int) -> Tuple[Optional[Registration], ...]:
    """The registrations the tasks of batch ``number`` are bound to (all None when the policy gives none)."""
    if number < len(released.bindings):
        return released.bindings[number]
    return (None,) * len(released.batches[number])


def deliver(
    policy: ReleasePolicy,
    workload: Workload,
    event: str,
    index: int,
    slots: SlotRegistrations,
    slot_model: str = FIFO,
) -> Released:
    """Hand event ``index`` of one stream to ``policy`` as the rank's thread does (a registration is stored first)."""
    if event == SIGNAL_EVENT:
        return policy.add_signal(workload.signals[index], registered=registered_needs(slots))
    registration = workload.registrations[index]
    store_registration(slots, registration, slot_model)
    return policy.add_registration(registration, registered=registered_needs(slots))


@dataclass(frozen=True)
class DrivenEvent:
    """One delivered event, what it released, and the registration each released task belonged to when sent."""

    event: str
    index: int
    released: Released
    owners: Tuple[Tuple[Optional[Registration], ...], ...]  # parallel to ``released.batches``


def drive(
    policy: ReleasePolicy, workload: Workload, merge: Sequence[str], slot_model: str = FIFO
) -> List[DrivenEvent]:
    """Drive ``policy`` through one merge of the workload's streams, the send thread taking every batch at once."""
    slots: SlotRegistrations = {}
    fed = {SIGNAL_EVENT: 0, REGISTRATION_EVENT: 0}
    driven = []
    for event in merge:
        index = fed[event]
        fed[event] += 1
        released = deliver(policy, workload, event, index, slots, slot_model)
        owners = tuple(
            tuple(
                send_task(slots, slot, number, bound)
                for (slot, number), bound in zip(batch, batch_bindings(released, position))
            )
            for position, batch in enumerate(released.batches)
        )
        driven.append(DrivenEvent(event, index, released, owners))
    return driven


def switches(merge: str) -> int:
    """How often a merge switches stream (simpler merges switch less)."""
    return sum(1 for a, b in zip(merge, merge[1:]) if a != b)


def simpler_merge(a: str, b: str) -> str:
    return min(a, b, key=lambda merge: (switches(merge), merge))


def describe_merge(merge: str) -> str:
    """``"SRS"`` as ``"S0 R0 S1"``."""
    signal_index = registration_index = 0
    parts = []
    for event in merge:
        if event == SIGNAL_EVENT:
            parts.append(f"S{signal_index}")
            signal_index += 1
        else:
            parts.append(f"R{registration_index}")
            registration_index += 1
    return " ".join(parts)
