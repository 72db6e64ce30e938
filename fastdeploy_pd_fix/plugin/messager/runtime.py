"""The patched methods of ``CacheMessagerV1`` and the per-messager state they share.

Thin adapters: every rule that touches FastDeploy's objects is in :mod:`fastdeploy_pd_fix.adapters.messager_step`
(the same code a FastDeploy with the upstreamed fix runs). This module only

* activates the plugin once per messager instance (:func:`activate`), or stands aside for that instance, with a
  warning, when it lacks what the step needs;
* connects the instance to a :class:`~fastdeploy_pd_fix.adapters.messager_step.MessagerStep`: the kv-signal op call of
  the running release (its arguments from :class:`fastdeploy_pd_fix.analysis.OpArgument`, no ``eval``), and
  :meth:`~fastdeploy_pd_fix.adapters.messager_step.MessagerStep.attach`, which makes ``idx_cache_task_dict`` a
  :class:`~fastdeploy_pd_fix.adapters.messager_step.BoundTaskDict` (every store reported, the send thread shown its
  batch's own tasks);
* adds queue observation, the watchdog and fault injection (:mod:`.observe`, :mod:`.inject`), also in observe
  mode, where the running release's own methods run; engine notices are taken out of the cache-info stream in
  every mode (handed to the policy, or logged and ignored in observe mode).
"""

from __future__ import annotations

import functools
import logging
import sys
import threading
import time

from fastdeploy_pd_fix import config
from fastdeploy_pd_fix.adapters.messager_log import BatchJournal
from fastdeploy_pd_fix.adapters.messager_step import consume_signals_forever, make_step, strip_notices
from fastdeploy_pd_fix.plugin import LOG_PREFIX
from fastdeploy_pd_fix.plugin.messager.inject import apply_injections
from fastdeploy_pd_fix.plugin.messager.observe import QueueObserver, Watchdog
from fastdeploy_pd_fix.policy.kv_signal import KV_SIGNAL_LENGTH
from fastdeploy_pd_fix.policy.release import RELEASE_MODES
from fastdeploy_pd_fix.target import USED_ATTRIBUTES

#: The per-instance attribute holding the messager's :class:`MessagerRuntime` (None: stood aside).
RUNTIME_ATTRIBUTE = "_fd_pd_fix_runtime"

fallback_logger = logging.getLogger("fastdeploy_pd_fix")
activation_lock = threading.Lock()


def messager_logger(messager) -> logging.Logger:
    """The cache messager's own logger (``cache_messager_rank{R}.log``) when its module has one."""
    module_logger = getattr(sys.modules.get(type(messager).__module__), "logger", None)
    return module_logger if hasattr(module_logger, "warning") else fallback_logger


