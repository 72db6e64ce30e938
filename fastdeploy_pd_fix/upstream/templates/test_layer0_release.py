"""Unit tests of fastdeploy/cache_manager/layer0_release/ on CPU (numpy only: no paddle op, no GPU, no network).

Every tensor-parallel rank of the prefill cache messager sees the same kv signals and the same registrations, each
rank in its own interleaving. The release must give every rank the same batches and drop the same tasks, whatever
the interleaving: otherwise the ranks wait on the send barriers in different orders and hang. It must also bind
each task to the request it belongs to when the engine aborts a request mid-prefill and gives its slot to the next
request without telling the messager, and when a cache-info part arrives twice; and the engine's slot-lifecycle
notices (an abort, a request computed without transfer), read from get_cache_info, must decide what the two streams
alone cannot.
"""

import itertools
import queue
import threading

import numpy as np
import pytest

from fastdeploy.cache_manager.layer0_release.adapters import engine_notices, messager_step
from fastdeploy.cache_manager.layer0_release.policy import decision, kv_signal, notice, release


def kv_signal_buffer(tasks, layer=0):
    """A get_output_kv_signal buffer holding ``tasks``, each ``[engine_idx, chunk_token_offset, chunk_len]``."""
    buffer = np.full([kv_signal.KV_SIGNAL_LENGTH], -1, dtype=np.int32)
    buffer[0], buffer[1] = len(tasks), layer
    for position, task in enumerate(tasks):
        buffer[2 + 3 * position : 5 + 3 * position] = task
    return buffer


def cache_task(request_id, need_prefill_tokens):
    return {"request_id": request_id, "need_prefill_tokens": need_prefill_tokens}


class SimulatedRank:
    """What CacheMessagerV1 does around the release: parse each signal, feed layer 0 and registrations, collect."""

    def __init__(self, mode=release.ORDERED):
        self.policy = release.make_release(mode)
        self.registered = {}  # engine_idx -> need_prefill_tokens, the view of idx_cache_task_dict
        self.batches, self.bound, self.drops, self.decisions, self.problems = [], [], [], [], []

    def on_signal(self, buffer):
        parsed = kv_signal.parse_kv_signal(buffer)
        self.problems.extend(parsed.problems)
        if parsed.signal is not None and parsed.signal.layer == 0 and parsed.signal.tasks:
            self._collect(self.policy.add_signal(parsed.signal.tasks, self.registered))

    def on_registration(self, request_id, engine_idx, need_prefill_tokens):
        self.registered[engine_idx] = need_prefill_tokens
        task = cache_task(request_id, need_prefill_tokens)
        registration = release.Registration(engine_idx, request_id, need_prefill_tokens, task)
        self._collect(self.policy.add_registration(registration, self.registered))

    def _collect(self, released):
        self.batches.extend(released.batches)
        self.bound.extend(tuple(item.task["request_id"] for item in binding) for binding in released.bindings)
        self.drops.extend(released.drops)
        self.decisions.extend(released.decisions)


def run_rank(scenario, schedule, mode=release.ORDERED):
    """Deliver the scenario's events to one rank in ``schedule`` order: ``("sig", i)`` or ``("reg", j)``."""
    rank = SimulatedRank(mode)
    for kind, index in schedule:
        if kind == "sig":
            rank.on_signal(kv_signal_buffer(scenario["signals"][index]))
        else:
            for request in scenario["registrations"][index]:
                rank.on_registration(*request)
    return rank


def interleavings(scenario):
    """Every order of the two streams that keeps each stream in its own order."""
    signals = [("sig", index) for index in range(len(scenario["signals"]))]
    registrations = [("reg", index) for index in range(len(scenario["registrations"]))]
    total = len(signals) + len(registrations)
    for positions in itertools.combinations(range(total), len(signals)):
        signal_iter, registration_iter = iter(signals), iter(registrations)
        yield [next(signal_iter) if slot in positions else next(registration_iter) for slot in range(total)]


