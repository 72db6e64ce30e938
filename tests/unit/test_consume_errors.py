"""The consume loop over weeks: a persistent error backs off to one attempt a second and logs a bounded number of
lines; a patched ``consume_signals`` that cannot start runs the release's own instead of dying.

The loop's pauses are recorded by an injected ``sleep``: nothing sleeps, and the time a run of errors takes is the sum
of the pauses it asked for.
"""

import logging
import re
import sys
import threading

import numpy as np
import paddle  # imported in the main thread first, as the cache messager does
import pytest
from support.messager import StepMessager

from fastdeploy_pd_fix.adapters.messager_log import ERROR_BACKOFF_MAX_S, ERROR_BACKOFF_S, ERROR_SUMMARY_EVERY
from fastdeploy_pd_fix.adapters.messager_step import NO_SIGNAL_BACKOFF_S, consume_signals_forever, make_step
from fastdeploy_pd_fix.plugin import LOG_PREFIX
from fastdeploy_pd_fix.plugin.messager.patch import patch_class, unpatch_class
from fastdeploy_pd_fix.policy.kv_signal import KV_SIGNAL_LENGTH

logger = logging.getLogger("test_consume_errors.messager")  # the plugin logs into the target module's `logger`
NO_SIGNAL = np.full(KV_SIGNAL_LENGTH, -1, dtype=np.int32)
#: The pauses while an error repeats: doubling from ERROR_BACKOFF_S until ERROR_BACKOFF_MAX_S.
GROWING = [ERROR_BACKOFF_S * 2**doublings for doublings in range(7)]


class StopLoop(BaseException):
    """Ends the otherwise endless loop when its script is over (BaseException: the loop survives Exception)."""


def run_loop(events, caplog):
    """The consume loop over ``events`` (an exception is raised by the read, a buffer returned) until they are over:
    the pauses it asked for and its records about errors."""
    script = iter(events)
    pauses = []

    def read_signal():
        event = next(script, StopLoop)
        if event is StopLoop or isinstance(event, Exception):
            raise event
        return event

    step = make_step(StepMessager(), "ordered", logger, LOG_PREFIX)
    with caplog.at_level(logging.INFO, logger=logger.name), pytest.raises(StopLoop):
        consume_signals_forever(step, read_signal, sleep=pauses.append)
    return pauses, [record for record in caplog.records if "error in consume_signals" in record.getMessage()]


def repeat_counts(records):
    return [int(re.search(r" again, (\d+) in a row", record.getMessage())[1]) for record in records]


def test_a_persistent_error_backs_off_to_one_attempt_a_second_and_its_log_stays_bounded(caplog):
    pauses, records = run_loop([OSError("op failed")] * 1000, caplog)

    assert GROWING[-1] < ERROR_BACKOFF_MAX_S <= 2 * GROWING[-1] and ERROR_BACKOFF_MAX_S >= 1
    assert pauses == GROWING + [ERROR_BACKOFF_MAX_S] * 993
    first, repeats = records[0], records[1:]
    assert first.getMessage() == f"{LOG_PREFIX}error in consume_signals; continuing, next attempt in 0.01s"
    assert first.exc_info[1].args == ("op failed",)  # the traceback, once
    assert all(record.exc_info is None and record.getMessage().endswith(": OSError: op failed") for record in repeats)
    # One line per repeat while the pause grows, then one every ERROR_SUMMARY_EVERY repeats (about one a minute).
    assert repeat_counts(repeats) == list(range(2, 9)) + list(range(60, 1001, ERROR_SUMMARY_EVERY))
    assert f"(next attempt in 1s; from now on one line every {ERROR_SUMMARY_EVERY} repeats)" in repeats[6].getMessage()
    assert len(records) <= 8 + sum(pauses) / 60 + 1  # was 1000 tracebacks, one per 10 ms


