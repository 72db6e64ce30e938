"""Fault injection (``FD_PD_FIX_INJECT``, parsed by :func:`fastdeploy_pd_fix.config.injections`): tests and the
GPU e2e run force either side of the race on one tensor-parallel rank. Test-only: inert unless configured; a bad
item is logged and changes nothing.

The stages (``<stage>:rank=R:delay_ms=D``), each a sleep of ``D`` ms per event on rank ``R`` only:

``registration``
    after a non-empty ``get_cache_info`` read, before ``cache_info_barrier.wait()``. The other ranks wait at that
    barrier for as long, so every rank registers late by the same time: symmetric, the race stays the engine's.
``registration_after_barrier``
    after ``cache_info_barrier.wait()`` returned, before the read's tasks are stored. The other ranks are past the
    barrier and store at once: only rank ``R`` registers late, so its layer-0 signals can beat their registration
    while the other ranks' do not (they wait for ``R`` at the *next* read's barrier, never at this one).
``signal``
    before a layer-0 signal with tasks is handled, after it was read: rank ``R`` sees registrations first that the
    other ranks see after the signal. In the release modes the step runs the delay once progress is recorded,
    before the release policy sees the signal; in observe mode, where the running release's own
    ``consume_signals`` runs, the kv-signal op it reaches is wrapped and sleeps after returning such a signal (to
    rank ``R``'s messager only: the calls with its op arguments).
"""

from __future__ import annotations

import time
from typing import Callable, Optional

from fastdeploy_pd_fix import config
from fastdeploy_pd_fix.plugin import LOG_PREFIX
from fastdeploy_pd_fix.policy.kv_signal import parse_kv_signal

#: The injected op wrapper's table: the op arguments of each delayed messager (its rank id ...) -> its delay.
INJECTED_DELAYS_ATTRIBUTE = "__fd_pd_fix_injected_delays__"


def injected_delay(injections, stage: str, rank) -> float:
    """Seconds ``stage`` is delayed per event on ``rank`` (the sum of the matching items)."""
    return sum(injection.delay_s for injection in injections if injection.stage == stage and injection.rank == rank)


def delay_registration_reads(messager, delay_s: float) -> None:
    """Hold every non-empty registration read back before the original registration loop processes it (before
    its ``cache_info_barrier``: symmetric)."""
    queue_client = messager.engine_worker_queue
    get_cache_info = queue_client.get_cache_info

    def delayed_get_cache_info(*args, **kwargs):
        infos = get_cache_info(*args, **kwargs)
        if infos:
            time.sleep(delay_s)
        return infos

    queue_client.get_cache_info = delayed_get_cache_info


class BarrierDelayedAfterWait:
    """A barrier (a ``threading.Barrier`` or a manager's proxy of one) whose ``wait`` sleeps once it returned."""

    def __init__(self, barrier, delay_s: float):
        self._barrier = barrier
        self._delay_s = delay_s

    def wait(self, *args, **kwargs):
        arrival = self._barrier.wait(*args, **kwargs)
        time.sleep(self._delay_s)
        return arrival

    def __getattr__(self, name):  # parties, abort, reset, ...: the barrier's own
        return getattr(self._barrier, name)


def delay_registrations_after_barrier(messager, delay_s: float) -> None:
    """Sleep on this rank only after ``cache_info_barrier.wait()`` returns, before the original loop stores the
    read's tasks (the messager's own queue client; the other ranks' clients are untouched)."""
    queue_client = messager.engine_worker_queue
    queue_client.cache_info_barrier = BarrierDelayedAfterWait(queue_client.cache_info_barrier, delay_s)


def delay_layer0_signals_in_op(op_slot, own_arguments: tuple, delay_s: float) -> None:
    """Observe mode: wrap the kv-signal op the original ``consume_signals`` calls so that it sleeps after reading a
    layer-0 signal with tasks, for this messager's calls only (those with its op arguments: its rank id, ...; the
    op is one per process, FastDeploy runs one messager per rank process, tests may run several)."""
    get_op, set_op = op_slot
    op = get_op()
    delays = getattr(op, INJECTED_DELAYS_ATTRIBUTE, None)
    if delays is not None:  # already wrapped for another messager of this process
        delays[own_arguments] = delay_s
        return
    delays = {own_arguments: delay_s}

    def delayed_op(buffer, *args, **kwargs):
        result = op(buffer, *args, **kwargs)
        delay = delays.get(args)
        if delay:
            signal = parse_kv_signal(buffer.numpy() if hasattr(buffer, "numpy") else buffer).signal
            if signal is not None and signal.layer == 0 and signal.tasks:
                time.sleep(delay)
        return result

    setattr(delayed_op, INJECTED_DELAYS_ATTRIBUTE, delays)
    set_op(delayed_op)


def apply_injections(messager, mode: str, rank, logger, op_slot, op_arguments: tuple) -> Optional[Callable[[], None]]:
    """Apply the configured injections to ``messager`` (rank ``rank``); returns the layer-0 signal delay hook for
    the step of the release modes, if any (in observe mode the op, reached by ``op_slot``, the ``(get, set)`` of
    :meth:`fastdeploy_pd_fix.analysis.TargetAnalysis.kv_signal_op`, is wrapped for the calls with this messager's
    ``op_arguments`` instead, and None returned).

    The registration delays wrap the instance's queue client (``get_cache_info``, ``cache_info_barrier``) in every
    mode."""
    injections, problems = config.injections()
    for problem in problems:
        logger.warning(f"{LOG_PREFIX}{problem}")
    registration_delay_s = injected_delay(injections, "registration", rank)
    if registration_delay_s > 0:
        delay_registration_reads(messager, registration_delay_s)
        logger.warning(
            f"{LOG_PREFIX}{config.ENV_INJECT}: registration delayed by {registration_delay_s}s on rank {rank}"
        )
    after_barrier_delay_s = injected_delay(injections, "registration_after_barrier", rank)
    if after_barrier_delay_s > 0:
        delay_registrations_after_barrier(messager, after_barrier_delay_s)
        logger.warning(
            f"{LOG_PREFIX}{config.ENV_INJECT}: registration delayed by {after_barrier_delay_s}s after "
            f"cache_info_barrier on rank {rank} only"
        )
    signal_delay_s = injected_delay(injections, "signal", rank)
    if not signal_delay_s:
        return None
    if mode == config.OBSERVE:
        try:
            delay_layer0_signals_in_op(op_slot, op_arguments, signal_delay_s)
        except Exception as error:  # a test-only delay never costs the messager its plugin
            logger.warning(f"{LOG_PREFIX}{config.ENV_INJECT}: signal delay not applied on rank {rank}: {error!r}")
            return None
        logger.warning(
            f"{LOG_PREFIX}{config.ENV_INJECT}: layer-0 signal handling delayed by {signal_delay_s}s on rank {rank} "
            "(observe mode: in the kv-signal op the release's consume_signals calls)"
        )
        return None
    logger.warning(
        f"{LOG_PREFIX}{config.ENV_INJECT}: layer-0 signal handling delayed by {signal_delay_s}s on rank {rank}"
    )

    def delay_signal() -> None:
        time.sleep(signal_delay_s)

    return delay_signal
