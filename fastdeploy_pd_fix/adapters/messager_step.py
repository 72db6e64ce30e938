"""The engine-facing step of the prefill cache messager: kv signal in, progress recorded, batches out.

One copy of every rule that touches FastDeploy's objects, shared by the plugin (which patches it into a running
``CacheMessagerV1``) and by the fix carried into FastDeploy itself (``make-patch`` copies this package verbatim):

* :meth:`MessagerStep.handle_buffer`: parse one kv signal buffer, record each task's progress in
  ``engine_cache_tasks`` under ``engine_cache_task_thread_lock`` (as upstream does), hand layer-0 tasks to the
  release policy and put what it releases into ``cache_prefilled_engine_ids_queue``.
* :meth:`MessagerStep.handle_notice`: hand an engine notice (:mod:`.notice`), taken out of a ``get_cache_info``
  result by :func:`strip_notices` before the registration loop sees it, to the release policy.
* :meth:`MessagerStep.handle_registration`: turn a task just stored in ``idx_cache_task_dict`` into a
  :class:`~.release.Registration` and release what became ready. :class:`BoundTaskDict` replaces the messager's
  ``idx_cache_task_dict``: it reports every store, and shows the send thread, for each slot of the batch it took,
  the task that batch was bound to (release rule 7), not the slot's newest registration.
* :class:`~.messager_log.BatchJournal`: every queued batch is logged as ``queued batch #N [...] seq_hash=H``, a
  rolling fingerprint equal on every rank until their sequences diverge (``fastdeploy-pd-fix diagnose`` reads it);
  :class:`~.messager_log.CountSummary` counts what the step did, in one line a minute at most.
* :func:`consume_signals_forever`: the loop of the replacement ``consume_signals``; no input ends it.

Standard library and numpy only: no paddle (the caller reads the op's buffer into numpy), no FastDeploy import.
"""

from __future__ import annotations

import numbers
import threading
import time
import weakref
from collections import deque
from collections.abc import Mapping
from typing import Callable, Dict, Optional, Tuple

from ..policy.kv_signal import parse_kv_signal
from ..policy.notice import ENGINE, Notice, decode, is_notice, split_notices
from ..policy.release import ORDERED, Registration, Released, ReleasePolicy, make_release, policy_after_first_read
from .messager_log import BatchJournal, CountSummary, ErrorBackoff

#: Pause after a read that found no signal (the op is non-blocking in some releases: do not spin).
NO_SIGNAL_BACKOFF_S = 0.001
#: The messager attribute :func:`step_for` keeps the messager's step in.
STEP_ATTRIBUTE = "_layer0_release_step"


def integral(value) -> int:
    """``value`` as an int if it is an integral number (``3``, ``numpy.int64(3)``, ``3.0``), else an error.

    ``int()`` alone would turn ``"3"`` into slot 3 although the engine stored the task under the key ``"3"``, and
    ``4.5`` into 4 tokens."""
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{value!r} is not a number")
    number = int(value)
    if number != value:
        raise ValueError(f"{value!r} is not an integral number")
    return number


def registration_from_task(slot, task) -> Registration:
    """The registration a task stored as ``idx_cache_task_dict[slot] = task`` stands for; ValueError/TypeError/
    KeyError when the task is malformed."""
    return Registration(integral(slot), str(task["request_id"]), integral(task["need_prefill_tokens"]), task)


class RegisteredNeeds(Mapping):
    """Live read-only view of a messager's ``idx_cache_task_dict`` as slot -> ``need_prefill_tokens``.

    It reads the attribute on every access, so it stays right when the dict object is replaced."""

    def __init__(self, messager):
        self._messager = messager

    def __getitem__(self, slot):
        return int(self._messager.idx_cache_task_dict[slot]["need_prefill_tokens"])

    def __contains__(self, slot):
        return slot in self._messager.idx_cache_task_dict

    def __iter__(self):
        return iter(list(self._messager.idx_cache_task_dict))

    def __len__(self):
        return len(self._messager.idx_cache_task_dict)


