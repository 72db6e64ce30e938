"""Fault injection (``FD_PD_FIX_INJECT``): what is delayed, where, and that bad items change nothing.

In process, ``time.sleep`` is replaced by a recorder, so the tests see each delay at its place in a trace of what
the loops did (reads, stores, op calls, queued batches) and never sleep. One stand-in run shows the wiring in real
rank processes.
"""

from __future__ import annotations

import logging
import queue
import sys
import threading
import time
import types

import numpy as np
import paddle  # imported in the main thread first, as the cache messager does
import pytest

from fastdeploy_pd_fix.adapters import messager_log, messager_step
from fastdeploy_pd_fix.config import Injection, parse_injection
from fastdeploy_pd_fix.plugin.messager.patch import patch_class, unpatch_class
from fastdeploy_pd_fix.policy.kv_signal import KV_SIGNAL_LENGTH
from fastdeploy_pd_fix.standin.harness import run_many
from fastdeploy_pd_fix.standin.scenarios import SCENARIOS

logger = logging.getLogger("test_injection.messager")
REAL_SLEEP = time.sleep  # the plugin logs into the target module's `logger`

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


class TracingBarrier:
    def wait(self):
        TRACE.append(("barrier",))
        return 0


class ScriptedEngineWorkerQueue:
    def __init__(self, reads):
        self.reads = list(reads)
        self.cache_info_barrier = TracingBarrier()

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

    def consume_signals(self):  # the release's own loop: runs in observe mode
        buffer = paddle.full([KV_SIGNAL_LENGTH], -1, dtype="int32")
        while True:
            get_output_kv_signal(buffer, self.rank_id, 0)
            TRACE.append(("handled", int(buffer.numpy()[0])))

    def _add_cache_task_thread(self):
        while True:
            cache_info = self.engine_worker_queue.get_cache_info()
            if not cache_info:
                continue
            self.engine_worker_queue.cache_info_barrier.wait()
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
@pytest.mark.parametrize(
    "stage, logged",
    [
        ("registration", "registration delayed by 0.05s on rank 1"),
        ("registration_after_barrier", "registration delayed by 0.05s after cache_info_barrier on rank 1 only"),
    ],
)
def test_registrations_are_delayed_only_on_the_configured_rank_and_only_when_non_empty(
    stage, logged, rank, mode, monkeypatch, caplog
):
    monkeypatch.setenv("FD_PD_FIX_INJECT", f"{stage}:rank=1:delay_ms=50")
    patch_class(InjectedMessager, mode)
    messager = InjectedMessager(rank, reads=[[], [task(0, "A")], [], [], [task(1, "B"), task(2, "C")], []])
    with caplog.at_level(logging.INFO, logger=logger.name):
        run_registration_loop(messager)

    delay = [("sleep", 0.05)] if rank == 1 else []
    # registration: after the read returned, before its barrier (the other ranks wait there as long);
    # registration_after_barrier: once the barrier let every rank through, before this rank stores.
    before, after = (delay, []) if stage == "registration" else ([], delay)
    assert TRACE == [
        ("read", 0),
        ("read", 1),
        *before,
        ("barrier",),
        *after,
        ("store", 0),
        ("read", 0),
        ("read", 0),
        ("read", 2),
        *before,
        ("barrier",),
        *after,
        ("store", 1),
        ("store", 2),
        ("read", 0),
    ]
    assert (logged in caplog.text) == (rank == 1)
    assert caplog.text.count("delayed by") == (rank == 1)


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
        ("sleep", messager_log.ERROR_BACKOFF_S),
        ("op", "B layer 0"),
        *delay,
        ("put", [(1, 4)]),
        ("op", "end"),
    ]
    assert ("layer-0 signal handling delayed by 0.02s on rank 1" in caplog.text) == (rank == 1)


@pytest.mark.parametrize("rank", [0, 1])
def test_observe_mode_delays_layer0_signals_in_the_op_the_release_calls(rank, monkeypatch, caplog):
    """Observe mode runs the release's own consume_signals: the op it calls (here this module's global) is wrapped,
    and sleeps after returning a layer-0 signal with tasks, before the release handles it."""
    monkeypatch.setattr(sys.modules[__name__], "get_output_kv_signal", get_output_kv_signal)  # restored after
    monkeypatch.setenv("FD_PD_FIX_INJECT", "signal:rank=1:delay_ms=20")
    patch_class(InjectedMessager, "observe")
    messager = InjectedMessager(rank, reads=[[task(0, "A")]])
    with caplog.at_level(logging.INFO, logger=logger.name):
        run_registration_loop(messager)
        TRACE.clear()
        SIGNALS.extend(
            [
                ("none", kv_buffer(-1, -1)),
                ("A layer 0", kv_buffer(1, 0, [(0, 0, 4)])),
                ("A layer 1", kv_buffer(1, 1, [(0, 0, 4)])),
                ("empty layer 0", kv_buffer(0, 0)),
            ]
        )
        run_consume_loop(messager)

    delay = [("sleep", 0.02)] if rank == 1 else []
    assert TRACE == [
        ("op", "none"),
        ("handled", -1),
        ("op", "A layer 0"),
        *delay,  # the op returned the signal; the release handles it after the delay
        ("handled", 1),
        ("op", "A layer 1"),
        ("handled", 1),
        ("op", "empty layer 0"),
        ("handled", 0),
        ("op", "end"),
    ]
    expected = "layer-0 signal handling delayed by 0.02s on rank 1 (observe mode"
    assert (expected in caplog.text) == (rank == 1)


