"""Thin adapters patched into ``CacheMessagerV1``: read the signal, lock, call the release core, put, log.

All decisions live in :mod:`fastdeploy_pd_fix.release`; this module only moves data between FastDeploy's objects
and the core, and makes sure that no malformed input or unexpected error ends a thread.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import sys
import threading
import time
from collections.abc import Mapping

from fastdeploy_pd_fix.diagnostics import (
    ENV_INJECT,
    BatchJournal,
    Watchdog,
    injected_delay,
    parse_injection,
    watchdog_deadline,
)
from fastdeploy_pd_fix.kv_signal import KV_SIGNAL_LENGTH, parse_kv_signal
from fastdeploy_pd_fix.release import MODES, Registration, make_release

_fallback_logger = logging.getLogger("fastdeploy_pd_fix")
_activation_lock = threading.Lock()
REQUIRED_ATTRIBUTES = (
    "engine_cache_task_thread_lock",
    "engine_cache_tasks",
    "idx_cache_task_dict",
    "cache_prefilled_engine_ids_queue",
)
NO_SIGNAL_BACKOFF_S = 0.001
ERROR_BACKOFF_S = 0.01


def messager_logger(messager) -> logging.Logger:
    """The cache messager's own logger (``cache_messager_rank{R}.log``) when its module has one."""
    module_logger = getattr(sys.modules.get(type(messager).__module__), "logger", None)
    return module_logger if hasattr(module_logger, "warning") else _fallback_logger


def _integral(value) -> int:
    """``value`` as an int if it is an integral number (``3``, ``numpy.int64(3)``, ``3.0``), else an error.

    ``int()`` alone would turn ``"3"`` into slot 3 although the engine stored the task under the key ``"3"``, and
    ``4.5`` into 4 tokens."""
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{value!r} is not a number")
    number = int(value)
    if number != value:
        raise ValueError(f"{value!r} is not an integral number")
    return number


class RegisteredNeeds(Mapping):
    """Read-only view of ``idx_cache_task_dict`` as slot -> need_prefill_tokens (what ``upstream`` mode asks)."""

    def __init__(self, tasks: dict):
        self._tasks = tasks

    def __getitem__(self, slot):
        return int(self._tasks[slot]["need_prefill_tokens"])

    def __contains__(self, slot):
        return slot in self._tasks

    def __iter__(self):
        return iter(list(self._tasks))

    def __len__(self):
        return len(self._tasks)


class RegistrationObservingDict(dict):
    """``idx_cache_task_dict`` that reports every stored task, after storing it, to the release runtime."""

    def __init__(self, tasks: dict, on_store):
        super().__init__(tasks)
        self._on_store = on_store

    def __setitem__(self, slot, task):
        super().__setitem__(slot, task)
        self._on_store(slot, task)