# signals: one list of [engine_idx, chunk_token_offset, chunk_len] per layer-0 kv signal;
# registrations: one list of (request_id, engine_idx, need_prefill_tokens) per get_cache_info read;
# bound: per batch, the request each of its tasks is bound to (the task the send loop must read).
SCENARIOS = {
    # One signal for A and B; B registers after it on one rank only.
    "s1": {
        "signals": [[[0, 0, 4], [1, 0, 4]]],
        "registrations": [[("A", 0, 4)], [("B", 1, 4)]],
        "batches": [((0, 4), (1, 4))],
        "bound": [("A", "B")],
        "drops": [],
    },
    # Chunked prefill: A needs 8 tokens in two chunks, both chunk signals may beat A's registration.
    "s2": {
        "signals": [[[0, 0, 4]], [[0, 4, 4]]],
        "registrations": [[("A", 0, 8)]],
        "batches": [((0, 4),), ((0, 8),)],
        "bound": [("A",), ("A",)],
        "drops": [],
    },
    # Order across requests: A (two chunks) and B (one) in one signal, B registers first.
    "s3": {
        "signals": [[[0, 0, 4], [1, 0, 4]], [[0, 4, 4]]],
        "registrations": [[("B", 1, 4)], [("A", 0, 8)]],
        "batches": [((0, 4), (1, 4)), ((0, 8),)],
        "bound": [("A", "B"), ("A",)],
        "drops": [],
    },
    # A task of B beyond its need_prefill_tokens is dropped, on every rank alike; A's tasks in the same signal stay.
    "drops": {
        "signals": [[[0, 0, 4]], [[0, 4, 4], [1, 0, 6]]],
        "registrations": [[("A", 0, 8), ("B", 1, 4)]],
        "batches": [((0, 4),), ((0, 8),)],
        "bound": [("A",), ("A",)],
        "drops": [(1, 6)],
        "open": {1: ["B"]},  # B's only task was dropped: it stays open, alike on every rank
    },
    # A (needs 8) is aborted after its first chunk; its slot goes to B (needs 4), whose chunk does not continue A.
    "abort-reuse": {
        "signals": [[[0, 0, 4]], [[0, 0, 4]]],
        "registrations": [[("A", 0, 8)], [("B", 0, 4)]],
        "batches": [((0, 4),), ((0, 4),)],
        "bound": [("A",), ("B",)],
        "drops": [],
        "abandoned": ["A"],
    },
    # The measured case: A (needs 256) is aborted after its first chunk; B (64), C (256, two chunks) and D (64)
    # take slot 3 in turn. Each request is released with its own registration, none is dropped.
    "abort-ABCD": {
        "signals": [[[3, 0, 128]], [[3, 0, 64]], [[3, 0, 128]], [[3, 128, 128]], [[3, 0, 64]]],
        "registrations": [[("A", 3, 256)], [("B", 3, 64)], [("C", 3, 256)], [("D", 3, 64)]],
        "batches": [((3, 128),), ((3, 64),), ((3, 128),), ((3, 256),), ((3, 64),)],
        "bound": [("A",), ("B",), ("C",), ("C",), ("D",)],
        "drops": [],
        "abandoned": ["A"],
    },
    # A's D-part is repeated late, after A was aborted and B registered on its slot: the repeat is not a request.
    "abort-late-repeat": {
        "signals": [[[0, 0, 4]], [[0, 0, 4]], [[0, 4, 4]]],
        "registrations": [[("A", 0, 8)], [("B", 0, 8)], [("A", 0, 8)]],
        "batches": [((0, 4),), ((0, 4),), ((0, 8),)],
        "bound": [("A",), ("B",), ("B",)],
        "drops": [],
        "abandoned": ["A"],
        "repeats": 1,
    },
}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_two_ranks_release_the_same_batches_in_every_interleaving(name):
    scenario = SCENARIOS[name]
    orders = list(interleavings(scenario))
    ranks = [run_rank(scenario, order) for order in orders]
    for order, rank in zip(orders, ranks):
        assert rank.batches == scenario["batches"], order
        assert rank.bound == scenario["bound"], order  # every request released with its own registration
        assert [(drop.slot, drop.prefilled_token_num) for drop in rank.drops] == scenario["drops"], order
        assert rank.drops == ranks[0].drops, order  # the same reasons too
        kinds = [(item.kind, item.request_id) for item in rank.decisions]
        abandoned = [request_id for kind, request_id in kinds if kind == decision.ABANDONED]
        assert abandoned == scenario.get("abandoned", []), order
        assert [kind for kind, _ in kinds].count(decision.COUNTED_BEFORE) == scenario.get("repeats", 0), order
        assert rank.policy.open_registrations() == scenario.get("open", {}), order  # nothing left to wedge a slot
        assert rank.problems == []


