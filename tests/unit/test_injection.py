"""Fault injection (``FD_PD_FIX_INJECT``): what is delayed, where, and that bad items change nothing.

In process, ``time.sleep`` is replaced by a recorder, so the tests see each delay at its place in a trace of what
the loops did (reads, stores, op calls, queued batches) and never sleep. One stand-in run shows the wiring in real
rank processes.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

import numpy as np
import paddle  # noqa: F401  imported in the main thread first, as the cache messager does
import pytest

from fastdeploy_pd_fix.config import Injection, parse_injection
from fastdeploy_pd_fix.core import messager_step
from fastdeploy_pd_fix.core.kv_signal import KV_SIGNAL_LENGTH
from fastdeploy_pd_fix.plugin.patching import patch_class, unpatch_class
from fastdeploy_pd_fix.standin.harness import run_scenario
from fastdeploy_pd_fix.standin.scenarios import SCENARIOS

logger = logging.getLogger("test_injection.messager")  # the plugin logs into the target module's `logger`

NUM_SLOTS = 4
TRACE = []  # what happened, in order: ("read", n), ("store", slot), ("op", label), ("put", batch), ("sleep", s)
SIGNALS = []  # (label, buffer or exception) the fake op hands out, in order


class StopLoop(BaseException):
    """Ends an otherwise endless loop when its script is over (BaseException: the loops survive Exception)."""


def kv_buffer(count, layer, triples=()):
    values = np.full(KV_SIGNAL_LENGTH, -1, dtype=np.int32)
    values[0], values[1] = count, layer
    for index, triple in enumerate(triples):
        values[2 + 3 * index : 5 + 3 * index] = triple
    return values


def get_output_kv_signal(buffer, *args):
    if not SIGNALS:
        TRACE.append(("op", "end"))
        raise StopLoop
    label, event = SIGNALS.pop(0)
    TRACE.append(("op", label))
    if isinstance(event, Exception):
        raise event
    buffer.set_value(event)


class ScriptedEngineWorkerQueue:
    def __init__(self, reads):
        self.reads = list(reads)

    def get_cache_info(self):
        if not self.reads:
            raise StopLoop
        read = self.reads.pop(0)
        TRACE.append(("read", len(read)))
        return read


class TracingQueue(queue.Queue):
    def put(self, item, *args, **kwargs):
        TRACE.append(("put", list(item)))
        super().put(item, *args, **kwargs)


class InjectedMessager:
    """CacheMessagerV1's attributes and loop shapes (protocol.md); each read holds complete tasks."""

    def __init__(self, rank, reads=()):
        self.engine_cache_task_thread_lock = threading.Lock()
        self.engine_cache_tasks = [dict() for _ in range(NUM_SLOTS)]
        self.idx_cache_task_dict = {}
        self.cache_prefilled_engine_ids_queue = TracingQueue()
        self.engine_worker_queue = ScriptedEngineWorkerQueue(reads)
        self.rank, self.rank_id = rank, rank

    def consume_signals(self):
        get_output_kv_signal(None, self.rank_id, 0)

    def _add_cache_task_thread(self):
        while True:
            cache_info = self.engine_worker_queue.get_cache_info()
            if not cache_info:
                continue
            for task in cache_info:
                self.idx_cache_task_dict[task["current_id"]] = task
                TRACE.append(("store", task["current_id"]))


def task(slot, request_id, need=4):
    return {"current_id": slot, "request_id": request_id, "need_prefill_tokens": need}


@pytest.fixture(autouse=True)
def recorded(monkeypatch):
    """A patched fixture class, an empty trace, and ``time.sleep`` recorded instead of slept."""

    def sleep(seconds):
        if not seconds >= 0:  # as time.sleep: negative and nan are errors
            raise ValueError("sleep length must be non-negative")
        TRACE.append(("sleep", seconds))

    monkeypatch.setattr(time, "sleep", sleep)
    monkeypatch.delenv("FD_PD_FIX_WATCHDOG_S", raising=False)
    TRACE.clear()
    SIGNALS.clear()
    yield
    unpatch_class(InjectedMessager)


def run_registration_loop(messager):
    with pytest.raises(StopLoop):
        messager._add_cache_task_thread()


def run_consume_loop(messager):
    with pytest.raises(StopLoop):
        messager.consume_signals()


@pytest.mark.parametrize("mode", ["ordered", "observe"])
@pytest.mark.parametrize("rank", [0, 1])
def test_registration_reads_are_delayed_only_on_the_configured_rank_and_only_when_non_empty(
    rank, mode, monkeypatch, caplog
):
    monkeypatch.setenv("FD_PD_FIX_INJECT", "registration:rank=1:delay_ms=50")
    patch_class(InjectedMessager, mode)
    messager = InjectedMessager(rank, reads=[[], [task(0, "A")], [], [], [task(1, "B"), task(2, "C")], []])
    with caplog.at_level(logging.INFO, logger=logger.name):
        run_registration_loop(messager)

    delay = [("sleep", 0.05)] if rank == 1 else []
    assert TRACE == [
        ("read", 0),
        ("read", 1),
        *delay,  # after the read returned, before the original loop processed it
        ("store", 0),
        ("read", 0),
        ("read", 0),
        ("read", 2),
        *delay,
        ("store", 1),
        ("store", 2),
        ("read", 0),
    ]
    assert ("registration delayed by 0.05s on rank 1" in caplog.text) == (rank == 1)


