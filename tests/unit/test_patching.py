"""Target checks, idempotence and the patched methods, in process, with small CacheMessagerV1-shaped classes.

The classes below are test fixtures with the attribute and method names of protocol.md, nothing more; the
multi-process tests run the full stand-in as a script.
"""

import logging
import queue
import threading

import numpy as np
import pytest

from fastdeploy_pd_fix import config
from fastdeploy_pd_fix.adapters.messager_step import BoundTaskDict
from fastdeploy_pd_fix.analysis import CANNOT_RACE, analyse_class
from fastdeploy_pd_fix.plugin.messager import runtime
from fastdeploy_pd_fix.plugin.messager.patch import is_patched, original_method, patch_class, unpatch_class
from fastdeploy_pd_fix.policy.notice import abort_notice, encode

SCRIPT = []  # the kv signals the fake op returns, in order; each is (count, layer, triples)
CALLS = []  # the argument tuples the fake op was called with
logger = logging.getLogger("test_patching.messager")  # the plugin logs into the target module's `logger`


class StopLoop(BaseException):
    """Ends the otherwise endless consume loop (BaseException: the loop survives every Exception)."""


def get_output_kv_signal(buffer, *args):
    CALLS.append(args)
    if not SCRIPT:
        raise StopLoop
    item = SCRIPT.pop(0)
    if isinstance(item, Exception):
        raise item
    count, layer, triples = item
    values = np.full(buffer.shape, -1, dtype=np.int32)
    values[0], values[1] = count, layer
    for index, triple in enumerate(triples):
        values[2 + 3 * index : 5 + 3 * index] = triple
    buffer.set_value(values)


class Registering:
    """Shared fixture shape: attributes of CacheMessagerV1.__init__ and a registration loop that stores tasks."""

    def __init__(self, registrations=()):
        self.engine_cache_task_thread_lock = threading.Lock()
        self.engine_cache_tasks = [dict() for _ in range(512)]
        self.idx_cache_task_dict = {}
        self.cache_prefilled_engine_ids_queue = queue.Queue()
        self.rank_id = 3
        self.gpu_id = 5
        self.registrations = list(registrations)
        self.finish_add_cache_task_barrier = threading.Barrier(1)

    def _add_cache_task_thread(self):
        for task in self.registrations:
            self.idx_cache_task_dict[task["current_id"]] = task


class ThreeArgs(Registering):
    def consume_signals(self):
        buffer = None
        get_output_kv_signal(buffer, self.rank_id, 0)

    def _add_cache_task_thread(self):  # pre-#7724: the registration loop then waits at a barrier
        for task in self.registrations:
            self.idx_cache_task_dict[task["current_id"]] = task
        self.finish_add_cache_task_barrier.wait()


class FourArgs(Registering):
    def __init__(self, registrations=()):
        super().__init__(registrations)
        self.pending_layer0_signals = {}

    def consume_signals(self):
        get_output_kv_signal(self.buffer, self.rank_id, self.gpu_id, 1)

    def _maybe_wait_for_cache_task(self, slot):
        pass


@pytest.fixture(autouse=True)
def clean_script(monkeypatch):
    # ThreeArgs is pre-#7724 (it reports registrations): patched only when asked to, as the stand-in asks.
    monkeypatch.setenv(config.ENV_PATCH_NON_RACING, "1")
    SCRIPT.clear()
    CALLS.clear()
    yield
    for cls in (ThreeArgs, FourArgs):
        unpatch_class(cls)


def task(slot, request_id, need):
    return {"current_id": slot, "request_id": request_id, "need_prefill_tokens": need}


def drain(q):
    items = []
    while not q.empty():
        items.append(q.get_nowait())
    return items


def test_analysis_reads_both_op_signatures_and_release_features():
    three, four = analyse_class(ThreeArgs), analyse_class(FourArgs)
    assert three.recognised and tuple(arg.source for arg in three.op_arguments) == ("self.rank_id", "0")
    assert not three.has_pending_buffer and three.reports_finished_add
    assert four.recognised and tuple(arg.source for arg in four.op_arguments) == ("self.rank_id", "self.gpu_id", "1")
    assert four.has_pending_buffer and not four.reports_finished_add
    assert "(#7872+)" in four.features() and "(#7724+)" in four.features()


@pytest.mark.parametrize("value, patched", [(None, False), ("0", False), ("maybe", False), ("1", True)])
def test_a_release_that_cannot_race_is_left_alone_unless_asked(monkeypatch, caplog, value, patched):
    """ThreeArgs reports every registration (pre-#7724): its engine waits for the report, the ranks cannot race."""
    if value is None:
        monkeypatch.delenv(config.ENV_PATCH_NON_RACING)
    else:
        monkeypatch.setenv(config.ENV_PATCH_NON_RACING, value)
    original = ThreeArgs.consume_signals
    with caplog.at_level(logging.INFO):
        record = patch_class(ThreeArgs, "ordered")
    assert record.decision == ("patched" if patched else "stood aside")
    assert (ThreeArgs.consume_signals is original) != patched
    assert (CANNOT_RACE in record.reason) != patched
    assert ("is not 1/true/on/yes: stays off" in caplog.text) == (value == "maybe")
    monkeypatch.delenv(config.ENV_PATCH_NON_RACING, raising=False)
    assert patch_class(FourArgs, "ordered").decision == "patched"  # #7724+: it can race