def test_nothing_is_released_before_registration():
    scenario = SCENARIOS["s3"]
    rank = run_rank(scenario, [("sig", 0), ("sig", 1), ("reg", 0)])
    assert rank.batches == []  # A's chunk heads the signal log and A is not registered yet
    rank = run_rank(scenario, [("sig", 0), ("sig", 1), ("reg", 0), ("reg", 1)])
    assert rank.batches == scenario["batches"]


def test_malformed_signals_are_reported_alike_and_do_not_disturb_the_release():
    malformed = [
        np.array([600, 0] + [0] * (kv_signal.KV_SIGNAL_LENGTH - 2), dtype=np.int32),  # count out of range
        kv_signal_buffer([[0, 0, 4]], layer=-1),  # negative layer
        kv_signal_buffer([[-1, 0, 4], [600, 0, 4], [0, 0, 0]]),  # bad slots, zero length: every task dropped
        np.zeros([1], dtype=np.int32),  # truncated buffer
    ]
    ranks = []
    for malformed_first in (True, False):
        rank = SimulatedRank()
        if not malformed_first:
            rank.on_registration("A", 0, 4)
        for buffer in malformed:
            rank.on_signal(buffer)
        rank.on_signal(kv_signal_buffer([[0, 0, 4], [-5, 0, 4]]))  # one valid task, one malformed
        if malformed_first:
            rank.on_registration("A", 0, 4)
        ranks.append(rank)
    assert ranks[0].batches == ranks[1].batches == [((0, 4),)]
    assert ranks[0].problems == ranks[1].problems
    assert len(ranks[0].problems) == 7


def test_parse_kv_signal_reads_chunks_and_no_signal():
    parsed = kv_signal.parse_kv_signal(kv_signal_buffer([[3, 128, 64], [7, 0, 16]], layer=2))
    assert parsed.problems == []
    assert parsed.signal == kv_signal.KvSignal(2, ((3, 128, 192), (7, 0, 16)))
    empty = kv_signal.parse_kv_signal(np.full([kv_signal.KV_SIGNAL_LENGTH], -1, dtype=np.int32))
    assert empty.signal is None and empty.problems == []


def test_upstream_mode_keeps_the_8034_behaviour_that_diverges_on_chunked_prefill():
    scenario = SCENARIOS["s2"]
    rank0 = run_rank(scenario, [("reg", 0), ("sig", 0), ("sig", 1)], mode=release.UPSTREAM)
    rank1 = run_rank(scenario, [("sig", 0), ("sig", 1), ("reg", 0)], mode=release.UPSTREAM)
    assert rank0.batches == [((0, 4),), ((0, 8),)]
    assert rank1.batches == [((0, 8),)]  # one batch instead of two: the ranks' barrier rounds differ


def test_invalid_registration_and_mode_are_rejected():
    with pytest.raises(ValueError):
        release.Registration(0, "A", 0)
    with pytest.raises(ValueError):
        release.make_release("unknown")


class FakeMessager:
    """The attributes of CacheMessagerV1 that the per-signal step reads and writes."""

    def __init__(self, cache_info_reads=(), announced=True):
        self.engine_cache_task_thread_lock = threading.Lock()
        self.engine_cache_tasks = [dict() for _ in range(kv_signal.MAX_TASKS)]
        self.idx_cache_task_dict = {}
        self.cache_prefilled_engine_ids_queue = queue.Queue()
        self.engine_worker_queue = FakeEngineWorkerQueue(cache_info_reads, announced)


class FakeEngineWorkerQueue:
    """get_cache_info returns the scripted reads in turn, then nothing; with ``announced``, the first non-empty one
    starts with the engine's announcement, as the fixed engine's first put does (engine_notices.AnnouncedPut)."""

    def __init__(self, reads, announced):
        self.reads = list(reads)
        self.announce = announced

    def get_cache_info(self):
        items = self.reads.pop(0) if self.reads else []
        if items and self.announce:
            self.announce = False
            items = [notice.encode(notice.engine_notice("layer0_release tests"))] + items
        return items


class RecordingLogger:
    def __init__(self):
        self.lines = []

    def info(self, message):
        self.lines.append(message)

    warning = error = exception = info


def attached_step(messager, logger):
    """What _add_cache_task_thread does with the fix before its loop: attach the release (idempotent)."""
    step = messager_step.step_for(messager, release.ORDERED, logger)
    step.attach()
    step.attach()
    return step