@pytest.mark.parametrize("rank", [0, 1])
def test_layer0_signal_handling_is_delayed_only_on_the_configured_rank(rank, monkeypatch, caplog):
    monkeypatch.setenv("FD_PD_FIX_INJECT", "signal:rank=1:delay_ms=20")
    patch_class(InjectedMessager, "ordered")
    messager = InjectedMessager(rank, reads=[[task(0, "A"), task(1, "B")]])
    with caplog.at_level(logging.INFO, logger=logger.name):
        run_registration_loop(messager)
        TRACE.clear()
        SIGNALS.extend(
            [
                ("none", kv_buffer(-1, -1)),
                ("A layer 0", kv_buffer(1, 0, [(0, 0, 4)])),
                ("A layer 1", kv_buffer(1, 1, [(0, 0, 4)])),
                ("empty layer 0", kv_buffer(0, 0)),
                ("invalid layer 0", kv_buffer(1, 0, [(NUM_SLOTS, 0, 4)])),  # slot out of range: no task left
                ("error", ValueError("op failed")),
                ("B layer 0", kv_buffer(1, 0, [(1, 0, 4)])),
            ]
        )
        run_consume_loop(messager)

    delay = [("sleep", 0.02)] if rank == 1 else []
    assert TRACE == [
        ("op", "none"),
        ("sleep", messager_step.NO_SIGNAL_BACKOFF_S),
        ("op", "A layer 0"),
        *delay,  # after progress was recorded, before the release sees the signal
        ("put", [(0, 4)]),
        ("op", "A layer 1"),
        ("op", "empty layer 0"),
        ("op", "invalid layer 0"),
        ("op", "error"),
        ("sleep", messager_step.ERROR_BACKOFF_S),
        ("op", "B layer 0"),
        *delay,
        ("put", [(1, 4)]),
        ("op", "end"),
    ]
    assert ("layer-0 signal handling delayed by 0.02s on rank 1" in caplog.text) == (rank == 1)


def test_signal_injection_says_it_is_not_applied_in_observe_mode(monkeypatch, caplog):
    monkeypatch.setenv("FD_PD_FIX_INJECT", "signal:rank=1:delay_ms=20")
    patch_class(InjectedMessager, "observe")
    with caplog.at_level(logging.INFO, logger=logger.name):
        run_registration_loop(InjectedMessager(1))
    assert "signal delay not applied on rank 1 in observe mode" in caplog.text


BAD_ITEMS = [
    "registration:rank=1:delay_ms=oops",
    "bogus:rank=1:delay_ms=5",
    "signal:delay_ms=5",  # no rank
    "registration:rank=one:delay_ms=5",
    "signal:rank=1:delay_ms=-5",  # time.sleep(-0.005) raised in the consume loop: every layer-0 signal was lost
    "registration:rank=1:delay_ms=nan",  # time.sleep(nan) raised after the read: the registration was lost
    "signal:rank=1:delay_ms=inf",
]


def test_bad_items_are_reported_and_ignored():
    injections, problems = parse_injection(",".join(BAD_ITEMS + ["registration:rank=1:delay_ms=30"]))
    assert injections == [Injection("registration", 1, 0.03)]
    assert len(problems) == len(BAD_ITEMS)
    for problem, item in zip(problems, BAD_ITEMS):
        assert f"FD_PD_FIX_INJECT item {item!r} ignored" in problem


def test_bad_items_are_logged_and_change_nothing(monkeypatch, caplog):
    monkeypatch.setenv("FD_PD_FIX_INJECT", ", ".join(BAD_ITEMS))
    patch_class(InjectedMessager, "ordered")
    messager = InjectedMessager(1, reads=[[task(0, "A")]])
    with caplog.at_level(logging.INFO, logger=logger.name):
        run_registration_loop(messager)
        SIGNALS.append(("A layer 0", kv_buffer(1, 0, [(0, 0, 4)])))
        run_consume_loop(messager)
    assert TRACE == [("read", 1), ("store", 0), ("op", "A layer 0"), ("put", [(0, 4)]), ("op", "end")]
    for item in BAD_ITEMS:
        assert f"FD_PD_FIX_INJECT item {item!r} ignored" in caplog.text
    assert "delayed by" not in caplog.text and "error in consume_signals" not in caplog.text


def test_standin_run_with_rank1_registration_delay_finishes_with_identical_sequences():
    env = {"FD_PD_FIX_MODE": "ordered", "FD_PD_FIX_INJECT": "registration:rank=1:delay_ms=50"}
    result = run_scenario("s3", env=env, deadline_s=10.0)
    assert result.outcome == "finished", result.summary()
    assert result.same_batches_on_all_ranks()
    one_batch_per_signal = [
        [[slot, offset + length] for slot, offset, length in signal] for signal in SCENARIOS["s3"]["signals"]
    ]
    assert result.batches[0] == one_batch_per_signal
    assert result.finished == {0: ["B", "A"], 1: ["B", "A"]}
    assert "FD_PD_FIX_INJECT: registration delayed by 0.05s on rank 1" in result.logs[1]
    assert "FD_PD_FIX_INJECT" not in result.logs[0]