def _unrecognised_shapes():
    class NoRegistrationLoop:
        def consume_signals(self):
            get_output_kv_signal(None, self.rank_id, 0)

    class TwoOpCalls(Registering):
        def consume_signals(self):
            get_output_kv_signal(None, self.rank_id, 0)
            get_output_kv_signal(None, self.rank_id, 1)

    class LocalArgument(Registering):
        def consume_signals(self):
            device_id = 0
            get_output_kv_signal(None, self.rank_id, device_id, 0)

    class StoresByUpdate(ThreeArgs):
        def _add_cache_task_thread(self):
            self.idx_cache_task_dict.update({0: {}})

    class AlreadyFixed(Registering):
        def consume_signals(self):
            from fastdeploy.cache_manager.layer0_release import OrderedRelease  # noqa: F401

            get_output_kv_signal(None, self.rank_id, 0)

    return [
        (NoRegistrationLoop, "missing methods _add_cache_task_thread"),
        (TwoOpCalls, "found 2"),
        (LocalArgument, "unexpected get_output_kv_signal call"),
        (StoresByUpdate, "does not store tasks"),
        (AlreadyFixed, "already carries the rank-invariant release"),
    ]


@pytest.mark.parametrize("cls, reason", _unrecognised_shapes())
def test_unrecognised_target_is_left_alone_with_a_reason(cls, reason, caplog):
    originals = (cls.__dict__.get("consume_signals"), cls.__dict__.get("_add_cache_task_thread"))
    with caplog.at_level(logging.WARNING, logger="fastdeploy_pd_fix"):
        record = patch_class(cls, "ordered")
    assert record.decision == "stood aside" and reason in record.reason
    assert (cls.__dict__.get("consume_signals"), cls.__dict__.get("_add_cache_task_thread")) == originals
    assert not is_patched(cls)
    assert f"stood aside {cls.__module__}.{cls.__qualname__}" in caplog.text


def test_source_on_disk_that_no_longer_matches_the_method_is_not_trusted(monkeypatch):
    # A file replaced on disk after the module was compiled (an upgrade under a running process) shifts lines.
    monkeypatch.setattr("fastdeploy_pd_fix.live_source.inspect.getsource", lambda function: "x = 1\n")
    analysis = analyse_class(ThreeArgs)
    assert not analysis.recognised and "does not match the running code" in analysis.reason


def test_patch_is_idempotent_reversible_and_keeps_originals_reachable():
    original = ThreeArgs.consume_signals
    assert patch_class(ThreeArgs, "ordered").decision == "patched"
    assert patch_class(ThreeArgs, "ordered").decision == "already patched"
    assert ThreeArgs.consume_signals is not original and ThreeArgs.consume_signals.__wrapped__ is original
    assert original_method(ThreeArgs, "consume_signals") is original
    assert analyse_class(ThreeArgs).recognised  # the check sees through our wrapper to the original source
    unpatch_class(ThreeArgs)
    assert ThreeArgs.consume_signals is original and not is_patched(ThreeArgs)


@pytest.mark.parametrize("cls, expected_args", [(ThreeArgs, (3, 0)), (FourArgs, (3, 5, 1))])
def test_patched_methods_release_in_order_and_keep_engine_progress(cls, expected_args, caplog):
    patch_class(cls, "ordered")
    messager = cls([task(1, "B", 4)])
    messager._add_cache_task_thread()  # B registered before any signal
    SCRIPT.extend(
        [
            (-1, -1, []),  # no signal yet
            (2, 0, [(0, 0, 4), (1, 0, 4)]),  # A chunk 1 (A not registered yet) and B final
            (2, 1, [(0, 0, 4), (1, 0, 4)]),  # layer 1 of the same step: progress only
            (600, 0, []),  # malformed count
            ValueError("op failed once"),
        ]
    )
    caplog.set_level(logging.INFO)
    with pytest.raises(StopLoop):
        messager.consume_signals()
    assert drain(messager.cache_prefilled_engine_ids_queue) == []  # the older A task blocks B
    assert CALLS[0] == expected_args
    assert messager.engine_cache_tasks[0] == {"prefilled_layer_idx": 1, "prefilled_token_num": 4}
    assert "tasks_count 600 out of range" in caplog.text and "op failed once" in caplog.text

    messager.idx_cache_task_dict[0] = task(0, "A", 8)  # the registration thread stores A
    assert drain(messager.cache_prefilled_engine_ids_queue) == [[(0, 4), (1, 4)]]
    assert "queued batch #1 [(0, 4), (1, 4)] seq_hash=" in caplog.text
    assert not getattr(messager, "pending_layer0_signals", {})  # upstream's buffer is never filled