def store(messager, engine_idx, task):
    """What _add_cache_task_thread's loop does with a completed task."""
    messager.idx_cache_task_dict[engine_idx] = task


def send_queued_batches(messager, sent):
    """What the send loop reads for each batch it takes: the task per slot; a request's final chunk deletes it."""
    batch_queue = messager.cache_prefilled_engine_ids_queue
    while not batch_queue.empty():
        batch = batch_queue.get()
        for engine_idx, prefilled_token_num in batch:
            task = messager.idx_cache_task_dict[engine_idx]
            sent.append((task["request_id"], prefilled_token_num))
            if prefilled_token_num == task["need_prefill_tokens"]:
                del messager.idx_cache_task_dict[engine_idx]


def test_messager_step_queues_and_journals_the_same_batches_on_every_rank():
    scenario = SCENARIOS["s3"]
    journals = []
    for order in interleavings(scenario):
        messager, logger = FakeMessager(), RecordingLogger()
        step = attached_step(messager, logger)
        assert messager_step.step_for(messager, release.ORDERED, logger) is step  # one step per messager
        for kind, index in order:
            if kind == "sig":
                assert step.handle_buffer(kv_signal_buffer(scenario["signals"][index]))
                continue
            for request_id, engine_idx, need_prefill_tokens in scenario["registrations"][index]:
                store(messager, engine_idx, cache_task(request_id, need_prefill_tokens))
        queued = [tuple(map(tuple, messager.cache_prefilled_engine_ids_queue.get_nowait())) for _ in range(2)]
        assert queued == scenario["batches"] and messager.cache_prefilled_engine_ids_queue.empty()
        assert messager.engine_cache_tasks[0] == {"prefilled_layer_idx": 0, "prefilled_token_num": 8}
        journals.append([line for line in logger.lines if "queued batch #" in line])
    assert len(journals[0]) == 2 and all("seq_hash=" in line for line in journals[0])
    assert all(journal == journals[0] for journal in journals)  # the same fingerprints on every rank


@pytest.mark.parametrize("send_early", [False, True], ids=["send-after-all", "send-after-each-event"])
def test_send_loop_reads_each_batch_own_task_after_an_abort_and_slot_reuse(send_early):
    # abort-ABCD through the messager step: the send loop runs after every event, or only once everything was
    # stored, when idx_cache_task_dict[3] already holds D: A's, B's and C's batches must still read their own task.
    scenario = SCENARIOS["abort-ABCD"]
    expected = [("A", 128), ("B", 64), ("C", 128), ("C", 256), ("D", 64)]
    for order in interleavings(scenario):
        messager, logger, sent = FakeMessager(), RecordingLogger(), []
        step = attached_step(messager, logger)
        for kind, index in order:
            if kind == "sig":
                step.handle_buffer(kv_signal_buffer(scenario["signals"][index]))
            else:
                for request_id, engine_idx, need_prefill_tokens in scenario["registrations"][index]:
                    store(messager, engine_idx, cache_task(request_id, need_prefill_tokens))
            if send_early:
                send_queued_batches(messager, sent)
        send_queued_batches(messager, sent)
        assert sent == expected, order
        assert dict(messager.idx_cache_task_dict) == {}, order  # D's entry deleted by D's send, nobody else's
        logged = [decision.parse_decision(line.partition("layer0_release: ")[2]) for line in logger.lines]
        abandoned = [(item.request_id, item.slot) for item in logged if item and item.kind == decision.ABANDONED]
        assert abandoned == [("A", 3)], order


def test_abort_notice_decides_a_request_aborted_before_its_first_chunk():
    # A registers and is aborted before its first chunk; B registers on its slot and computes [0, 4), the very chunk
    # A would have computed. Only the engine's notice, read between the two registrations, can tell: B's chunk is
    # B's on every rank. The engine fences the abort, so B's signal comes after it in every rank's view.
    reads = [
        [{"request_id": "A-part"}],
        [notice.encode(notice.abort_notice(0, "A", None)), notice.encode(notice.fence_notice(1))],
        [{"request_id": "B-part"}],
    ]
    for signal_after in (2, 3):  # the signal comes after the abort (the fence), before or after B's store
        messager, logger, sent = FakeMessager(reads), RecordingLogger(), []
        step = attached_step(messager, logger)
        for read in range(3):
            others = messager.engine_worker_queue.get_cache_info()
            assert all(not notice.is_notice(item) for item in others)  # the loop never sees a notice
            if read == 0:
                store(messager, 0, cache_task("A", 4))
            if read == 2:
                store(messager, 0, cache_task("B", 4))
            if read + 1 == signal_after:
                step.handle_buffer(kv_signal_buffer([[0, 0, 4]]))
        if signal_after == 3:
            step.handle_buffer(kv_signal_buffer([[0, 0, 4]]))
        send_queued_batches(messager, sent)
        assert sent == [("B", 4)], signal_after
        assert any("engine notice: abort of request A on slot 0" in line for line in logger.lines)


