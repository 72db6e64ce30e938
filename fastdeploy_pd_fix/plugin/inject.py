"""Fault injection (``FD_PD_FIX_INJECT``, parsed by :func:`fastdeploy_pd_fix.config.injections`): tests and the
GPU e2e run force either side of the race by delaying one rank's registration reads or layer-0 signal handling.

Inert unless configured; a bad item is logged and changes nothing.
"""

from __future__ import annotations

import time
from typing import Callable, Optional

from fastdeploy_pd_fix import config
from fastdeploy_pd_fix.plugin import LOG_PREFIX


def injected_delay(injections, stage: str, rank) -> float:
    """Seconds ``stage`` is delayed per event on ``rank`` (the sum of the matching items)."""
    return sum(injection.delay_s for injection in injections if injection.stage == stage and injection.rank == rank)


def delay_registration_reads(messager, delay_s: float) -> None:
    """Hold every non-empty registration read back before the original registration loop processes it."""
    queue_client = messager.engine_worker_queue
    get_cache_info = queue_client.get_cache_info

    def delayed_get_cache_info(*args, **kwargs):
        infos = get_cache_info(*args, **kwargs)
        if infos:
            time.sleep(delay_s)
        return infos

    queue_client.get_cache_info = delayed_get_cache_info


def apply_injections(messager, mode: str, rank, logger) -> Optional[Callable[[], None]]:
    """Apply the configured injections to ``messager``; returns the layer-0 signal delay hook, if any.

    The registration delay wraps the instance's ``engine_worker_queue.get_cache_info`` in every mode. The signal
    delay runs before a layer-0 signal reaches the release policy, so it does not apply in observe mode, where the
    running release's own ``consume_signals`` reads the signals."""
    injections, problems = config.injections()
    for problem in problems:
        logger.warning(f"{LOG_PREFIX}{problem}")
    registration_delay_s = injected_delay(injections, "registration", rank)
    if registration_delay_s > 0:
        delay_registration_reads(messager, registration_delay_s)
        logger.warning(
            f"{LOG_PREFIX}{config.ENV_INJECT}: registration delayed by {registration_delay_s}s on rank {rank}"
        )
    signal_delay_s = injected_delay(injections, "signal", rank)
    if not signal_delay_s:
        return None
    if mode == config.OBSERVE:
        logger.warning(
            f"{LOG_PREFIX}{config.ENV_INJECT}: signal delay not applied on rank {rank} in observe mode "
            "(the running release's own consume_signals reads the signals)"
        )
        return None
    logger.warning(
        f"{LOG_PREFIX}{config.ENV_INJECT}: layer-0 signal handling delayed by {signal_delay_s}s on rank {rank}"
    )

    def delay_signal() -> None:
        time.sleep(signal_delay_s)

    return delay_signal