def test_a_success_resets_the_pause_and_another_error_gets_its_own_traceback(caplog):
    events = [ValueError("a")] * 3 + [NO_SIGNAL, ValueError("a"), KeyError("b"), KeyError("b")]
    pauses, records = run_loop(events, caplog)

    assert pauses == GROWING[:3] + [NO_SIGNAL_BACKOFF_S] + GROWING[:3]  # a different error is no success
    assert [record.exc_info is not None for record in records] == [True, False, False, True, True, False]
    assert repeat_counts(records[1:3] + records[5:]) == [2, 3, 2]
    assert records[5].getMessage().endswith(": KeyError: 'b'")
    assert not any("ended after" in record.getMessage() for record in records)  # every error had its own line


@pytest.mark.parametrize("end", [NO_SIGNAL, KeyError("b")], ids=["success", "another error"])
def test_the_end_of_a_summarised_run_counts_its_errors(caplog, end):
    pauses, records = run_loop([ValueError("a")] * 70 + [end], caplog)
    ended = [record.getMessage() for record in records if "ended after" in record.getMessage()]
    assert ended == [f"{LOG_PREFIX}error in consume_signals: ValueError: a ended after 70 in a row"]


# ---- the patched consume_signals falls back to the release's own when it cannot start ----

OP_CALLS = []  # the type of the buffer the op was called with: the release's None, the patched loop's Tensor


def get_output_kv_signal(buffer, *args):
    OP_CALLS.append(type(buffer).__name__)
    raise StopLoop


class Messager(StepMessager):
    """CacheMessagerV1's attributes and the shape of its consume loop (protocol.md)."""

    rank_id = 0
    registrations = ()

    def consume_signals(self):  # the release's own loop, reduced to its op call
        buffer = None
        get_output_kv_signal(buffer, self.rank_id, 0)

    def _add_cache_task_thread(self):  # the release's registration loop, reduced to its store
        for task in self.registrations:
            self.idx_cache_task_dict[task["current_id"]] = task


def fail(*args, **kwargs):
    raise RuntimeError("no cpu place")


@pytest.fixture
def patched(monkeypatch):
    monkeypatch.delenv("FD_PD_FIX_WATCHDOG_S", raising=False)
    monkeypatch.delenv("FD_PD_FIX_INJECT", raising=False)
    OP_CALLS.clear()
    assert patch_class(Messager, "ordered").decision == "patched"
    yield Messager
    unpatch_class(Messager)


@pytest.mark.parametrize(
    "failure, error",
    [
        (lambda monkeypatch: monkeypatch.setitem(sys.modules, "paddle", None), "ModuleNotFoundError"),
        (lambda monkeypatch: monkeypatch.setattr(paddle.device, "set_device", fail), "RuntimeError('no cpu place')"),
        (lambda monkeypatch: monkeypatch.setattr(paddle, "full", fail), "RuntimeError('no cpu place')"),
        (lambda monkeypatch: None, None),
    ],
    ids=["paddle import", "set_device", "buffer", "no failure"],
)
def test_a_patched_consume_signals_that_cannot_start_runs_the_releases_own(
    patched, monkeypatch, caplog, failure, error
):
    failure(monkeypatch)
    messager = patched()
    endings = []

    def consume_signals():
        try:
            messager.consume_signals()
        except BaseException as ending:  # StopLoop from the op: the thread's only expected ending
            endings.append(ending)

    with caplog.at_level(logging.INFO, logger=logger.name):
        thread = threading.Thread(target=consume_signals)
        thread.start()
        thread.join(30)
    assert not thread.is_alive() and [type(ending) for ending in endings] == [StopLoop]
    fallbacks = [record for record in caplog.records if "could not start" in record.getMessage()]
    if error is None:
        assert OP_CALLS == ["Tensor"] and not fallbacks  # the patched loop ran
        return
    assert OP_CALLS == ["NoneType"]  # the release's own loop ran, not the dead thread of before
    assert len(fallbacks) == 1 and fallbacks[0].levelno == logging.ERROR
    assert fallbacks[0].getMessage().startswith(f"{LOG_PREFIX}patched consume_signals could not start ({error}")
    assert "the release's own consume_signals runs instead" in fallbacks[0].getMessage()