class MessagerRuntime:
    """One messager's patch state: its step (None in observe mode), queue observer, watchdog and op call."""

    def __init__(self, messager, mode: str, op_slot, op_arguments: tuple, logger):
        self.messager = messager
        self.mode = mode
        self.op = op_slot[0]()
        self.op_arguments = op_arguments
        self.logger = logger
        self.rank = getattr(messager, "rank", None)
        before_layer0 = apply_injections(messager, mode, self.rank, logger, op_slot, op_arguments)
        deadline, deadline_warning = config.watchdog_setting()
        if deadline_warning:  # once per messager: the watchdog is built here only
            logger.warning(f"{LOG_PREFIX}{deadline_warning}")
        self.step = None
        if mode in RELEASE_MODES:
            after_release = self.note_release if deadline else None
            self.step = make_step(
                messager, mode, logger, LOG_PREFIX, before_layer0=before_layer0, after_release=after_release
            )
        journal = BatchJournal(logger.info, LOG_PREFIX) if self.step is None else self.step.journal
        self.observer = QueueObserver(
            messager.cache_prefilled_engine_ids_queue, journal, journal_puts=self.step is None
        )
        self.watchdog = Watchdog(deadline, self.observer, self.describe_state, logger.error) if deadline else None
        if self.step is not None:
            # Activation runs before the original registration loop stores anything (see make_add_cache_task_thread):
            # idx_cache_task_dict becomes the step's BoundTaskDict, and the queue's get, already wrapped by the
            # observer, is wrapped once more to tell the step which batch the send thread holds (release rule 7).
            self.step.attach()
        else:
            # Observe mode: the running release's own loop must never see an engine notice either.
            strip_notices(messager, self.ignore_notice, logger, LOG_PREFIX)
        if self.watchdog:
            self.watchdog.start()

    def ignore_notice(self, notice) -> None:
        self.logger.warning(
            f"{LOG_PREFIX}engine notice ignored in {self.mode} mode (notices are for ordered mode): "
            f"{notice.describe()}"
        )

    def note_release(self, released) -> None:
        """After every release step: tell the watchdog whether the oldest signal moved and whether one waits at the
        head of the log. Only ordered release keeps one: upstream's pending buffer holds signals that block nothing
        (an orphan's, after a hand-over without notices, for ever)."""
        policy = self.step.policy
        waiting = policy.mode == config.ORDERED and policy.has_waiting()
        self.watchdog.note_release_step(bool(released.batches or released.drops), waiting)

    def describe_state(self) -> str:
        policy = self.step.policy if self.step else None
        waiting = policy.waiting_signals() if policy else "n/a (observe mode)"
        registrations = policy.open_registrations() if policy else "n/a (observe mode)"
        notices = {None: "not known yet (no cache-info batch read)", True: "on", False: "OFF"}[
            self.step.engine_notices if self.step else None
        ]
        handed_over = f" (releasing by {policy.mode}'s rule)" if policy and policy.mode != self.mode else ""
        return (
            f"mode={self.mode}{handed_over} rank={self.rank} engine notices: {notices}\n"
            f"waiting layer-0 signals: {waiting}\n"
            f"open registrations per slot: {registrations}\n"
            f"idx_cache_task_dict slots: {sorted(self.messager.idx_cache_task_dict)}"
        )

    def consume_signals(self, original) -> None:
        """The replacement ``consume_signals``: the running release's op call, each buffer handed to the step.

        When its set-up fails (paddle import, ``set_device``, the buffer), the running release's own ``original``
        runs instead, after one error line: a dead ``consume_signals`` thread is the very hang the plugin prevents.
        """
        try:
            import paddle

            paddle.device.set_device("cpu")
            buffer = paddle.full([KV_SIGNAL_LENGTH], -1, dtype="int32")
        except Exception as error:
            self.logger.error(
                f"{LOG_PREFIX}patched consume_signals could not start ({error!r}): the release's own consume_signals "
                "runs instead, its batches are not ordered (this rank may deadlock as without the plugin)"
            )
            self.step.not_a_sender()  # the release's own loop reads idx_cache_task_dict as it is
            return original(self.messager)

        def read_signal():
            self.op(buffer, *self.op_arguments)
            return buffer.numpy()

        # time.sleep looked up now rather than bound at import, so that the injection tests can record the pauses.
        consume_signals_forever(self.step, read_signal, sleep=time.sleep)


def activate(messager, state):
    """Create the messager's :class:`MessagerRuntime` once, or return None to stand aside for this instance.

    ``state`` is the class's :class:`fastdeploy_pd_fix.plugin.patching.PatchState` (its ``context`` the class's
    :class:`~fastdeploy_pd_fix.analysis.TargetAnalysis`), handed over by the patch."""
    with activation_lock:
        if RUNTIME_ATTRIBUTE in vars(messager):
            return getattr(messager, RUNTIME_ATTRIBUTE)
        logger = messager_logger(messager)
        runtime = None
        try:
            missing = [name for name in USED_ATTRIBUTES if not hasattr(messager, name)]
            if missing:
                raise AttributeError(f"missing attributes {', '.join(missing)}")
            if type(messager.idx_cache_task_dict) is not dict:
                raise TypeError(f"idx_cache_task_dict is a {type(messager.idx_cache_task_dict).__name__}")
            op_arguments = tuple(argument.evaluate(messager) for argument in state.context.op_arguments)
            op_slot = state.context.kv_signal_op(state.originals["consume_signals"])
            runtime = MessagerRuntime(messager, state.mode, op_slot, op_arguments, logger)
            # The decision line again, now into the messager's own log (the first one went to its stderr).
            # rank and nranks let `diagnose` group the ranks of one DP group (rank_id = rank + dp * nranks).
            logger.info(
                f"{state.record.describe()}; active on rank_id={getattr(messager, 'rank_id', '?')} "
                f"rank={getattr(messager, 'rank', '?')} nranks={getattr(messager, 'nranks', '?')}"
            )
        except Exception as error:
            logger.warning(f"{LOG_PREFIX}stood aside for this messager, original methods run: {error!r}")
        setattr(messager, RUNTIME_ATTRIBUTE, runtime)
        return runtime


def make_consume_signals(original, state):
    @functools.wraps(original)
    def consume_signals(self):
        runtime = activate(self, state)
        if runtime is None or runtime.step is None:
            return original(self)  # stood aside, or observe mode: the running release's own loop runs
        return runtime.consume_signals(original)

    consume_signals.__fd_pd_fix__ = True
    return consume_signals


def make_add_cache_task_thread(original, state):
    @functools.wraps(original)
    def _add_cache_task_thread(self):
        activate(self, state)  # attaches the step before the original loop stores anything
        return original(self)

    _add_cache_task_thread.__fd_pd_fix__ = True
    return _add_cache_task_thread