# --- two ranks live: real threads, a real barrier, handshakes instead of sleeps --------------------------------

LIVE_OPS_MODULE = "test_injection_live_ops"  # LiveMessager imports its op from here, as some releases do locally
INJECTED_MS = 777  # the injected sleep is recognised by its length and held at a gate; other sleeps are short
DEADLINE_S = 5.0  # hang detection only: every wait below ends by a handshake long before


class LiveRanks:
    """Two ranks' registration reads and kv signals, fed by the test; what each rank did, in order."""

    def __init__(self):
        self.changed = threading.Condition()
        self.events = []  # (rank, kind, value): ("store", slot), ("put", batch), ("read_signal", label)
        self.reads = {rank: queue.Queue() for rank in (0, 1)}
        self.signals = {rank: queue.Queue() for rank in (0, 1)}
        self.op_calls = {0: 0, 1: 0}
        self.delivered_at = {}  # (rank, label) -> the op call that returned it
        self.gate_entered = threading.Event()
        self.gate_open = threading.Event()
        self.barrier = threading.Barrier(2, timeout=DEADLINE_S)

    def note(self, rank, kind, value=None):
        with self.changed:
            self.events.append((rank, kind, value))
            self.changed.notify_all()

    def of(self, rank, kind):
        with self.changed:
            return [value for event_rank, event_kind, value in self.events if (event_rank, event_kind) == (rank, kind)]

    def wait_until(self, predicate, what):
        with self.changed:
            assert self.changed.wait_for(predicate, timeout=DEADLINE_S), f"not within {DEADLINE_S} s: {what}"

    def read_signal(self, buffer, rank):
        """The kv-signal op of rank ``rank``: the next fed signal, or none (-1) after a short wait."""
        with self.changed:
            self.op_calls[rank] += 1
            self.changed.notify_all()
        try:
            label, values = self.signals[rank].get(timeout=0.005)
        except queue.Empty:
            buffer.set_value(kv_buffer(-1, -1))
            return
        if label is None:
            raise StopLoop
        buffer.set_value(values)
        with self.changed:
            self.delivered_at[rank, label] = self.op_calls[rank]
        self.note(rank, "read_signal", label)

    def handled(self, rank, label):
        """The rank's consume loop is done with ``label``: it called its op again (one thread reads and handles)."""
        return (rank, label) in self.delivered_at and self.op_calls[rank] > self.delivered_at[rank, label]

    def deliver_signal(self, label, values):
        """Feed the signal to both ranks and wait until each has handled it (its op was called again)."""
        for rank in (0, 1):
            self.signals[rank].put((label, values))
        self.wait_until(lambda: self.handled(0, label) and self.handled(1, label), f"both ranks handled {label}")

    def sleep(self, seconds):
        if seconds == INJECTED_MS / 1000:
            self.gate_entered.set()
            assert self.gate_open.wait(DEADLINE_S), "the injected delay was never released"
        else:
            REAL_SLEEP(min(seconds, 0.002))


LIVE = LiveRanks()


class LiveQueueClient:
    def __init__(self, rank):
        self.rank = rank
        self.cache_info_barrier = LIVE.barrier  # both ranks' clients reach the one engine-side barrier

    def get_cache_info(self):
        try:
            read = LIVE.reads[self.rank].get(timeout=0.005)
        except queue.Empty:
            return []
        if read is None:
            raise StopLoop
        return read


class LiveBatchQueue(queue.Queue):
    def __init__(self, rank):
        super().__init__()
        self.rank = rank

    def put(self, item, *args, **kwargs):
        LIVE.note(self.rank, "put", list(item))
        super().put(item, *args, **kwargs)