class BoundTaskDict(dict):
    """The messager's ``idx_cache_task_dict`` under a :class:`MessagerStep`.

    Every store is reported to the step, after storing, as a registration. The send loop (its thread, and any worker
    thread it sends from), while it holds a batch, reads for each slot of that batch the task the batch was bound to
    (release rule 7): an aborted request's batch still queued when the slot's next request registered is sent with
    the aborted request's own blocks, and the cleanup after its send (``del``) leaves the next request's entry in
    place. The registration and consume threads see a plain dict.
    """

    def __init__(self, tasks: dict, step: "MessagerStep"):
        super().__init__(tasks)
        self._step = step

    def __setitem__(self, slot, task):
        self._step.not_a_sender()  # only the registration thread stores
        super().__setitem__(slot, task)
        self._step.handle_registration(slot, task)

    def __getitem__(self, slot):
        bound = self._step.bound_task(slot)
        return bound if bound is not None else super().__getitem__(slot)

    def __contains__(self, slot):
        return self._step.bound_task(slot) is not None or super().__contains__(slot)

    def get(self, slot, default=None):
        bound = self._step.bound_task(slot)
        return bound if bound is not None else super().get(slot, default)

    def __delitem__(self, slot):
        bound = self._step.bound_task(slot)
        if bound is None:
            super().__delitem__(slot)
        elif super().get(slot) is bound:
            super().__delitem__(slot)  # the slot still holds the request just sent; a newer one stays

    def pop(self, slot, *default):
        bound = self._step.bound_task(slot)
        if bound is None:
            return super().pop(slot, *default)
        if super().get(slot) is bound:
            super().pop(slot)
        return bound


class BoundProgressList(list):
    """The messager's ``engine_cache_tasks`` (per-slot progress) under a :class:`MessagerStep`.

    After sending a request's final chunk the send loop resets its slot's progress (``engine_cache_tasks[slot] =
    dict()``). When that request was aborted and its slot already carries a later request's layer-0 signal, the reset
    would wipe the later request's progress and its batch would fail for ever: the send thread's reset of such a slot
    is skipped (and logged). Every other access is a plain list's.
    """

    def __init__(self, progress: list, step: "MessagerStep"):
        super().__init__(progress)
        self._step = step

    def __setitem__(self, slot, value):
        if isinstance(slot, int) and self._step.superseded_progress(slot):
            self._step.logger.info(
                f"{self._step.log_prefix}kept slot {slot}'s progress: it belongs to a later request than the batch "
                "just sent (an aborted request's send would have reset it)"
            )
            return
        super().__setitem__(slot, value)