def test_upstream_mode_recovers_single_request_batches():
    patch_class(ThreeArgs, "upstream")
    messager = ThreeArgs([task(1, "B", 4)])
    messager._add_cache_task_thread()
    SCRIPT.append((2, 0, [(0, 0, 4), (1, 0, 4)]))
    with pytest.raises(StopLoop):
        messager.consume_signals()
    messager.idx_cache_task_dict[0] = task(0, "A", 8)
    assert drain(messager.cache_prefilled_engine_ids_queue) == [[(1, 4)], [(0, 4)]]


def test_malformed_registration_is_logged_and_nothing_released(caplog):
    patch_class(ThreeArgs, "ordered")
    messager = ThreeArgs([{"current_id": 0, "request_id": "A"}])  # need_prefill_tokens missing
    with caplog.at_level(logging.ERROR):
        messager._add_cache_task_thread()
    assert "registration for slot 0 ignored, malformed task" in caplog.text
    assert messager.idx_cache_task_dict[0]["request_id"] == "A"  # the original's store itself is untouched


def test_instance_missing_attributes_runs_the_originals(caplog):
    patch_class(ThreeArgs, "ordered")
    messager = ThreeArgs()
    del messager.cache_prefilled_engine_ids_queue
    with caplog.at_level(logging.WARNING):
        messager._add_cache_task_thread()
    assert "stood aside for this messager" in caplog.text
    assert type(messager.idx_cache_task_dict) is dict  # no observer installed
    assert messager._fd_pd_fix_runtime is None
    with pytest.raises(StopLoop):
        messager.consume_signals()  # the original's body ran: it called the op with its own arguments
    assert CALLS == [(3, 0)]


def test_plugin_logs_into_the_messager_module_logger():
    assert runtime.messager_logger(ThreeArgs()) is logger


def test_activation_attaches_the_step_and_coexists_with_the_queue_observer(caplog):
    # A's final chunk is queued, A is aborted and slot 3 goes to B before the send thread takes A's batch.
    patch_class(ThreeArgs, "ordered")
    messager = ThreeArgs([task(3, "A", 4)])
    caplog.set_level(logging.INFO)
    messager._add_cache_task_thread()  # activation: the step attached before the original loop stored A
    assert isinstance(messager.idx_cache_task_dict, BoundTaskDict)
    SCRIPT.append((1, 0, [(3, 0, 4)]))
    with pytest.raises(StopLoop):
        messager.consume_signals()
    messager.idx_cache_task_dict[3] = task(3, "B", 4)
    batch_queue = messager.cache_prefilled_engine_ids_queue
    assert batch_queue.get_nowait() == [(3, 4)]  # both wrappers of get ran on this one call
    assert messager._fd_pd_fix_runtime.observer.held_for()[0] == [(3, 4)]  # the watchdog's held batch
    assert messager.idx_cache_task_dict[3]["request_id"] == "A"  # the batch's own task, not the slot's newest
    del messager.idx_cache_task_dict[3]  # the cleanup after A's send
    assert dict(messager.idx_cache_task_dict) == {3: task(3, "B", 4)}
    assert len([record for record in caplog.records if "queued batch #" in record.getMessage()]) == 1


def test_observe_mode_keeps_a_plain_dict_and_journals_each_batch_once(caplog):
    patch_class(ThreeArgs, "observe")
    messager = ThreeArgs([task(3, "A", 4)])
    caplog.set_level(logging.INFO)
    messager._add_cache_task_thread()
    assert type(messager.idx_cache_task_dict) is dict and messager._fd_pd_fix_runtime.step is None
    messager.cache_prefilled_engine_ids_queue.put([(3, 4)])  # as the running release's own loop does
    assert messager.cache_prefilled_engine_ids_queue.get_nowait() == [(3, 4)]
    assert messager._fd_pd_fix_runtime.observer.held_for()[0] == [(3, 4)]
    assert len([record for record in caplog.records if "queued batch #1 [(3, 4)]" in record.getMessage()]) == 1


class NoticeReads:
    """An engine_worker_queue client whose get_cache_info returns one read of a notice and a part."""

    def __init__(self, items):
        self.items = items

    def get_cache_info(self):
        items, self.items = self.items, []
        return items


@pytest.mark.parametrize("mode", ["observe", "ordered"])
def test_engine_notices_never_reach_the_registration_loop(caplog, mode):
    patch_class(ThreeArgs, mode)
    messager = ThreeArgs()
    part = {"request_id": "B", "current_id": 0}
    messager.engine_worker_queue = NoticeReads([encode(abort_notice(0, "A", None)), part])
    caplog.set_level(logging.INFO)
    messager._add_cache_task_thread()
    assert messager.engine_worker_queue.get_cache_info() == [part]
    expected = {"observe": "engine notice ignored in observe mode", "ordered": "engine notice: abort of request A"}
    assert expected[mode] in caplog.text