class LiveMessager:
    """InjectedMessager's shapes, run by threads; the op comes from a local import (resolved as the plugin does)."""

    def __init__(self, rank):
        self.engine_cache_task_thread_lock = threading.Lock()
        self.engine_cache_tasks = [dict() for _ in range(NUM_SLOTS)]
        self.idx_cache_task_dict = {}
        self.cache_prefilled_engine_ids_queue = LiveBatchQueue(rank)
        self.engine_worker_queue = LiveQueueClient(rank)
        self.rank, self.rank_id = rank, rank

    def consume_signals(self):
        from test_injection_live_ops import get_output_kv_signal

        buffer = paddle.full([KV_SIGNAL_LENGTH], -1, dtype="int32")
        while True:
            get_output_kv_signal(buffer, self.rank_id, 0)

    def _add_cache_task_thread(self):
        while True:
            cache_info = self.engine_worker_queue.get_cache_info()
            if not cache_info:
                continue
            self.engine_worker_queue.cache_info_barrier.wait()
            for task in cache_info:
                self.idx_cache_task_dict[task["current_id"]] = task
                LIVE.note(self.rank, "store", task["current_id"])


@pytest.fixture
def live_ranks(monkeypatch):
    """Starts both ranks' two loops (ordered mode) once FD_PD_FIX_INJECT is set; stops and joins them after."""
    global LIVE
    LIVE = LiveRanks()
    ops = types.ModuleType(LIVE_OPS_MODULE)
    ops.get_output_kv_signal = lambda buffer, rank_id, flag: LIVE.read_signal(buffer, rank_id)
    monkeypatch.setitem(sys.modules, LIVE_OPS_MODULE, ops)
    monkeypatch.setattr(time, "sleep", LIVE.sleep)
    threads = []

    def start(inject, mode="ordered"):
        monkeypatch.setenv("FD_PD_FIX_INJECT", inject)
        patch_class(LiveMessager, mode)
        for rank in (0, 1):
            messager = LiveMessager(rank)
            for loop in (messager._add_cache_task_thread, messager.consume_signals):
                threads.append(threading.Thread(target=run_until_stopped, args=(loop,), daemon=True))
                threads[-1].start()
        return LIVE

    yield start
    LIVE.gate_open.set()
    for rank in (0, 1):
        LIVE.reads[rank].put(None)
        LIVE.signals[rank].put((None, None))
    for thread in threads:
        thread.join(DEADLINE_S)
    unpatch_class(LiveMessager)
    assert not any(thread.is_alive() for thread in threads), "a rank loop did not stop"


def run_until_stopped(loop):
    try:
        loop()
    except StopLoop:
        pass


def test_registration_delay_after_the_barrier_makes_only_the_delayed_rank_see_its_signal_early(live_ranks):
    ranks = live_ranks(f"registration_after_barrier:rank=1:delay_ms={INJECTED_MS}")
    for rank in (0, 1):
        ranks.reads[rank].put([task(0, "A")])
    # Rank 1 is held in its delay after the barrier; rank 0 went through the same barrier and stored A.
    assert ranks.gate_entered.wait(DEADLINE_S)
    ranks.wait_until(lambda: ranks.of(0, "store") == [0], "rank 0 stores A while rank 1 is held")
    assert ranks.of(1, "store") == []

    ranks.deliver_signal("A layer 0", kv_buffer(1, 0, [(0, 0, 4)]))
    assert ranks.of(0, "put") == [[(0, 4)]]  # registered first: batched at once
    assert ranks.of(1, "put") == []  # the signal beat its registration on rank 1 only: held for it

    ranks.gate_open.set()
    ranks.wait_until(lambda: ranks.of(1, "put") == [[(0, 4)]], "rank 1 releases A once it stored it")
    assert ranks.of(1, "store") == [0]


def test_registration_delay_before_the_barrier_holds_both_ranks(live_ranks):
    ranks = live_ranks(f"registration:rank=1:delay_ms={INJECTED_MS}")
    for rank in (0, 1):
        ranks.reads[rank].put([task(0, "A")])
    assert ranks.gate_entered.wait(DEADLINE_S)
    ranks.wait_until(lambda: ranks.barrier.n_waiting == 1, "rank 0 waits at the barrier for rank 1")
    ranks.deliver_signal("A layer 0", kv_buffer(1, 0, [(0, 0, 4)]))
    assert ranks.of(0, "store") == ranks.of(1, "store") == []  # symmetric: both signals beat both registrations
    assert ranks.of(0, "put") == ranks.of(1, "put") == []

    ranks.gate_open.set()
    ranks.wait_until(lambda: all(ranks.of(rank, "put") == [[(0, 4)]] for rank in (0, 1)), "both release A")