class MessagerStep:
    """One messager's release state and what each of its two prefill threads does with a new input.

    ``before_layer0`` runs before a layer-0 signal reaches the policy (fault injection), ``after_release`` after
    every release step with what it released (the watchdog). Neither is needed in FastDeploy itself.
    """

    def __init__(
        self,
        messager,
        policy: ReleasePolicy,
        logger,
        log_prefix: str,
        before_layer0: Optional[Callable[[], None]] = None,
        after_release: Optional[Callable[[Released], None]] = None,
    ):
        self.messager = messager
        # Rule 7: per queued batch, oldest first, the batch object and slot -> bound task; for the batch the send
        # loop holds (the last one taken from the queue), slot -> bound task and the number of its layer-0 signal
        # (see BoundProgressList). Every thread reads through the held batch but the messager's registration and
        # consume threads (:meth:`not_a_sender`): the send loop may read from worker threads of its own (#7931).
        self._queued_bindings: deque = deque()
        self._held: Tuple[Dict[int, object], Optional[int]] = ({}, None)
        # Threads, not their idents: an ended thread's ident can come back as a new thread's (a send worker's).
        self._taker: Optional[threading.Thread] = None  # the thread that took it
        self._not_senders: "weakref.WeakSet[threading.Thread]" = weakref.WeakSet()
        # Layer-0 signals handed to the policy so far, and per slot the number of the latest one that had a task
        # for it.
        self._layer0_signals = 0
        self._latest_layer0_signal: Dict[int, int] = {}
        self.policy = policy
        self.logger = logger
        self.log_prefix = log_prefix
        # Our own lock: the registration thread may already hold engine_cache_task_thread_lock when it stores a task.
        self.lock = threading.Lock()
        self.journal = BatchJournal(logger.info, log_prefix)
        self.summary = CountSummary(logger.info, log_prefix)
        self.registered = RegisteredNeeds(messager)
        self.before_layer0 = before_layer0
        self.after_release = after_release
        self.early_layer0_signals = 0
        # Whether the engine announced its notices at the head of the first cache-info batch (None: no batch yet).
        self.engine_notices: Optional[bool] = None

    def handle_buffer(self, values) -> bool:
        """Handle one kv signal buffer (as numpy); False when it held no signal and no problem (back off then).

        A signal for a layer ``>=`` the messager's ``num_layers`` (when it has a positive integer one) is logged and
        dropped whole, like any other malformed signal."""
        engine_cache_tasks = self.messager.engine_cache_tasks
        num_layers = getattr(self.messager, "num_layers", None)  # a messager without it: no layer bound
        if isinstance(num_layers, bool) or not isinstance(num_layers, numbers.Integral) or num_layers <= 0:
            num_layers = None
        parsed = parse_kv_signal(values, num_slots=len(engine_cache_tasks), num_layers=num_layers)
        for problem in parsed.problems:
            self.logger.warning(f"{self.log_prefix}malformed kv signal: {problem}")
        signal = parsed.signal
        if signal is None:
            return bool(parsed.problems)
        with self.messager.engine_cache_task_thread_lock:
            for slot, _, prefilled_token_num in signal.tasks:
                engine_cache_tasks[slot]["prefilled_layer_idx"] = signal.layer
                engine_cache_tasks[slot]["prefilled_token_num"] = prefilled_token_num
        if signal.layer == 0 and signal.tasks:
            self._count_early(signal.tasks)
            if self.before_layer0 is not None:
                self.before_layer0()
            with self.lock:
                released = self.policy.add_signal(signal.tasks, self.registered)
                for slot, _, _ in signal.tasks:
                    self._latest_layer0_signal[slot] = self._layer0_signals
                self._layer0_signals += 1
                self.publish(released, "kv signal")
        return True

    def _count_early(self, tasks) -> None:
        """Log each layer-0 task whose slot has no registration yet: the race this fix is about, seen on this rank
        (the GPU e2e test counts these lines to prove the race happened)."""
        for slot, chunk_offset, end in tasks:
            if slot not in self.messager.idx_cache_task_dict:
                self.early_layer0_signals += 1
                self.summary.add("early layer-0 signals")
                self.logger.info(
                    f"{self.log_prefix}early layer-0 signal #{self.early_layer0_signals}: slot {slot} chunk "
                    f"[{chunk_offset}, {end}) arrived before its registration"
                )

    def handle_first_read(self, announcement: Optional[Notice]) -> None:
        """Learn, once, whether the engine puts notices: its announcement heads the first cache-info batch, or not.
        Ordered mode without them releases by upstream's rule from here on (release rule 10); logged either way."""
        self.engine_notices = announcement is not None
        mode = self.policy.mode
        try:
            with self.lock:
                self.policy, released = policy_after_first_read(self.policy, self.engine_notices, self.registered)
                self.publish(released, "first cache-info read")
        except Exception:  # never into the registration loop; the policy stays as it was
            self.logger.exception(f"{self.log_prefix}failed to take the first cache-info read's announcement")
        if announcement is not None:
            self.logger.info(
                f"{self.log_prefix}engine notices: on ({announcement.describe()}, first cache-info batch)"
            )
        elif mode != ORDERED:
            self.logger.info(f"{self.log_prefix}engine notices: off (not announced; {mode} reads none)")
        elif self.policy.mode != ORDERED:
            self.summary.add("ordered handed to upstream (engine notices off)")
            self.logger.warning(
                f"{self.log_prefix}engine notices: OFF: the first cache-info batch does not start with the engine's "
                "announcement (its engine side is switched off, stands aside, or is of another version). Without "
                "notices a request sent to this prefill server directly, not through the router, cannot be told "
                f"from a late registration, so release goes on by {self.policy.mode}'s rule (#8034) instead of "
                "ordered: never held behind such a request, but the chunked and cross-order races (s2, s3) can "
                "hang the ranks again; switch the engine side on to get ordered back"
            )
        else:
            self.logger.warning(
                f"{self.log_prefix}engine notices: OFF, and ordered release stays on (the hand-over failed, see "
                "above): a request sent to this prefill server directly holds every later transfer while it keeps "
                "its slot"
            )

    def handle_notice(self, notice: Notice) -> None:
        """Hand one engine notice to the policy and release what became ready; never raises."""
        self.logger.info(f"{self.log_prefix}engine notice: {notice.describe()}")
        self.summary.add(f"{notice.kind} notices read")
        try:
            with self.lock:
                self.publish(self.policy.add_notice(notice, self.registered), "notice")
        except Exception:
            self.logger.exception(f"{self.log_prefix}failed to handle {notice.describe()}")

    def attach(self) -> None:
        """Watch the messager's registrations and batch queue (idempotent): ``idx_cache_task_dict`` becomes a
        :class:`BoundTaskDict` (tasks already in it are handled as registrations, in their order),
        ``engine_cache_tasks`` a :class:`BoundProgressList`, the queue's ``get`` tells which batch the send
        thread holds, and engine notices are taken out of ``get_cache_info`` results (:func:`strip_notices`)."""
        with self.lock:
            if isinstance(self.messager.idx_cache_task_dict, BoundTaskDict):
                return
            existing = dict(self.messager.idx_cache_task_dict)
            self.messager.idx_cache_task_dict = BoundTaskDict(existing, self)
            self.messager.engine_cache_tasks = BoundProgressList(self.messager.engine_cache_tasks, self)
            batch_queue = self.messager.cache_prefilled_engine_ids_queue
            original_get = batch_queue.get

            def get(*args, **kwargs):
                batch = original_get(*args, **kwargs)
                self._hold(batch)
                return batch

            batch_queue.get = get
            strip_notices(self.messager, self.handle_notice, self.logger, self.log_prefix, self.handle_first_read)
        for slot, task in existing.items():
            self.handle_registration(slot, task)

    def not_a_sender(self) -> None:
        """The calling thread is not the send loop's (the registration or the consume thread): it reads
        ``idx_cache_task_dict`` and ``engine_cache_tasks`` as they are."""
        self._not_senders.add(threading.current_thread())

    def _sender_view(self) -> Tuple[Dict[int, object], Optional[int]]:
        thread = threading.current_thread()
        return self._held if thread == self._taker or thread not in self._not_senders else ({}, None)

    def _hold(self, batch) -> None:
        """The send loop took ``batch`` from the queue: from now on its threads see that batch's bound tasks.

        Bindings of batches queued before ``batch`` are discarded: those were taken by a ``get`` that started before
        :meth:`attach` wrapped it (the send thread is usually blocked in ``get`` already when the first registration
        attaches the step) and have been read from the dict as they were."""
        with self.lock:
            bound, signal_number = {}, None
            for position, (queued, bound_tasks, number) in enumerate(self._queued_bindings):
                if queued is batch:
                    for _ in range(position + 1):
                        self._queued_bindings.popleft()
                    bound, signal_number = bound_tasks, number
                    break
            self._held, self._taker = (bound, signal_number), threading.current_thread()

    def superseded_progress(self, slot) -> bool:
        """Whether a layer-0 signal for ``slot`` arrived after the one the send loop's held batch is (asked by a
        thread of the send loop): that slot's progress in ``engine_cache_tasks`` then belongs to a later request (the
        held one was aborted)."""
        held = self._sender_view()[1]
        return held is not None and self._latest_layer0_signal.get(slot, -1) > held

    def bound_task(self, slot):
        """The task the send loop's held batch is bound to for ``slot`` (asked by a thread of the send loop), or None
        (read the dict then)."""
        return self._sender_view()[0].get(slot)

    def handle_registration(self, slot, task) -> None:
        """Called right after ``idx_cache_task_dict[slot] = task``; never raises (the registration loop goes on)."""
        try:
            registration = registration_from_task(slot, task)
        except Exception as error:
            self.logger.error(f"{self.log_prefix}registration for slot {slot!r} ignored, malformed task: {error!r}")
            return
        try:
            with self.lock:
                self.publish(self.policy.add_registration(registration, self.registered), "registration")
        except Exception:
            self.logger.exception(f"{self.log_prefix}failed to handle registration of slot {slot}")

    def publish(self, released: Released, source: str) -> None:
        """Log what was decided or dropped, then journal and queue each batch in order (caller holds the lock)."""
        self.summary.add("batches queued", len(released.batches))
        self.summary.add("tasks dropped", len(released.drops))
        self.summary.add("parts ignored or requests abandoned", len(released.decisions))
        for decision in released.decisions:
            self.logger.warning(f"{self.log_prefix}{decision.describe()}")
        for drop in released.drops:
            self.logger.warning(
                f"{self.log_prefix}dropped layer-0 task slot={drop.slot} "
                f"prefilled_token_num={drop.prefilled_token_num} from {source}: {drop.reason}"
            )
        for index, batch in enumerate(released.batches):
            self.journal.record(batch)
            queued = list(batch)
            if index < len(released.bindings):
                bound = {slot: registration.task for (slot, _), registration in zip(batch, released.bindings[index])}
                self._queued_bindings.append((queued, bound, released.signal_numbers[index]))
            self.messager.cache_prefilled_engine_ids_queue.put(queued)
        if self.after_release is not None:
            self.after_release(released)