def test_orphan_notice_drops_the_chunks_of_a_request_computed_without_transfer():
    reads = [[notice.encode(notice.orphan_notice(0, "O", 4))]]
    messager, logger, sent = FakeMessager(reads), RecordingLogger(), []
    step = attached_step(messager, logger)
    assert messager.engine_worker_queue.get_cache_info() == []
    step.handle_buffer(kv_signal_buffer([[0, 0, 4]]))  # O's chunk: no transfer
    store(messager, 0, cache_task("B", 4))
    step.handle_buffer(kv_signal_buffer([[0, 0, 4]]))  # B's chunk
    send_queued_batches(messager, sent)
    assert sent == [("B", 4)]
    assert any("belongs to orphan O" in line for line in logger.lines)


def test_without_the_engine_announcement_the_release_goes_on_by_upstream_rule():
    # The engine side is absent: the first read carries no announcement. An unregistered signal on slot 3 (an orphan's
    # or an early one: the two streams cannot tell) must not hold A on slot 1; upstream's rule sends A (rule 10).
    for announced in (True, False):
        messager, logger, sent = FakeMessager([[{"request_id": "A-part"}]], announced), RecordingLogger(), []
        step = attached_step(messager, logger)
        step.handle_buffer(kv_signal_buffer([[3, 0, 4]]))
        assert messager.engine_worker_queue.get_cache_info() == [{"request_id": "A-part"}]
        store(messager, 1, cache_task("A", 4))
        step.handle_buffer(kv_signal_buffer([[1, 0, 4]]))
        send_queued_batches(messager, sent)
        assert sent == ([] if announced else [("A", 4)]), announced
        assert step.policy.mode == (release.ORDERED if announced else release.UPSTREAM)


class FakeResourceManager:
    """What engine_notices reads of ResourceManagerV1 and its requests."""

    def __init__(self, role, requests):
        self.config = type("Config", (), {"scheduler_config": type("Scheduler", (), {"splitwise_role": role})})()
        self.requests = {request.request_id: request for request in requests}
        self.to_be_aborted_req_id_set = set()


class FakeRequest:
    def __init__(self, request_id, idx, prefill_end_index=0, disaggregate_info=None, prompt_length=4):
        self.request_id, self.idx, self.prefill_end_index = request_id, idx, prefill_end_index
        self.disaggregate_info, self.prompt_token_ids = disaggregate_info, [0] * prompt_length


def test_engine_puts_an_abort_then_a_fence_and_orphans_on_the_prefill_role_only():
    aborted = FakeRequest("A", 3, prefill_end_index=128, disaggregate_info={"role": "decode"})
    unstarted = FakeRequest("B", 4, disaggregate_info={"role": "decode"})
    manager = FakeResourceManager("prefill", [aborted, unstarted])
    assert engine_notices.abort_batches(manager, "A", 1) == []  # not taken for abort yet: nothing is freed
    manager.to_be_aborted_req_id_set |= {"A", "B"}
    abort, fence = engine_notices.abort_batches(manager, "A", 1)
    assert notice.decode(abort[0]) == notice.abort_notice(3, "A", 128)
    assert notice.decode(fence[0]) == notice.fence_notice(1)
    assert notice.decode(engine_notices.abort_batches(manager, "B", 2)[0][0]).value is None  # no chunk launched
    orphan = FakeRequest("O", 5, prompt_length=7)
    assert [notice.decode(item) for item in engine_notices.orphan_batch(manager, [orphan, aborted])] == [
        notice.orphan_notice(5, "O", 7)
    ]
    decode_side = FakeResourceManager("decode", [aborted])
    decode_side.to_be_aborted_req_id_set.add("A")
    assert engine_notices.abort_batches(decode_side, "A", 1) == []
    assert engine_notices.orphan_batch(decode_side, [orphan]) == []