def test_signal_delay_makes_only_the_delayed_rank_see_the_registration_first(live_ranks):
    ranks = live_ranks(f"signal:rank=1:delay_ms={INJECTED_MS}")
    for rank in (0, 1):
        ranks.signals[rank].put(("A layer 0", kv_buffer(1, 0, [(0, 0, 4)])))
    # Rank 0 handles the signal before any registration (early); rank 1 holds it before its release policy.
    ranks.wait_until(lambda: ranks.handled(0, "A layer 0"), "rank 0 handled A's signal")
    assert ranks.gate_entered.wait(DEADLINE_S)
    assert not ranks.handled(1, "A layer 0")
    assert ranks.of(0, "put") == []  # no registration yet: held

    for rank in (0, 1):
        ranks.reads[rank].put([task(0, "A")])
    ranks.wait_until(lambda: ranks.of(0, "put") == [[(0, 4)]], "rank 0 releases A at its registration")
    ranks.wait_until(lambda: ranks.of(1, "store") == [0], "rank 1 stores A while its signal is held")
    assert ranks.of(1, "put") == []

    ranks.gate_open.set()  # rank 1's signal now finds its registration: on time, batched at once
    ranks.wait_until(lambda: ranks.of(1, "put") == [[(0, 4)]], "rank 1 releases A at its signal")


def test_observe_mode_delays_only_the_delayed_ranks_calls_of_an_op_imported_locally(live_ranks):
    """Both ranks in one process call the one op their release imports inside consume_signals (observe mode: the
    release's loop): rank 1's layer-0 signal is held after the op returned it, rank 0's is not."""
    ranks = live_ranks(f"signal:rank=1:delay_ms={INJECTED_MS}", mode="observe")
    for rank in (0, 1):
        ranks.signals[rank].put(("A layer 0", kv_buffer(1, 0, [(0, 0, 4)])))
    ranks.wait_until(lambda: ranks.handled(0, "A layer 0"), "rank 0 handled A's signal at once")
    assert ranks.gate_entered.wait(DEADLINE_S)
    assert not ranks.handled(1, "A layer 0")
    ranks.signals[0].put(("B layer 0", kv_buffer(1, 0, [(1, 0, 4)])))
    ranks.wait_until(lambda: ranks.handled(0, "B layer 0"), "rank 0 goes on while rank 1 is held")

    ranks.gate_open.set()
    ranks.wait_until(lambda: ranks.handled(1, "A layer 0"), "rank 1 handled A's signal after its delay")


BAD_ITEMS = [
    "registration:rank=1:delay_ms=oops",
    "bogus:rank=1:delay_ms=5",
    "signal:delay_ms=5",  # no rank
    "registration:rank=one:delay_ms=5",
    "signal:rank=1:delay_ms=-5",  # time.sleep(-0.005) raised in the consume loop: every layer-0 signal was lost
    "registration:rank=1:delay_ms=nan",  # time.sleep(nan) raised after the read: the registration was lost
    "signal:rank=1:delay_ms=inf",
    "registration_after_barrier:rank=1",  # no delay
    "registration_before_barrier:rank=1:delay_ms=5",  # no such stage
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
    assert TRACE == [("read", 1), ("barrier",), ("store", 0), ("op", "A layer 0"), ("put", [(0, 4)]), ("op", "end")]
    for item in BAD_ITEMS:
        assert f"FD_PD_FIX_INJECT item {item!r} ignored" in caplog.text
    assert "delayed by" not in caplog.text and "error in consume_signals" not in caplog.text


def test_standin_runs_apply_each_delay_on_rank_1_only_in_real_rank_processes():
    """The wiring in real rank processes: the manager's barrier proxy wrapped (ordered mode), and the kv-signal op
    of the release's own consume_signals (observe mode, the script's module global) wrapped."""
    after_barrier = "registration_after_barrier:rank=1:delay_ms=50"
    variant = {"release": "8034", "with_7724": True, "op_args": 4}
    ordered, observe = run_many(
        [
            dict(scenario="s3", env={"FD_PD_FIX_MODE": "ordered", "FD_PD_FIX_INJECT": after_barrier}, **variant),
            dict(
                scenario="s0",
                env={"FD_PD_FIX_MODE": "observe", "FD_PD_FIX_INJECT": f"{after_barrier},signal:rank=1:delay_ms=20"},
                **{**variant, "op_args": 3},
            ),
        ],
        parallel=2,
    )
    for result in (ordered, observe):
        assert result.outcome == "finished", result.summary()
        assert result.same_batches_on_all_ranks()
        assert "FD_PD_FIX_INJECT: registration delayed by 0.05s after cache_info_barrier on rank 1" in result.logs[1]
        assert "FD_PD_FIX_INJECT" not in result.logs[0]
    one_batch_per_signal = [
        [[slot, offset + length] for slot, offset, length in signal] for signal in SCENARIOS["s3"]["signals"]
    ]
    assert ordered.batches[0] == one_batch_per_signal
    assert ordered.finished == {0: ["B", "A"], 1: ["B", "A"]}
    assert "layer-0 signal handling delayed by 0.02s on rank 1 (observe mode" in observe.logs[1]