def announcement_of(items: list) -> Optional[Notice]:
    """The engine's announcement when it heads ``items`` (the stream's first batch), else None."""
    if not is_notice(items[0]):
        return None
    try:
        notice = decode(items[0])
    except (TypeError, ValueError):
        return None
    return notice if notice.kind == ENGINE else None


def strip_notices(
    messager,
    handle: Callable[[Notice], None],
    logger,
    log_prefix: str,
    on_first_read: Optional[Callable[[Optional[Notice]], None]] = None,
) -> None:
    """Wrap the messager's ``engine_worker_queue.get_cache_info`` so that engine notices are handed to ``handle``, in
    stream order, and never reach the registration loop (a read of notices only is an empty read: every rank reads
    the same batch, so every rank skips the same barriers); ``on_first_read`` learns, at the first non-empty read,
    the engine's announcement heading it, or None. A messager without that queue is left as it is."""
    queue_client = getattr(messager, "engine_worker_queue", None)
    get_cache_info = getattr(queue_client, "get_cache_info", None)
    if get_cache_info is None:
        return
    first_read = [on_first_read] if on_first_read is not None else []

    def get_cache_info_without_notices(*args, **kwargs):
        items = get_cache_info(*args, **kwargs)
        if not items or not isinstance(items, list):
            return items
        if first_read:
            first_read.pop()(announcement_of(items))
        others, notices, problems = split_notices(items)
        for problem in problems:
            logger.error(f"{log_prefix}{problem}")
        for notice in notices:
            handle(notice)
        return others

    queue_client.get_cache_info = get_cache_info_without_notices


