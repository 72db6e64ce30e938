"""Release logic: which layer-0 kv signals become transfer batches, and when.

This is the functional core. It has no threads, locks, sleeps, paddle or I/O: the cache messager's two prefill
threads feed it the two streams they see (layer-0 kv signals; completed registrations and engine notices) and put
the batches it returns into ``cache_prefilled_engine_ids_queue`` (see :mod:`.messager_step`). Tests and the
interleaving explorer drive the very same objects.

The two streams are identical on every tensor-parallel rank; only their interleaving differs from rank to rank.
Every batch costs one ``begin_send_cache_barrier`` round and every finished request one ``finish_send_cache_barrier``
round, so ranks must release the same sequence of batches or they block each other forever.

Two policies implement :class:`ReleasePolicy` (``add_signal`` / ``add_registration`` / ``add_notice``, each
returning a :class:`Released`):

``ordered`` (:class:`OrderedRelease`, the default)
    The batch sequence is a function of the two streams alone, never of their timing, and every task is bound by
    its content to the request it belongs to, also when the engine aborts a request and hands its slot to the next
    one without telling the messager, repeats cache-info parts, or computes requests that never register:

    1. Log order. Layer-0 signals are kept in arrival order and released strictly in that order, one batch per
       signal (the engine's own granularity, so no extra barrier rounds). A signal whose tasks are all dropped
       releases no batch.
    2. Occupancy. Each slot has a list of occupants, in the order of their first registration or notice (rule 8).
       A request id is counted once for its whole life: a later registration of it (a repeated D-part, also one
       arriving late, after the request was aborted and its slot reused) is ignored and reported in
       :attr:`Released.decisions` (:data:`.decision.COUNTED_BEFORE`).
       Closed ids are remembered in a bounded FIFO (:data:`CLOSED_IDS_KEPT`), far longer than repeats can lag.
    3. Binding by content. The oldest signal's next task ``(slot, chunk_offset, prefilled_token_num)`` binds to
       the slot's first open occupant if it continues it (``chunk_offset`` equals the end of the occupant's last
       bound chunk; any offset for its first chunk, which may start at a prefix-cached length) and does not go
       beyond its ``need_prefill_tokens``.
    4. Closing. An occupant closes when a bound chunk reaches its ``need_prefill_tokens``. An occupant that has
       started and cannot be continued by the task at hand was aborted (FastDeploy frees an aborted request's
       slot and gives it to the next request without telling the messager): it is closed as abandoned, reported,
       and the task is tried against the slot's next occupant.
    5. Waiting. The oldest signal waits while its next task's slot has no open occupant. Nothing is released
       before its task is registered, and nothing behind it overtakes it.
    6. Dropping. A task that does not fit the slot's first open occupant, which has not started (its end is
       beyond that request's ``need_prefill_tokens``), is dropped and reported in :attr:`Released.drops`.
    7. Send-time binding. Every released batch comes with the registrations its tasks are bound to
       (:attr:`Released.bindings`, each holding the task dict that was stored): the send thread must read those,
       not whatever ``idx_cache_task_dict`` holds for the slot when it sends, which may already be the slot's
       next request.

    8. Engine notices (:mod:`.notice`, read from the cache-info stream, so at the same stream position on every
       rank). ``abort`` ends a request's run at its ``emitted_end``: its tasks bind only up to there, and a task
       beyond it is a later request's. An abort of a request not registered yet makes it a *dead* occupant, and
       ``orphan`` an occupant computed without transfer: their tasks are dropped (they need no transfer) and a
       later registration of them is ignored (rule 2). The engine fences each abort (rule 9, in the engine-side
       patch): the slot's next request computes only after every rank has handled the abort.

    10. Notices off. Whether the engine puts notices is itself in the cache-info stream: its first batch starts
        with the engine's announcement, or not (:func:`policy_after_first_read`). Without notices the two streams
        cannot tell a request computed without registering (an orphan) from a request whose registration is late
        (the race): waiting holds every later signal behind the orphan's for as long as it keeps its slot, where
        the release as is goes on; and no rule on the two streams can tell them apart alike on every rank (a
        lagging consume thread may read the orphan slot's next registration before the orphan's signal). So an
        ordered policy that learns, at the first cache-info read, that notices are off hands its waiting signals to
        ``upstream`` and releases by its rule from then on (invariant 7: never worse than upstream; its
        chunked and cross-order races, s2 and s3, come back).

    Every decision depends only on the tasks, registrations and notices seen so far and on their order within each
    stream, so every rank decides alike.

``upstream`` (:class:`UpstreamRelease`)
    The semantics of upstream PR #8034, kept for parity and A/B comparison: every layer-0 task goes through a
    pending buffer that keeps only the latest token number per slot, and is recovered as its own single-request
    batch by whichever thread sees both halves first. Known to deadlock when a chunked request's signals beat
    its registration on one rank only (scenario s2), and when requests are recovered in different orders on
    different ranks (scenario s3).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Deque, Dict, List, Mapping, Optional, Protocol, Sequence, Tuple

from . import decision
from .decision import Decision, Drop
from .notice import MARKER_KINDS, ORPHAN, Notice
from .occupant import Occupant

#: One transfer task as put into ``cache_prefilled_engine_ids_queue``: ``(engine slot, prefilled_token_num)``.
Task = Tuple[int, int]
#: One task of a kv signal: ``(engine slot, chunk_offset, prefilled_token_num)``; the chunk is
#: ``[chunk_offset, prefilled_token_num)``.
SignalTask = Tuple[int, int, int]
#: One batch: the tasks the send thread handles under a single ``begin_send_cache_barrier`` round.
Batch = Tuple[Task, ...]

#: How many closed request ids :class:`OrderedRelease` remembers to ignore their late registrations (rule 2).
CLOSED_IDS_KEPT = 4096

ORDERED = "ordered"
UPSTREAM = "upstream"
#: The release policies this module implements (the plugin adds its ``observe`` mode on top).
RELEASE_MODES = (ORDERED, UPSTREAM)


@dataclass(frozen=True)
class Registration:
    """A transfer task that ``_add_cache_task_thread`` completed and stored in ``idx_cache_task_dict``."""

    slot: int
    request_id: str
    need_prefill_tokens: int
    #: The task dict stored in ``idx_cache_task_dict`` (what the send thread must read for this request, rule 7).
    task: object = field(default=None, compare=False, hash=False, repr=False)

    def __post_init__(self):
        _check_non_negative_int("slot", self.slot)
        _check_non_negative_int("need_prefill_tokens", self.need_prefill_tokens)
        if self.need_prefill_tokens == 0:
            raise ValueError(f"registration of {self.request_id!r}: need_prefill_tokens must be positive")


@dataclass
class Released:
    """What one call released: batches to put into the queue, in order, what was dropped, and what else it decided."""

    batches: List[Batch] = field(default_factory=list)
    #: Parallel to :attr:`batches`: the registration each task of the batch is bound to (rule 7). Empty when the
    #: policy leaves the send thread to read ``idx_cache_task_dict`` at send time (upstream's semantics).
    bindings: List[Tuple[Registration, ...]] = field(default_factory=list)
    #: Parallel to :attr:`bindings`: the number (0-based, in arrival order) of the layer-0 signal each batch is.
    signal_numbers: List[int] = field(default_factory=list)
    drops: List[Drop] = field(default_factory=list)
    #: Parts and notices not counted, occupants closed before their end, notices corrected (:mod:`.decision`).
    decisions: List[Decision] = field(default_factory=list)

    def extend(self, other: "Released") -> None:
        self.batches.extend(other.batches)
        self.bindings.extend(other.bindings)
        self.signal_numbers.extend(other.signal_numbers)
        self.drops.extend(other.drops)
        self.decisions.extend(other.decisions)


def _check_non_negative_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")


def check_signal_tasks(tasks: Sequence[SignalTask]) -> Tuple[SignalTask, ...]:
    """``tasks`` as ``(slot, chunk_offset, prefilled_token_num)`` triples of non-negative ints with a non-empty
    chunk, or ValueError."""
    checked = []
    for task in tasks:
        try:
            slot, chunk_offset, prefilled_token_num = task
        except (TypeError, ValueError):
            raise ValueError(
                f"a task must be a (slot, chunk_offset, prefilled_token_num) triple, got {task!r}"
            ) from None
        for name, value in (
            ("slot", slot),
            ("chunk_offset", chunk_offset),
            ("prefilled_token_num", prefilled_token_num),
        ):
            _check_non_negative_int(name, value)
        if prefilled_token_num <= chunk_offset:
            raise ValueError(f"task {task!r}: prefilled_token_num must be beyond chunk_offset (a non-empty chunk)")
        checked.append((slot, chunk_offset, prefilled_token_num))
    return tuple(checked)


class ReleasePolicy(Protocol):
    """What the messager step and the explorer need of a release policy.

    ``registered`` maps each slot currently in ``idx_cache_task_dict`` to its ``need_prefill_tokens``; only policies
    that decide by what the dict holds at the moment (upstream's) read it.
    """

    mode: str

    def add_signal(self, tasks: Sequence[SignalTask], registered: Mapping[int, int]) -> Released:
        """Take one layer-0 signal (its tasks in engine order) and return what became ready."""

    def add_registration(self, registration: Registration, registered: Mapping[int, int]) -> Released:
        """Take one completed registration and return what became ready."""

    def add_notice(self, notice: Notice, registered: Mapping[int, int]) -> Released:
        """Take one engine notice (:mod:`.notice`) from the cache-info stream and return what became ready."""

    def waiting_signals(self) -> List[Tuple[SignalTask, ...]]:
        """Tasks received and neither released nor dropped, oldest signal first."""

    def has_waiting(self) -> bool:
        """Whether :meth:`waiting_signals` would be non-empty (cheap: the watchdog asks after every step)."""

    def open_registrations(self) -> Dict[int, List[str]]:
        """Request ids registered per slot that are still open (final chunk not released, not abandoned)."""


class OrderedRelease:
    """Rank-invariant release: signals in arrival order, each task bound by content to its slot's occupant.

    ``registered`` arguments are accepted for interface parity with :class:`UpstreamRelease` and ignored: this
    policy's decisions depend on the content of the two streams only.
    """

    mode = ORDERED

    def __init__(self):
        # Rule 1: layer-0 signals not yet released, oldest first; each is the list of its still undecided tasks.
        self._waiting_signals: Deque[List[SignalTask]] = deque()
        # Tasks of the oldest signal already bound, with the registration each is bound to.
        self._bound_head: List[Tuple[SignalTask, Registration]] = []
        # Signals released or dropped so far: the oldest waiting signal's number (rule 1 keeps arrival order).
        self._signals_done = 0
        # Rule 2: open occupants per slot, oldest first.
        self._occupants: Dict[int, List[Occupant]] = {}
        # Request ids of the open occupants (-> slot), and of the closed ones still remembered, oldest first.
        self._open_ids: Dict[str, int] = {}
        self._closed_ids: Dict[str, None] = {}

    def add_signal(self, tasks: Sequence[SignalTask], registered: Optional[Mapping[int, int]] = None) -> Released:
        """Append one layer-0 signal (its tasks in engine order) and release whatever became ready."""
        self._waiting_signals.append(list(check_signal_tasks(tasks)))
        return self._release_ready_batches()

    def add_registration(self, registration: Registration, registered: Optional[Mapping[int, int]] = None) -> Released:
        """Record one completed registration (rule 2) and release whatever became ready."""
        request_id = registration.request_id
        if request_id in self._open_ids or request_id in self._closed_ids:
            occupant = self._open_occupant(request_id)
            state = decision.CLOSED_REQUEST if occupant is None else occupant.state
            return Released(
                decisions=[Decision(decision.COUNTED_BEFORE, request_id, registration.slot, occupant=state)]
            )
        self._open(registration.slot, Occupant(request_id, registration))
        return self._release_ready_batches()

    def add_notice(self, notice: Notice, registered: Optional[Mapping[int, int]] = None) -> Released:
        """Take one engine notice from the cache-info stream (rule 8) and release whatever became ready.

        ``abort``: the request's run ends at its ``emitted_end``; a request not registered yet becomes a dead
        occupant, whose tasks are dropped and whose registration is ignored. ``orphan``: an occupant whose tasks are
        dropped. ``fence``: nothing (it only makes the engine wait until every rank has handled the abort);
        ``engine``: nothing (the messager step logs it)."""
        if notice.kind in MARKER_KINDS:
            return Released()
        request_id, slot = notice.request_id, notice.slot
        released = Released()
        occupant = self._open_occupant(request_id)
        if notice.kind == ORPHAN:
            if occupant is not None or request_id in self._closed_ids:
                released.decisions.append(Decision(decision.ORPHAN_COUNTED_BEFORE, request_id))
                return released
            occupant = Occupant(request_id, need=notice.value)
            occupant.orphan = True
            self._open(slot, occupant)
        elif occupant is None:
            if request_id in self._closed_ids:
                return released  # aborted after its final chunk was released, or abandoned before: nothing left
            occupant = Occupant(request_id)  # dead: aborted before it registered
            occupant.aborted, occupant.emitted_end = True, notice.value
            self._open(slot, occupant)
        elif not occupant.aborted:
            occupant.aborted, occupant.emitted_end = True, notice.value
            occupant_slot = self._open_ids[request_id]
            if occupant_slot != slot:
                released.decisions.append(
                    Decision(decision.ABORT_ON_OTHER_SLOT, request_id, occupant_slot, named_slot=slot)
                )
            if occupant.last_end is not None and (occupant.emitted_end or 0) < occupant.last_end:
                released.decisions.append(
                    Decision(
                        decision.ABORT_BEFORE_BOUND,
                        request_id,
                        last_end=occupant.last_end,
                        run_end=occupant.emitted_end,
                    )
                )
                occupant.emitted_end = occupant.last_end
        if occupant.closed:
            self._close(self._open_ids[request_id], occupant)
        released.extend(self._release_ready_batches())
        return released

    def waiting_signals(self) -> List[Tuple[SignalTask, ...]]:
        """Signals not yet released, oldest first, each with all its tasks (bound or not) in engine order."""
        waiting = [tuple(tasks) for tasks in self._waiting_signals]
        if waiting:
            waiting[0] = tuple(task for task, _ in self._bound_head) + waiting[0]
        return waiting

    def has_waiting(self) -> bool:
        return bool(self._waiting_signals)

    def open_registrations(self) -> Dict[int, List[str]]:
        return {
            slot: [occupant.request_id for occupant in occupants]
            for slot, occupants in self._occupants.items()
            if occupants
        }

    def _open_occupant(self, request_id: str) -> Optional[Occupant]:
        slot = self._open_ids.get(request_id)
        if slot is None:
            return None
        return next(occupant for occupant in self._occupants[slot] if occupant.request_id == request_id)

    def _open(self, slot: int, occupant: Occupant) -> None:
        self._open_ids[occupant.request_id] = slot
        self._occupants.setdefault(slot, []).append(occupant)

    def _release_ready_batches(self) -> Released:
        released = Released()
        while self._waiting_signals:
            head = self._waiting_signals[0]
            while head:
                registration = self._bind(head[0], released)
                if registration is None:
                    return released  # rule 5: the oldest signal waits for an occupant of its slot
                task = head.pop(0)
                if registration is not _DROPPED:
                    self._bound_head.append((task, registration))
            self._waiting_signals.popleft()
            if self._bound_head:
                released.batches.append(tuple((slot, end) for (slot, _, end), _ in self._bound_head))
                released.bindings.append(tuple(registration for _, registration in self._bound_head))
                released.signal_numbers.append(self._signals_done)
            self._bound_head = []
            self._signals_done += 1
        return released

    def _bind(self, task: SignalTask, released: Released):
        """The registration ``task`` is bound to (rules 3, 4), ``_DROPPED`` (rules 5, 6), or None to wait (rule 5)."""
        slot, chunk_offset, end = task
        occupants = self._occupants.get(slot, [])
        while occupants:
            occupant = occupants[0]
            started = occupant.last_end is not None
            continues = not started or chunk_offset == occupant.last_end
            run_end = occupant.run_end
            if continues and run_end is not None and end <= run_end:
                occupant.last_end = end  # rule 3
                if occupant.closed:
                    self._close(slot, occupant)
                if occupant.registration is None:  # rule 5: an orphan's or a dead request's chunk needs no transfer
                    released.drops.append(
                        Drop(slot, end, f"chunk [{chunk_offset}, {end}) belongs to {occupant.describe()}")
                    )
                    return _DROPPED
                return occupant.registration
            if occupant.aborted:
                # Rule 4: the engine said where it stopped; this chunk is beyond it, so it is a later request's.
                released.decisions.append(occupant.closed_early(decision.CLOSED_AT_ABORT, slot, task))
                self._close(slot, occupant)
                continue
            if not started:
                reason = (
                    f"chunk [{chunk_offset}, {end}) does not fit {occupant.describe()}, which needs {run_end} tokens"
                )
                released.drops.append(Drop(slot, end, reason))  # rule 6
                return _DROPPED
            occupant.abandoned = True  # rule 4: aborted unannounced, its slot given to a later request
            released.decisions.append(occupant.closed_early(decision.ABANDONED, slot, task))
            self._close(slot, occupant)
        return None

    def _close(self, slot: int, occupant: Occupant) -> None:
        """Remove an open occupant and remember its id (rule 2), forgetting the oldest beyond the bound."""
        self._occupants[slot].remove(occupant)
        del self._open_ids[occupant.request_id]
        self._closed_ids[occupant.request_id] = None
        if len(self._closed_ids) > CLOSED_IDS_KEPT:
            del self._closed_ids[next(iter(self._closed_ids))]


#: Marker returned by :meth:`OrderedRelease._bind` for a dropped task.
_DROPPED = object()


class UpstreamRelease:
    """The release semantics of upstream PR #8034 (for parity and A/B runs; not rank-invariant).

    ``registered`` maps each slot currently in ``idx_cache_task_dict`` to its ``need_prefill_tokens``: upstream
    decides by what that dict holds at the moment, which is exactly why its output depends on timing.
    """

    mode = UPSTREAM

    def __init__(self):
        # Latest layer-0 chunk per slot, not yet recovered (upstream's pending_layer0_signals).
        self._pending: Dict[int, Tuple[int, int]] = {}

    def add_signal(self, tasks: Sequence[SignalTask], registered: Mapping[int, int]) -> Released:
        tasks = check_signal_tasks(tasks)
        for slot, chunk_offset, prefilled_token_num in tasks:
            self._pending[slot] = (chunk_offset, prefilled_token_num)  # the latest signal per slot wins
        released = Released()
        for slot in dict.fromkeys(slot for slot, _, _ in tasks):
            if slot in registered:
                released.extend(self._recover(slot, registered[slot]))
        return released

    def add_registration(self, registration: Registration, registered: Mapping[int, int]) -> Released:
        return self._recover(registration.slot, registration.need_prefill_tokens)

    def add_notice(self, notice: Notice, registered: Mapping[int, int]) -> Released:
        return Released()  # #8034 knows no notices

    def waiting_signals(self) -> List[Tuple[SignalTask, ...]]:
        return [((slot, chunk_offset, end),) for slot, (chunk_offset, end) in self._pending.items()]

    def has_waiting(self) -> bool:
        return bool(self._pending)

    def open_registrations(self) -> Dict[int, List[str]]:
        return {}  # upstream keeps no registrations of its own: idx_cache_task_dict is its state

    def _recover(self, slot: int, need_prefill_tokens: int) -> Released:
        released = Released()
        if slot not in self._pending:
            return released
        _, prefilled_token_num = self._pending.pop(slot)
        if prefilled_token_num > need_prefill_tokens:
            reason = f"prefilled_token_num {prefilled_token_num} exceeds need_prefill_tokens {need_prefill_tokens}"
            released.drops.append(Drop(slot, prefilled_token_num, reason))
        else:
            released.batches.append(((slot, prefilled_token_num),))
        return released


def policy_after_first_read(
    policy: ReleasePolicy, announced: bool, registered: Mapping[int, int]
) -> Tuple[ReleasePolicy, Released]:
    """The policy that releases from the first cache-info read on, and what it released taking over (rule 10).

    ``announced``: the read starts with the engine's announcement (:data:`.notice.ENGINE`). Call it once, before
    the read's items reach the policy: an ``ordered`` policy without notices then holds no registration yet, only
    the layer-0 signals that came first, which ``upstream`` takes over in their order."""
    if announced or policy.mode != ORDERED:
        return policy, Released()
    if policy.open_registrations():
        raise ValueError("policy_after_first_read: the policy already holds registrations; call it at the first read")
    successor = UpstreamRelease()
    released = Released()
    for tasks in policy.waiting_signals():
        released.extend(successor.add_signal(tasks, registered))
    return successor, released


def make_release(mode: str) -> ReleasePolicy:
    """Return a fresh release policy for ``mode`` (``ordered`` or ``upstream``)."""
    if mode == ORDERED:
        return OrderedRelease()
    if mode == UPSTREAM:
        return UpstreamRelease()
    raise ValueError(f"unknown release mode {mode!r}; expected one of {', '.join(RELEASE_MODES)}")
