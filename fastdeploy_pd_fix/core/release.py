"""Release logic: which layer-0 kv signals become transfer batches, and when.

This is the functional core. It has no threads, locks, sleeps, paddle or I/O: the cache messager's two prefill
threads feed it the two streams they see (layer-0 kv signals and completed registrations) and put the batches it
returns into ``cache_prefilled_engine_ids_queue`` (see :mod:`.messager_step`). Tests and the interleaving explorer
drive the very same objects.

The two streams are identical on every tensor-parallel rank; only their interleaving differs from rank to rank.
Every batch costs one ``begin_send_cache_barrier`` round and every finished request one ``finish_send_cache_barrier``
round, so ranks must release the same sequence of batches or they block each other forever.

Two policies implement :class:`ReleasePolicy` (``add_signal`` / ``add_registration``, both returning a
:class:`Released`):

``ordered`` (:class:`OrderedRelease`, the default)
    The batch sequence is a function of the two streams alone, never of their timing:

    1. Layer-0 signals are kept in arrival order and released strictly in that order, one batch per signal
       (the engine's own granularity, so no extra barrier rounds).
    2. Each task ``(slot, prefilled_token_num)`` binds to a registration of its slot: tasks of a slot bind, in
       signal order, to the registrations of that slot in registration order. A registration stays the slot's
       current one until a task bound to it reaches its ``need_prefill_tokens`` (the final chunk); the next
       task of that slot then binds to the slot's next registration.
    3. The oldest signal waits while one of its tasks has no registration to bind to. Nothing is released
       before its task is registered, and nothing behind it overtakes it.
    4. Abandonment rule, decided by content only and therefore identical on every rank: a task is dropped
       (never released, and reported in :attr:`Released.drops`) when it cannot belong to the registration it
       binds to: its token number exceeds that request's ``need_prefill_tokens``, or it does not advance past
       the token number already released for that request (a duplicate or a stale signal). A signal whose
       tasks are all dropped releases no batch.

    5. A registration of the request that is already its slot's latest registration is ignored (reported in
       :attr:`Released.ignored`): a repeated cache-info part can complete the same task twice, on some ranks
       only, depending on when the send loop cleans ``cache_info`` up; counting it would bind the slot's next
       request to a stale registration.

    A task whose request never registers therefore waits until its slot is registered again (FastDeploy hands
    a freed slot to the next request) and is then judged by rule 4 against that registration. This is the same
    slot-based binding upstream uses; only the order is made deterministic.

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

#: One transfer task as put into ``cache_prefilled_engine_ids_queue``: ``(engine slot, prefilled_token_num)``.
Task = Tuple[int, int]
#: One batch: the tasks the send thread handles under a single ``begin_send_cache_barrier`` round.
Batch = Tuple[Task, ...]

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

    def __post_init__(self):
        _check_non_negative_int("slot", self.slot)
        _check_non_negative_int("need_prefill_tokens", self.need_prefill_tokens)
        if self.need_prefill_tokens == 0:
            raise ValueError(f"registration of {self.request_id!r}: need_prefill_tokens must be positive")


@dataclass(frozen=True)
class Drop:
    """A layer-0 task that was abandoned instead of released, and why."""

    slot: int
    prefilled_token_num: int
    reason: str


@dataclass
class Released:
    """What one call released: batches to put into the queue, in order, and tasks abandoned on the way."""

    batches: List[Batch] = field(default_factory=list)
    drops: List[Drop] = field(default_factory=list)
    ignored: List[str] = field(default_factory=list)  # registrations not counted, and why

    def extend(self, other: "Released") -> None:
        self.batches.extend(other.batches)
        self.drops.extend(other.drops)
        self.ignored.extend(other.ignored)


def _check_non_negative_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")


def check_tasks(tasks: Sequence[Task]) -> Tuple[Task, ...]:
    """``tasks`` as a tuple of ``(slot, prefilled_token_num)`` pairs of non-negative ints, or ValueError."""
    checked = []
    for task in tasks:
        try:
            slot, prefilled_token_num = task
        except (TypeError, ValueError):
            raise ValueError(f"a task must be a (slot, prefilled_token_num) pair, got {task!r}") from None
        _check_non_negative_int("slot", slot)
        _check_non_negative_int("prefilled_token_num", prefilled_token_num)
        checked.append((slot, prefilled_token_num))
    return tuple(checked)


class ReleasePolicy(Protocol):
    """What the messager step and the explorer need of a release policy.

    ``registered`` maps each slot currently in ``idx_cache_task_dict`` to its ``need_prefill_tokens``; only policies
    that decide by what the dict holds at the moment (upstream's) read it.
    """

    mode: str

    def add_signal(self, tasks: Sequence[Task], registered: Mapping[int, int]) -> Released:
        """Take one layer-0 signal (its tasks in engine order) and return what became ready."""

    def add_registration(self, registration: Registration, registered: Mapping[int, int]) -> Released:
        """Take one completed registration and return what became ready."""

    def waiting_signals(self) -> List[Batch]:
        """Tasks received and neither released nor dropped, oldest signal first."""

    def has_waiting(self) -> bool:
        """Whether :meth:`waiting_signals` would be non-empty (cheap: the watchdog asks after every step)."""

    def open_registrations(self) -> Dict[int, List[str]]:
        """Request ids registered per slot whose final chunk has not been released yet."""


class OrderedRelease:
    """Rank-invariant release: signals in arrival order, each waiting until its tasks are bound.

    ``registered`` arguments are accepted for interface parity with :class:`UpstreamRelease` and ignored: this
    policy's decisions depend on the content of the two streams only.
    """

    mode = ORDERED

    def __init__(self):
        # Layer-0 signals not yet released, oldest first; each is the list of its still unbound tasks.
        self._waiting_signals: Deque[List[Task]] = deque()
        # Tasks of the oldest signal that are already bound (rule 2 consumed their registration state).
        self._bound_head: List[Task] = []
        # Registrations per slot, oldest first; the first one is the slot's current registration.
        self._registrations: Dict[int, Deque[Registration]] = {}
        # Highest token number released for the current registration of each slot.
        self._released_tokens: Dict[int, int] = {}
        # Request id of each slot's latest counted registration (rule 5).
        self._latest_request: Dict[int, str] = {}

    def add_signal(self, tasks: Sequence[Task], registered: Optional[Mapping[int, int]] = None) -> Released:
        """Append one layer-0 signal (its tasks in engine order) and release whatever became ready."""
        self._waiting_signals.append(list(check_tasks(tasks)))
        return self._release_ready_batches()

    def add_registration(self, registration: Registration, registered: Optional[Mapping[int, int]] = None) -> Released:
        """Record one completed registration and release whatever became ready."""
        if self._latest_request.get(registration.slot) == registration.request_id:
            reason = (
                f"registration for slot {registration.slot} ignored: request {registration.request_id} is already "
                "the slot's latest registration (a repeated cache-info part)"
            )
            return Released(ignored=[reason])
        self._latest_request[registration.slot] = registration.request_id
        self._registrations.setdefault(registration.slot, deque()).append(registration)
        return self._release_ready_batches()

    def waiting_signals(self) -> List[Batch]:
        """Signals not yet released, oldest first, each with all its tasks (bound or not) in engine order."""
        waiting = [tuple(tasks) for tasks in self._waiting_signals]
        if waiting:
            waiting[0] = tuple(self._bound_head) + waiting[0]
        return waiting

    def has_waiting(self) -> bool:
        return bool(self._waiting_signals)

    def open_registrations(self) -> Dict[int, List[str]]:
        """Request ids registered per slot whose final chunk has not been released yet."""
        return {slot: [r.request_id for r in regs] for slot, regs in self._registrations.items() if regs}

    def _release_ready_batches(self) -> Released:
        released = Released()
        while self._waiting_signals:
            head = self._waiting_signals[0]
            while head:
                slot, prefilled_token_num = head[0]
                registrations = self._registrations.get(slot)
                if not registrations:
                    return released  # rule 3: the oldest signal waits for its registration
                head.pop(0)
                drop_reason = self._bind(registrations, slot, prefilled_token_num)
                if drop_reason is None:
                    self._bound_head.append((slot, prefilled_token_num))
                else:
                    released.drops.append(Drop(slot, prefilled_token_num, drop_reason))
            self._waiting_signals.popleft()
            if self._bound_head:
                released.batches.append(tuple(self._bound_head))
            self._bound_head = []
        return released

    def _bind(self, registrations: Deque[Registration], slot: int, prefilled_token_num: int) -> Optional[str]:
        """Bind one task to its slot's current registration (rule 2) or return why it is dropped (rule 4)."""
        current = registrations[0]
        already_released = self._released_tokens.get(slot, 0)
        if prefilled_token_num > current.need_prefill_tokens:
            return (
                f"prefilled_token_num {prefilled_token_num} exceeds need_prefill_tokens "
                f"{current.need_prefill_tokens} of request {current.request_id}"
            )
        if prefilled_token_num <= already_released:
            return (
                f"prefilled_token_num {prefilled_token_num} does not advance past {already_released} already "
                f"released for request {current.request_id}"
            )
        if prefilled_token_num == current.need_prefill_tokens:
            registrations.popleft()  # final chunk: the slot's next task belongs to its next registration
            self._released_tokens.pop(slot, None)
        else:
            self._released_tokens[slot] = prefilled_token_num
        return None


class UpstreamRelease:
    """The release semantics of upstream PR #8034 (for parity and A/B runs; not rank-invariant).

    ``registered`` maps each slot currently in ``idx_cache_task_dict`` to its ``need_prefill_tokens``: upstream
    decides by what that dict holds at the moment, which is exactly why its output depends on timing.
    """

    mode = UPSTREAM

    def __init__(self):
        # Latest layer-0 token number per slot, not yet recovered (upstream's pending_layer0_signals).
        self._pending: Dict[int, int] = {}

    def add_signal(self, tasks: Sequence[Task], registered: Mapping[int, int]) -> Released:
        tasks = check_tasks(tasks)
        for slot, prefilled_token_num in tasks:
            self._pending[slot] = prefilled_token_num  # the latest signal per slot wins
        released = Released()
        for slot in dict.fromkeys(slot for slot, _ in tasks):
            if slot in registered:
                released.extend(self._recover(slot, registered[slot]))
        return released

    def add_registration(self, registration: Registration, registered: Mapping[int, int]) -> Released:
        return self._recover(registration.slot, registration.need_prefill_tokens)

    def waiting_signals(self) -> List[Batch]:
        return [((slot, prefilled_token_num),) for slot, prefilled_token_num in self._pending.items()]

    def has_waiting(self) -> bool:
        return bool(self._pending)

    def open_registrations(self) -> Dict[int, List[str]]:
        return {}  # upstream keeps no registrations of its own: idx_cache_task_dict is its state

    def _recover(self, slot: int, need_prefill_tokens: int) -> Released:
        released = Released()
        if slot not in self._pending:
            return released
        prefilled_token_num = self._pending.pop(slot)
        if prefilled_token_num > need_prefill_tokens:
            reason = f"prefilled_token_num {prefilled_token_num} exceeds need_prefill_tokens {need_prefill_tokens}"
            released.drops.append(Drop(slot, prefilled_token_num, reason))
        else:
            released.batches.append(((slot, prefilled_token_num),))
        return released


def make_release(mode: str) -> ReleasePolicy:
    """Return a fresh release policy for ``mode`` (``ordered`` or ``upstream``)."""
    if mode == ORDERED:
        return OrderedRelease()
    if mode == UPSTREAM:
        return UpstreamRelease()
    raise ValueError(f"unknown release mode {mode!r}; expected one of {', '.join(RELEASE_MODES)}")