def make_step(messager, mode: str, logger, log_prefix: str, **hooks) -> MessagerStep:
    """A :class:`MessagerStep` for ``messager`` with a fresh ``mode`` release policy."""
    return MessagerStep(messager, make_release(mode), logger, log_prefix, **hooks)


def step_for(messager, mode: str, logger, log_prefix: str = "layer0_release: ") -> MessagerStep:
    """The messager's step, created on first use by whichever of its two threads comes first.

    ``dict.setdefault`` is atomic: both threads get the same step, a racing thread's spare one is dropped."""
    state = vars(messager).get(STEP_ATTRIBUTE)
    if state is None:
        state = vars(messager).setdefault(STEP_ATTRIBUTE, make_step(messager, mode, logger, log_prefix))
    return state


def consume_signals_forever(
    step: MessagerStep, read_signal: Callable[[], object], sleep: Callable[[float], None] = time.sleep
) -> None:
    """Read one kv signal buffer after another (``read_signal`` calls the op and returns the buffer as numpy) and
    hand each to ``step``. An error is logged and the loop goes on (:class:`~.messager_log.ErrorBackoff`: a growing
    pause, a bounded log): a dead ``consume_signals`` hangs the engine."""
    errors = ErrorBackoff(step.logger, f"{step.log_prefix}error in consume_signals")
    step.not_a_sender()
    while True:
        try:
            if not step.handle_buffer(read_signal()):
                sleep(NO_SIGNAL_BACKOFF_S)
        except Exception as error:
            sleep(errors.failed(error))
        else:
            errors.succeeded()