class ReleaseRuntime:
    """Per-messager state of the patch: release policy (None in observe mode), its lock, journal, watchdog."""

    def __init__(self, messager, mode: str, op, op_arguments: tuple):
        self.messager = messager
        self.mode = mode
        self.policy = make_release(mode) if mode in MODES else None
        self.lock = threading.Lock()  # our own: the original may hold engine_cache_task_thread_lock when storing
        self.op = op
        self.op_arguments = op_arguments
        self.logger = messager_logger(messager)
        self.journal = BatchJournal(messager.cache_prefilled_engine_ids_queue, self.logger.info)
        self.injections, problems = parse_injection(os.environ.get(ENV_INJECT, ""))
        for problem in problems:
            self.logger.warning(f"fastdeploy_pd_fix: {problem}")
        self.rank = getattr(messager, "rank", None)
        self._inject_registration_delay(injected_delay(self.injections, "registration", self.rank))
        self.signal_delay_s = injected_delay(self.injections, "signal", self.rank)
        if self.signal_delay_s and self.policy is not None:
            self.logger.warning(
                f"fastdeploy_pd_fix: {ENV_INJECT}: layer-0 signal handling delayed by {self.signal_delay_s}s "
                f"on rank {self.rank}"
            )
        elif self.signal_delay_s:
            self.logger.warning(
                f"fastdeploy_pd_fix: {ENV_INJECT}: signal delay not applied on rank {self.rank} in observe mode "
                "(the running release's own consume_signals reads the signals)"
            )
        deadline = watchdog_deadline()
        self.watchdog = Watchdog(deadline, self.journal, self.describe_state, self.logger.error) if deadline else None
        if self.policy is not None:
            messager.idx_cache_task_dict = RegistrationObservingDict(messager.idx_cache_task_dict, self.on_store)
        self.registered = RegisteredNeeds(messager.idx_cache_task_dict)
        if self.watchdog:
            self.watchdog.start()

    def _inject_registration_delay(self, delay_s: float) -> None:
        """Fault injection: hold every non-empty registration read back before the original processes it."""
        if delay_s <= 0:
            return
        queue_client = self.messager.engine_worker_queue
        get_cache_info = queue_client.get_cache_info

        def delayed_get_cache_info(*args, **kwargs):
            infos = get_cache_info(*args, **kwargs)
            if infos:
                time.sleep(delay_s)
            return infos

        queue_client.get_cache_info = delayed_get_cache_info
        self.logger.warning(f"fastdeploy_pd_fix: {ENV_INJECT}: registration delayed by {delay_s}s on rank {self.rank}")

    def describe_state(self) -> str:
        waiting = self.policy.waiting_signals() if self.policy else "n/a (observe mode)"
        registrations = self.policy.open_registrations() if self.policy else "n/a (observe mode)"
        return (
            f"mode={self.mode} rank={self.rank}\nwaiting layer-0 signals: {waiting}\n"
            f"open registrations per slot: {registrations}\n"
            f"idx_cache_task_dict slots: {sorted(self.messager.idx_cache_task_dict)}"
        )

    def publish(self, released, source: str) -> None:
        """Put released batches into the send queue (caller holds ``self.lock``) and log every drop."""
        for reason in released.ignored:
            self.logger.warning(f"fastdeploy_pd_fix: {reason}")
        for drop in released.drops:
            self.logger.warning(
                f"fastdeploy_pd_fix: dropped layer-0 task slot={drop.slot} "
                f"prefilled_token_num={drop.prefilled_token_num} from {source}: {drop.reason}"
            )
        for batch in released.batches:
            self.messager.cache_prefilled_engine_ids_queue.put(list(batch))  # the journal logs it with seq_hash
        if self.watchdog:
            progressed = bool(released.batches or released.drops)
            self.watchdog.note_release_step(progressed, bool(self.policy.waiting_signals()))

    def on_store(self, slot, task) -> None:
        """Registration hook, called in the registration thread right after ``idx_cache_task_dict[slot] = task``."""
        try:
            registration = Registration(
                _integral(slot), str(task["request_id"]), _integral(task["need_prefill_tokens"])
            )
        except Exception as error:  # whatever the task holds, the original registration loop must go on
            self.logger.error(f"fastdeploy_pd_fix: registration for slot {slot!r} ignored, malformed task: {error!r}")
            return
        try:
            with self.lock:
                self.publish(self.policy.add_registration(registration, self.registered), "registration")
        except Exception:
            self.logger.exception(f"fastdeploy_pd_fix: failed to handle registration of slot {slot}")

    def consume_signals_forever(self) -> None:
        """The replacement ``consume_signals`` loop: read, validate, record progress, release."""
        import paddle

        paddle.device.set_device("cpu")
        buffer = paddle.full([KV_SIGNAL_LENGTH], -1, dtype="int32")
        engine_cache_tasks = self.messager.engine_cache_tasks
        while True:
            try:
                self.op(buffer, *self.op_arguments)
                parsed = parse_kv_signal(buffer.numpy(), num_slots=len(engine_cache_tasks))
                for problem in parsed.problems:
                    self.logger.warning(f"fastdeploy_pd_fix: malformed kv signal: {problem}")
                signal = parsed.signal
                if signal is None:
                    if not parsed.problems:
                        time.sleep(NO_SIGNAL_BACKOFF_S)
                    continue
                with self.messager.engine_cache_task_thread_lock:
                    for slot, prefilled_token_num in signal.tasks:
                        engine_cache_tasks[slot]["prefilled_layer_idx"] = signal.layer
                        engine_cache_tasks[slot]["prefilled_token_num"] = prefilled_token_num
                if signal.layer == 0 and signal.tasks:
                    if self.signal_delay_s:
                        time.sleep(self.signal_delay_s)  # fault injection, inert unless configured
                    with self.lock:
                        self.publish(self.policy.add_signal(signal.tasks, self.registered), "kv signal")
            except Exception:
                self.logger.exception("fastdeploy_pd_fix: error in consume_signals; continuing")
                time.sleep(ERROR_BACKOFF_S)


def _resolve_op(original_consume_signals, analysis):
    if analysis.op_import_module:
        return getattr(importlib.import_module(analysis.op_import_module), "get_output_kv_signal")
    return original_consume_signals.__globals__["get_output_kv_signal"]


def activate(messager):
    """Create the messager's :class:`ReleaseRuntime` once, or return None to stand aside for this instance."""
    with _activation_lock:
        if "_fd_pd_fix_runtime" in vars(messager):
            return messager._fd_pd_fix_runtime
        cls = type(messager)
        logger = messager_logger(messager)
        runtime = None
        try:
            missing = [name for name in REQUIRED_ATTRIBUTES if not hasattr(messager, name)]
            if missing:
                raise AttributeError(f"missing attributes {', '.join(missing)}")
            if type(messager.idx_cache_task_dict) is not dict:
                raise TypeError(f"idx_cache_task_dict is a {type(messager.idx_cache_task_dict).__name__}")
            analysis = cls._fd_pd_fix_analysis
            op_arguments = eval(f"lambda self: ({', '.join(analysis.op_arguments)},)")(messager)
            op = _resolve_op(cls._fd_pd_fix_originals["consume_signals"], analysis)
            runtime = ReleaseRuntime(messager, cls._fd_pd_fix_mode, op, op_arguments)
            # The decision line again, now into the messager's own log (the first one went to its stderr).
            logger.info(f"{cls._fd_pd_fix_record.describe()}; active on rank_id={getattr(messager, 'rank_id', '?')}")
        except Exception as error:
            logger.warning(f"fastdeploy_pd_fix: stood aside for this messager, original methods run: {error!r}")
        messager._fd_pd_fix_runtime = runtime
        return runtime


def make_consume_signals(original):
    @functools.wraps(original)
    def consume_signals(self):
        runtime = activate(self)
        if runtime is None or runtime.policy is None:
            return original(self)  # stood aside, or observe mode: upstream's release runs
        runtime.consume_signals_forever()

    consume_signals.__fd_pd_fix__ = True
    return consume_signals


def make_add_cache_task_thread(original):
    @functools.wraps(original)
    def _add_cache_task_thread(self):
        activate(self)  # installs the registration observer before the original loop stores anything
        return original(self)

    _add_cache_task_thread.__fd_pd_fix__ = True
    return _add_cache_task_thread
