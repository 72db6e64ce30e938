"""Unit tests that drive the release core directly, event by event, as one rank's two threads would.

Rules 1-7 are those of :mod:`fastdeploy_pd_fix.policy.release` (docstring); the engine's slot lifecycle (aborts,
repeated cache-info parts, slot reuse) is protocol.md's. Rule 7 (send-time binding) is also checked through the
messager step, with the send loop in its own thread.
"""

import itertools
import logging
import queue
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from support.messager import StepMessager
from support.release_events import abort, orphan, reg, run_outcome, sig

from fastdeploy_pd_fix.adapters.messager_step import BoundTaskDict, make_step
from fastdeploy_pd_fix.policy import release
from fastdeploy_pd_fix.policy.decision import (
    ABANDONED,
    ABORT_BEFORE_BOUND,
    CLOSED_AT_ABORT,
    CLOSED_REQUEST,
    COUNTED_BEFORE,
    ORPHAN_COUNTED_BEFORE,
    REGISTERED_REQUEST,
    Decision,
)
from fastdeploy_pd_fix.policy.notice import abort_notice, encode, engine_notice, fence_notice, orphan_notice
from fastdeploy_pd_fix.policy.release import OrderedRelease, Registration, UpstreamRelease, make_release

A0 = Registration(0, "A", 8)  # slot 0, two chunks of 4
B1 = Registration(1, "B", 4)  # slot 1, one chunk
HANDSHAKE_TIMEOUT_S = 10.0  # only reached when a thread is stuck: the test then fails instead of hanging


def run(policy, events):
    """Feed ("sig", tasks) / ("reg", Registration) / ("notice", Notice) events; return all batches and drops in
    release order."""
    outcome = run_outcome(policy, events)
    return outcome["batches"], outcome["drops"]


def merges(signals, registrations):
    """Every merge of the two streams that keeps each stream in its own order (every rank's possible view)."""
    total = len(signals) + len(registrations)
    for positions in itertools.combinations(range(total), len(signals)):
        signal_iter, registration_iter = iter(signals), iter(registrations)
        yield [next(signal_iter) if index in positions else next(registration_iter) for index in range(total)]


def abandoned(outcome):
    """The request ids reported abandoned (rule 4), in order."""
    return [decision.request_id for decision in outcome["decisions"] if decision.kind == ABANDONED]


def repeats(outcome):
    """How many registrations were ignored as counted before (rule 2)."""
    return len([decision for decision in outcome["decisions"] if decision.kind == COUNTED_BEFORE])


def check_every_merge(signals, registrations, batches, bound, abandoned_ids=(), repeated=0):
    """Every merge releases ``batches`` bound to ``bound``, abandons and ignores alike, and leaves no slot open."""
    for events in merges(signals, registrations):
        policy = OrderedRelease()
        outcome = run_outcome(policy, events)
        assert outcome["batches"] == batches, events
        assert outcome["bound"] == bound, events
        assert outcome["drops"] == [], events
        assert abandoned(outcome) == list(abandoned_ids), events
        assert repeats(outcome) == repeated, events
        assert policy.open_registrations() == {} and not policy.has_waiting(), events


SIG_S1 = ("sig", [(0, 0, 4), (1, 0, 4)])
REG_A_S1 = ("reg", Registration(0, "A", 4))
REG_B_S1 = ("reg", B1)


@pytest.mark.parametrize(
    "name, rank0, rank1",
    [
        ("s1 seed", [REG_A_S1, REG_B_S1, SIG_S1], [REG_A_S1, SIG_S1, REG_B_S1]),
        (
            "s2 chunked early",
            [("reg", A0), ("sig", [(0, 0, 4)]), ("sig", [(0, 4, 8)])],
            [("sig", [(0, 0, 4)]), ("sig", [(0, 4, 8)]), ("reg", A0)],
        ),
        (
            "s3 cross-request order",
            [("reg", B1), ("sig", [(0, 0, 4), (1, 0, 4)]), ("reg", A0), ("sig", [(0, 4, 8)])],
            [("reg", B1), ("reg", A0), ("sig", [(0, 0, 4), (1, 0, 4)]), ("sig", [(0, 4, 8)])],
        ),
    ],
)
def test_ordered_releases_the_same_sequence_on_both_ranks(name, rank0, rank1):
    batches0, drops0 = run(OrderedRelease(), rank0)
    batches1, drops1 = run(OrderedRelease(), rank1)
    assert batches0 == batches1, name
    assert drops0 == drops1 == []
    signals = [tuple((slot, end) for slot, _, end in payload) for kind, payload in rank0 if kind == "sig"]
    assert batches0 == signals  # rule 1: one batch per kv signal, the engine's own granularity


@pytest.mark.parametrize(
    "rank0, rank1",
    [
        # s2: latest-per-slot pending collapses two chunk batches into one on the rank whose signals came early.
        (
            [("reg", A0), ("sig", [(0, 0, 4)]), ("sig", [(0, 4, 8)])],
            [("sig", [(0, 0, 4)]), ("sig", [(0, 4, 8)]), ("reg", A0)],
        ),
        # s3: recovery order differs between the ranks.
        (
            [("reg", B1), ("sig", [(0, 0, 4), (1, 0, 4)]), ("reg", A0), ("sig", [(0, 4, 8)])],
            [("reg", B1), ("reg", A0), ("sig", [(0, 0, 4), (1, 0, 4)]), ("sig", [(0, 4, 8)])],
        ),
    ],
)
def test_upstream_mode_diverges_on_s2_and_s3_as_documented(rank0, rank1):
    assert run(UpstreamRelease(), rank0)[0] != run(UpstreamRelease(), rank1)[0]


def test_upstream_mode_fixes_the_seed_case_and_binds_nothing():
    assert run(UpstreamRelease(), [REG_A_S1, REG_B_S1, SIG_S1])[0] == [((0, 4),), ((1, 4),)]
    assert run(UpstreamRelease(), [REG_A_S1, SIG_S1, REG_B_S1])[0] == [((0, 4),), ((1, 4),)]
    assert run_outcome(UpstreamRelease(), [REG_A_S1, REG_B_S1, SIG_S1])["bound"] == []  # the dict at send time


# ---- rule 5: waiting ----


def test_nothing_is_released_before_registration_and_later_signals_wait_behind():
    policy = OrderedRelease()
    assert policy.add_signal([(0, 0, 4)]).batches == []
    assert policy.add_signal([(1, 0, 4)]).batches == []
    assert policy.add_registration(B1).batches == []  # B is registered, but the older signal for A is not
    assert policy.waiting_signals() == [((0, 0, 4),), ((1, 0, 4),)]
    assert policy.add_registration(Registration(0, "A", 4)).batches == [((0, 4),), ((1, 4),)]
    assert policy.waiting_signals() == []


def test_waiting_signals_show_the_whole_head_signal():
    policy = OrderedRelease()
    policy.add_registration(Registration(0, "A", 4))
    policy.add_signal([(0, 0, 4), (1, 0, 4)])  # A is bound, B waits: the head signal still holds both
    assert policy.waiting_signals() == [((0, 0, 4), (1, 0, 4))]


# ---- rule 3: binding by content ----


def test_slot_reuse_binds_each_signal_to_its_own_registration():
    policy = OrderedRelease()
    first, second = Registration(3, "first", 4), Registration(3, "second", 6)
    events = [("sig", [(3, 0, 4)]), ("sig", [(3, 0, 6)]), ("reg", first), ("reg", second)]
    outcome = run_outcome(policy, events)
    assert outcome["batches"] == [((3, 4),), ((3, 6),)] and outcome["drops"] == []
    assert outcome["bound"] == [("first",), ("second",)]
    assert policy.open_registrations() == {}


def test_first_chunk_may_start_at_a_prefix_cached_offset_later_chunks_must_be_contiguous():
    # A's first 4 tokens were prefix-cached: its chunks are [4, 8) and [8, 12).
    check_every_merge(
        [("sig", [(0, 4, 8)]), ("sig", [(0, 8, 12)])], [reg(0, "A", 12)], [((0, 8),), ((0, 12),)], [("A",), ("A",)]
    )
    # A gap ([8, 12) after [0, 4)) does not continue A: A is abandoned and the chunk waits for the slot's next.
    policy = OrderedRelease()
    outcome = run_outcome(policy, [reg(0, "A", 12), ("sig", [(0, 0, 4)]), ("sig", [(0, 8, 12)])])
    assert outcome["batches"] == [((0, 4),)] and abandoned(outcome) == ["A"]
    assert policy.waiting_signals() == [((0, 8, 12),)] and policy.open_registrations() == {}


# ---- rule 4: closing, and abandoning an aborted request ----


def test_abort_between_chunks_then_reuse_abandons_the_aborted_request():
    # A (8 tokens) is aborted after its first chunk; slot 0 goes to B (8 tokens), which starts again at 0.
    check_every_merge(
        [("sig", [(0, 0, 4)]), ("sig", [(0, 0, 4)]), ("sig", [(0, 4, 8)])],
        [reg(0, "A", 8), reg(0, "B", 8)],
        [((0, 4),), ((0, 4),), ((0, 8),)],
        [("A",), ("B",), ("B",)],
        abandoned_ids=["A"],
    )


def test_abort_then_reuse_with_a_shorter_request():
    # A (8) aborted after [0, 4); B needs 2 only: its chunk is judged against B, not against A's need.
    check_every_merge(
        [("sig", [(0, 0, 4)]), ("sig", [(0, 0, 2)])],
        [reg(0, "A", 8), reg(0, "B", 2)],
        [((0, 4),), ((0, 2),)],
        [("A",), ("B",)],
        abandoned_ids=["A"],
    )


def test_issue_case_abort_then_three_requests_on_the_slot():
    # The issue's measured case: A (256) on slot 3, first chunk released, A aborted; B (64), C (256, two chunks)
    # and D (64) register on slot 3 in turn. Before: B's and D's tasks dropped, C's bound to A, the slot wedged.
    check_every_merge(
        [
            ("sig", [(3, 0, 128)]),
            ("sig", [(3, 0, 64)]),
            ("sig", [(3, 0, 128)]),
            ("sig", [(3, 128, 256)]),
            ("sig", [(3, 0, 64)]),
        ],
        [reg(3, "A", 256), reg(3, "B", 64), reg(3, "C", 256), reg(3, "D", 64)],
        [((3, 128),), ((3, 64),), ((3, 128),), ((3, 256),), ((3, 64),)],
        [("A",), ("B",), ("C",), ("C",), ("D",)],
        abandoned_ids=["A"],
    )


def test_duplicate_or_shrinking_chunk_abandons_the_request_and_waits_for_the_slot_next():
    # Old rule 4 dropped a chunk that did not advance; now a chunk that does not continue a started request means
    # that request was aborted (new rule 4): it is abandoned, reported, and the chunk waits for the next occupant.
    for repeated_chunk in [(0, 0, 4), (0, 0, 2)]:
        policy = OrderedRelease()
        outcome = run_outcome(policy, [("reg", A0), ("sig", [(0, 0, 4)]), ("sig", [repeated_chunk])])
        assert outcome["batches"] == [((0, 4),)] and outcome["drops"] == []
        abandoned_a = Decision(
            ABANDONED, "A", 0, repeated_chunk[1:], last_end=4, run_end=8, occupant=REGISTERED_REQUEST
        )
        assert outcome["decisions"] == [abandoned_a]
        assert policy.waiting_signals() == [(repeated_chunk,)]
        assert policy.add_registration(Registration(0, "B", 4)).batches == [((0, repeated_chunk[2]),)]


# ---- rule 2: a request id counts once ----


def test_repeated_registration_of_an_open_request_is_ignored():
    policy = OrderedRelease()
    assert policy.add_registration(Registration(0, "A", 4)).decisions == []
    repeated = policy.add_registration(Registration(0, "A", 4))
    assert repeated.decisions == [Decision(COUNTED_BEFORE, "A", 0, occupant=REGISTERED_REQUEST)]
    policy.add_registration(Registration(0, "B", 8))
    batches, drops = run(policy, [("sig", [(0, 0, 4)]), ("sig", [(0, 0, 6)]), ("sig", [(0, 6, 8)])])
    assert batches == [((0, 4),), ((0, 6),), ((0, 8),)] and drops == []  # B is judged against B, not a stale A


@pytest.mark.parametrize("late", [False, True], ids=["immediate", "late"])
def test_repeated_d_part_after_an_abort_is_not_a_new_request(late):
    # A (8) is aborted after [0, 4); its D-part arrives twice: right after the first, or after B took the slot.
    # Either way the repeat is ignored (rule 2): before, a late repeat was counted and wedged the slot.
    registrations = [reg(0, "A", 8), reg(0, "B", 8), reg(0, "A", 8)] if late else [reg(0, "A", 8)] * 2
    registrations += [] if late else [reg(0, "B", 8)]
    check_every_merge(
        [("sig", [(0, 0, 4)]), ("sig", [(0, 0, 4)]), ("sig", [(0, 4, 8)])],
        registrations,
        [((0, 4),), ((0, 4),), ((0, 8),)],
        [("A",), ("B",), ("B",)],
        abandoned_ids=["A"],
        repeated=1,
    )


def test_closed_request_ids_are_remembered_in_a_bounded_fifo(monkeypatch):
    monkeypatch.setattr(release, "CLOSED_IDS_KEPT", 2)
    policy = OrderedRelease()
    for request_id in ("A", "B", "C"):
        run(policy, [("reg", Registration(0, request_id, 4)), ("sig", [(0, 0, 4)])])
    for request_id in ("C", "B"):
        repeated = policy.add_registration(Registration(0, request_id, 4))
        assert repeated.decisions == [Decision(COUNTED_BEFORE, request_id, 0, occupant=CLOSED_REQUEST)]
    assert policy.add_registration(Registration(0, "A", 4)).decisions == []  # forgotten: counted as a new request
    assert policy.open_registrations() == {0: ["A"]}


# ---- rule 6: dropping ----


def test_never_registering_task_is_judged_against_its_slots_next_registration():
    # "lost" ran in slot 5 (10 tokens) and never registered; slot 5 then went to "next" (4 tokens).
    events = [
        ("sig", [(5, 0, 10)]),
        ("sig", [(2, 0, 3)]),
        ("sig", [(5, 0, 4)]),
        ("reg", Registration(2, "other", 3)),
        ("reg", Registration(5, "next", 4)),
    ]
    batches, drops = run(OrderedRelease(), events)
    assert [(d.slot, d.prefilled_token_num) for d in drops] == [(5, 10)]
    assert "chunk [0, 10) does not fit request next, which needs 4 tokens" in drops[0].reason
    assert batches == [((2, 3),), ((5, 4),)]


def test_signal_keeps_its_valid_tasks_when_one_is_dropped():
    events = [("reg", Registration(0, "A", 4)), ("reg", B1), ("sig", [(0, 0, 9), (1, 0, 4)])]
    batches, drops = run(OrderedRelease(), events)
    assert batches == [((1, 4),)] and [d.slot for d in drops] == [0]


def test_task_that_fits_neither_the_aborted_request_nor_the_next_is_dropped_after_abandoning():
    policy = OrderedRelease()
    outcome = run_outcome(policy, [reg(0, "A", 8), reg(0, "B", 4), ("sig", [(0, 0, 4)]), ("sig", [(0, 0, 6)])])
    assert outcome["batches"] == [((0, 4),)] and abandoned(outcome) == ["A"]
    assert [(d.slot, d.prefilled_token_num) for d in outcome["drops"]] == [(0, 6)]
    assert policy.open_registrations() == {0: ["B"]}  # B has not started: its own chunk still binds


# ---- rule 7: send-time binding ----


def test_bindings_are_parallel_to_batches_and_carry_the_stored_task():
    policy = OrderedRelease()
    _, registration_a = reg(0, "A", 4)
    _, registration_b = reg(1, "B", 4)
    policy.add_registration(registration_a)
    policy.add_registration(registration_b)
    released = policy.add_signal([(0, 0, 4), (1, 0, 4)])
    assert released.batches == [((0, 4), (1, 4))]
    assert [[item.task for item in binding] for binding in released.bindings] == [
        [registration_a.task, registration_b.task]
    ]


def signal(slot, offset, end):
    """A kv signal buffer of one layer-0 task ``[offset, end)`` (a list: the step reads it through numpy)."""
    return [1, 0, slot, offset, end - offset]


def task(slot, request_id, need):
    return {"current_id": slot, "request_id": request_id, "need_prefill_tokens": need}


class SendLoop:
    """The send thread: takes each batch, reads each slot's task, deletes it after the request's final chunk.

    ``pause_after_get`` holds it after taking batch ``n`` until :attr:`resume` is set, so that the test can store
    a registration while the send thread holds a batch. ``parallel``: each slot is read and cleaned up in a worker
    thread of the send loop's own pool, as develop's parallel send (#7931) does."""

    def __init__(self, messager, batches: int, pause_after_get=None, parallel=False):
        self.messager, self.batches, self.pause_after_get = messager, batches, pause_after_get
        self.parallel = parallel
        self.holding, self.resume = threading.Event(), threading.Event()
        self.sent, self.error = [], None
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        try:
            for number in range(self.batches):
                batch = self.messager.cache_prefilled_engine_ids_queue.get(timeout=HANDSHAKE_TIMEOUT_S)
                if number == self.pause_after_get:
                    self.holding.set()
                    assert self.resume.wait(HANDSHAKE_TIMEOUT_S), "never resumed"
                if not self.parallel:
                    for slot, prefilled_token_num in batch:
                        self.send(slot, prefilled_token_num)
                    continue
                with ThreadPoolExecutor(max_workers=2) as pool:
                    for future in [pool.submit(self.send, *task) for task in batch]:
                        future.result(HANDSHAKE_TIMEOUT_S)
        except BaseException as error:  # reported by finish(): the test fails instead of hanging
            self.error = error

    def send(self, slot, prefilled_token_num):
        stored = self.messager.idx_cache_task_dict[slot]
        self.sent.append((stored["request_id"], slot, prefilled_token_num))
        if prefilled_token_num == stored["need_prefill_tokens"]:
            del self.messager.idx_cache_task_dict[slot]

    def finish(self):
        self.thread.join(HANDSHAKE_TIMEOUT_S)
        assert not self.thread.is_alive() and self.error is None, self.error
        return self.sent


def attached_step(messager):
    step = make_step(messager, "ordered", logging.getLogger("test_release.messager"), "test: ")
    step.attach()
    assert isinstance(messager.idx_cache_task_dict, BoundTaskDict)
    return step


@pytest.mark.parametrize("parallel", [False, True], ids=["send thread", "send loop's worker threads"])
@pytest.mark.parametrize("b_registers", ["before the send thread takes A's batch", "while it holds A's batch"])
def test_abort_after_final_signal_send_reads_each_batch_own_task(b_registers, parallel):
    # A's final chunk signal is in, A's batch is queued, A is aborted and slot 3 goes to B, whose registration
    # overwrites idx_cache_task_dict[3] before A's batch is sent. Read at send time, the dict gave B's blocks for
    # A's batch, and the cleanup after it deleted B's entry.
    messager = StepMessager()
    step = attached_step(messager)
    sender = SendLoop(
        messager, batches=2, pause_after_get=0 if b_registers.startswith("while") else None, parallel=parallel
    )
    messager.idx_cache_task_dict[3] = task(3, "A", 4)
    assert step.handle_buffer(signal(3, 0, 4))
    if sender.pause_after_get is None:
        messager.idx_cache_task_dict[3] = task(3, "B", 4)
        sender.thread.start()
    else:
        sender.thread.start()
        assert sender.holding.wait(HANDSHAKE_TIMEOUT_S), "the send thread did not take A's batch"
        messager.idx_cache_task_dict[3] = task(3, "B", 4)
        sender.resume.set()
    assert step.handle_buffer(signal(3, 0, 4))
    assert sender.finish() == [("A", 3, 4), ("B", 3, 4)]
    assert dict(messager.idx_cache_task_dict) == {}  # A's del left B's entry; B's own del removed it


def test_del_after_an_aborted_request_send_leaves_the_next_entry():
    messager = StepMessager()
    step = attached_step(messager)
    messager.idx_cache_task_dict[3] = task(3, "A", 4)
    step.handle_buffer(signal(3, 0, 4))
    messager.idx_cache_task_dict[3] = task(3, "B", 8)  # B registered, its batch not yet signalled
    sender = SendLoop(messager, batches=1)
    sender.thread.start()
    assert sender.finish() == [("A", 3, 4)]
    assert dict(messager.idx_cache_task_dict) == {3: task(3, "B", 8)}


def test_registration_and_consume_threads_read_the_dict_as_it_is_while_the_send_loop_holds_a_batch():
    # The send loop (any thread of it) reads a held batch's own task; the registration thread, which stores, and
    # the consume thread, which counts early signals, must see what the dict holds.
    messager = StepMessager()
    step = attached_step(messager)
    seen = {}

    def in_thread(name, work):
        thread = threading.Thread(target=lambda: seen.__setitem__(name, work()), daemon=True)
        thread.start()
        thread.join(HANDSHAKE_TIMEOUT_S)
        assert not thread.is_alive(), f"{name} stuck"

    def register_then_read(request_id):
        messager.idx_cache_task_dict[3] = task(3, request_id, 4)
        return messager.idx_cache_task_dict[3]["request_id"]

    in_thread("registration A", lambda: register_then_read("A"))
    in_thread("consume A", lambda: step.handle_buffer(signal(3, 0, 4)))
    sender = SendLoop(messager, batches=1, pause_after_get=0, parallel=True)
    sender.thread.start()
    assert sender.holding.wait(HANDSHAKE_TIMEOUT_S), "the send thread did not take A's batch"
    in_thread("registration B", lambda: register_then_read("B"))  # A aborted, B on its slot
    in_thread("consume B", lambda: (step.handle_buffer(signal(3, 0, 2)), step.early_layer0_signals)[1])
    sender.resume.set()
    assert sender.finish() == [("A", 3, 4)]
    assert seen["registration B"] == "B"
    assert seen["consume B"] == 0  # slot 3 holds B's registration: not an early signal
    assert dict(messager.idx_cache_task_dict) == {3: task(3, "B", 4)}


def test_batches_taken_before_attach_do_not_shift_later_bindings():
    # In FastDeploy the send thread is already blocked in get() when the first registration attaches the step:
    # that get is not wrapped, so its batch is read from the dict as it is; every later batch is still bound.
    entered = threading.Event()

    class SignallingQueue(queue.Queue):
        def get(self, *args, **kwargs):
            entered.set()
            return super().get(*args, **kwargs)

    messager = StepMessager()
    messager.cache_prefilled_engine_ids_queue = SignallingQueue()
    sender = SendLoop(messager, batches=3, pause_after_get=0)
    sender.thread.start()
    assert entered.wait(HANDSHAKE_TIMEOUT_S), "the send thread did not block in get"
    step = attached_step(messager)
    messager.idx_cache_task_dict[3] = task(3, "A", 4)
    step.handle_buffer(signal(3, 0, 4))  # taken by the get that started before attach
    assert sender.holding.wait(HANDSHAKE_TIMEOUT_S)
    messager.idx_cache_task_dict[5] = task(5, "C", 4)
    step.handle_buffer(signal(5, 0, 4))
    messager.idx_cache_task_dict[5] = task(5, "D", 4)  # C aborted after its final signal, D took slot 5
    step.handle_buffer(signal(5, 0, 4))
    sender.resume.set()
    assert sender.finish() == [("A", 3, 4), ("C", 5, 4), ("D", 5, 4)]


# ---- malformed input ----


@pytest.mark.parametrize(
    "tasks",
    [
        [(-1, 0, 4)],
        [(0, 0, -4)],
        [(0, 0, "4")],
        [(True, 0, 4)],
        [5],
        [(0, 4)],  # a (slot, prefilled_token_num) pair: signals carry the chunk's offset too
        [(0, 4, 4)],  # an empty chunk
        [(0, 6, 4)],  # a chunk that ends before it starts
        [(0, -2, 4)],
    ],
)
def test_malformed_tasks_raise_and_leave_state_untouched(tasks):
    policy = OrderedRelease()
    with pytest.raises(ValueError):
        policy.add_signal(tasks)
    assert policy.waiting_signals() == []
    assert policy.add_signal([(0, 0, 4)]).batches == []


@pytest.mark.parametrize("slot, need", [(-1, 4), (0, 0), (0, -3), (0, None)])
def test_malformed_registration_is_rejected(slot, need):
    with pytest.raises(ValueError):
        Registration(slot, "X", need)


def test_make_release_rejects_unknown_mode():
    assert make_release("ordered").mode == "ordered" and make_release("upstream").mode == "upstream"
    with pytest.raises(ValueError, match="unknown release mode"):
        make_release("fast")


def test_send_of_an_aborted_request_keeps_the_next_request_progress():
    # Real releases reset a slot's progress after sending its request's final chunk (engine_cache_tasks[slot] =
    # dict()). A aborted after its final signal, B's first signal already in on slot 3: the reset after A's send
    # would wipe B's progress and B's batch would fail for ever. The reset of a superseded slot is skipped.
    messager = StepMessager()
    step = attached_step(messager)
    messager.idx_cache_task_dict[3] = task(3, "A", 4)
    step.handle_buffer(signal(3, 0, 4))  # A's batch queued
    step.handle_buffer(signal(3, 0, 2))  # B's first chunk: waits for B's registration, its progress is recorded
    batch = messager.cache_prefilled_engine_ids_queue.get(timeout=HANDSHAKE_TIMEOUT_S)
    assert batch == [(3, 4)]
    messager.engine_cache_tasks[3] = dict()  # the send loop's cleanup after A's final chunk
    assert messager.engine_cache_tasks[3]["prefilled_token_num"] == 2, "B's progress was wiped"
    messager.engine_cache_tasks[5] = dict()  # another slot, nothing newer there: reset as usual
    assert messager.engine_cache_tasks[5] == {}


def test_send_of_a_request_resets_its_slot_when_nothing_newer_arrived():
    messager = StepMessager()
    step = attached_step(messager)
    messager.idx_cache_task_dict[3] = task(3, "A", 4)
    step.handle_buffer(signal(3, 0, 4))
    messager.cache_prefilled_engine_ids_queue.get(timeout=HANDSHAKE_TIMEOUT_S)
    messager.engine_cache_tasks[3] = dict()
    assert messager.engine_cache_tasks[3] == {}


# -- engine notices (rule 8): the cases the two streams alone cannot decide (design doc section 4) ---------------


@pytest.mark.parametrize("with_notice", [True, False])
def test_abort_before_the_first_signal_then_reuse(with_notice):
    notices = [abort(0, "A", None), ("notice", fence_notice(1))] if with_notice else []
    outcome = run_outcome(OrderedRelease(), [reg(0, "A", 4)] + notices + [reg(0, "B", 4), sig((0, 0, 4))])
    # without the notice, B's only chunk is the same triple A's would be: it goes to A (the documented limit)
    assert outcome["bound"] == [("B",) if with_notice else ("A",)]


@pytest.mark.parametrize("with_notice", [True, False])
def test_next_request_starting_where_the_aborted_one_stopped(with_notice):
    events = [reg(0, "A", 4), sig((0, 0, 2))] + ([abort(0, "A", 2)] if with_notice else [])
    outcome = run_outcome(OrderedRelease(), events + [reg(0, "B", 4), sig((0, 2, 4))])
    assert outcome["batches"] == [((0, 2),), ((0, 4),)]
    assert outcome["bound"] == [("A",), ("B",) if with_notice else ("A",)]


def test_orphan_chunks_are_dropped_and_the_next_request_gets_its_own():
    events = [orphan(0, "O", 4), sig((0, 0, 4)), reg(0, "B", 4), sig((0, 0, 4))]
    outcome = run_outcome(OrderedRelease(), events)
    assert outcome["bound"] == [("B",)]
    assert [drop.reason for drop in outcome["drops"]] == ["chunk [0, 4) belongs to orphan O"]


def test_orphan_whose_slot_is_not_reused_holds_nothing_behind_it():
    policy = OrderedRelease()
    outcome = run_outcome(policy, [orphan(0, "O", 4), sig((0, 0, 4)), reg(1, "A", 4), sig((1, 0, 4))])
    assert outcome["bound"] == [("A",)]
    assert not policy.has_waiting() and policy.open_registrations() == {}


def test_aborted_request_whose_d_part_comes_late_is_dead_and_its_registration_ignored():
    events = [abort(0, "A", 2), sig((0, 0, 2)), reg(0, "B", 4), reg(0, "A", 4), sig((0, 0, 4))]
    outcome = run_outcome(OrderedRelease(), events)
    assert outcome["bound"] == [("B",)]
    assert "aborted before registering" in outcome["drops"][0].reason
    assert Decision(COUNTED_BEFORE, "A", 0, occupant=CLOSED_REQUEST) in outcome["decisions"]


def test_aborted_request_that_never_registers_does_not_take_the_next_request_chunk():
    outcome = run_outcome(OrderedRelease(), [abort(0, "A", 4), sig((0, 0, 4)), reg(0, "B", 4), sig((0, 0, 4))])
    assert outcome["bound"] == [("B",)]


def test_abort_after_the_final_chunk_was_released_changes_nothing():
    policy = OrderedRelease()
    outcome = run_outcome(policy, [reg(0, "A", 4), sig((0, 0, 4)), abort(0, "A", 4), reg(0, "B", 4), sig((0, 0, 4))])
    assert outcome["bound"] == [("A",), ("B",)] and outcome["decisions"] == []


def test_issue_abcd_with_notices_sends_each_request_its_own_chunks():
    events = [reg(3, "A", 256), sig((3, 0, 128)), abort(3, "A", 128)]
    events += [reg(3, "B", 64), sig((3, 0, 64)), reg(3, "C", 128), sig((3, 0, 64)), sig((3, 64, 128))]
    events += [reg(3, "D", 32), sig((3, 0, 32))]
    policy = OrderedRelease()
    outcome = run_outcome(policy, events)
    assert outcome["bound"] == [("A",), ("B",), ("C",), ("C",), ("D",)]
    assert outcome["drops"] == [] and policy.open_registrations() == {}


def test_chunk_beyond_an_aborted_request_emitted_end_goes_to_the_next_request():
    # emitted_end says 4, but the engine emitted only [0, 2): B's chunk does not continue A, so A closes (logged)
    events = [reg(0, "A", 8), sig((0, 0, 2)), abort(0, "A", 4), reg(0, "B", 4), sig((0, 0, 4))]
    outcome = run_outcome(OrderedRelease(), events)
    assert outcome["bound"] == [("A",), ("B",)]
    closed = Decision(CLOSED_AT_ABORT, "A", 0, (0, 4), last_end=2, run_end=4, occupant=REGISTERED_REQUEST)
    assert outcome["decisions"] == [closed]


def test_repeated_and_contradicting_notices_are_reported_not_applied():
    policy = OrderedRelease()
    events = [reg(0, "A", 8), sig((0, 0, 4)), abort(0, "A", 2), orphan(0, "A", 8), abort(0, "A", 8)]
    outcome = run_outcome(policy, events + [reg(0, "B", 4), sig((0, 0, 4))])
    assert outcome["bound"] == [("A",), ("B",)]
    assert outcome["decisions"] == [
        Decision(ABORT_BEFORE_BOUND, "A", last_end=4, run_end=2),
        Decision(ORPHAN_COUNTED_BEFORE, "A"),
    ]


def test_upstream_ignores_notices():
    policy = UpstreamRelease()
    for notice in (abort_notice(0, "A", None), fence_notice(1), orphan_notice(0, "O", 4)):
        assert policy.add_notice(notice, {}) == release.Released()


class CacheInfoReads:
    """An ``engine_worker_queue`` client whose ``get_cache_info`` returns the scripted reads in turn."""

    def __init__(self, reads):
        self.reads = list(reads)

    def get_cache_info(self):
        return self.reads.pop(0) if self.reads else []


def test_attached_step_takes_notices_out_of_cache_info_reads(caplog):
    messager = StepMessager()
    part = {"request_id": "B", "current_id": 0}
    malformed = {"fastdeploy_pd_fix_notice": 99, "kind": "abort"}
    messager.engine_worker_queue = CacheInfoReads(
        [[encode(abort_notice(0, "A", None)), encode(fence_notice(1))], [part, malformed]]
    )
    step = attached_step(messager)
    step.handle_registration(0, task(0, "A", 4))
    with caplog.at_level(logging.INFO):
        assert messager.engine_worker_queue.get_cache_info() == []  # notices only: an empty read on every rank
        assert messager.engine_worker_queue.get_cache_info() == [part]
    assert "engine notice: abort of request A on slot 0 (emitted_end=None)" in caplog.text
    assert "notice format version 99" in caplog.text
    messager.idx_cache_task_dict[0] = task(0, "B", 4)
    step.handle_buffer(signal(0, 0, 4))
    assert messager.cache_prefilled_engine_ids_queue.get_nowait() == [(0, 4)]
    assert step.policy.open_registrations() == {}  # A was closed by its abort, B by its chunk


def test_the_first_read_keeps_the_policy_when_announced_or_not_ordered():
    ordered, upstream = OrderedRelease(), UpstreamRelease()
    ordered.add_signal([(3, 0, 4)])
    assert release.policy_after_first_read(ordered, True, {}) == (ordered, release.Released())
    assert release.policy_after_first_read(upstream, False, {}) == (upstream, release.Released())


def test_the_first_read_without_announcement_hands_ordered_over_to_upstream():
    """Rule 10: the signals that came first go to upstream's pending buffer in their order (latest per slot)."""
    ordered = OrderedRelease()
    for tasks in ([(3, 0, 4)], [(1, 0, 2)], [(1, 2, 4)]):
        ordered.add_signal(tasks)
    successor, released = release.policy_after_first_read(ordered, False, {})
    assert isinstance(successor, UpstreamRelease) and released == release.Released()
    assert successor.waiting_signals() == [((3, 0, 4),), ((1, 2, 4),)]
    assert successor.add_registration(B1, {1: 4}).batches == [((1, 4),)]  # slot 3's orphan-like signal holds nothing


def test_the_first_read_comes_before_any_registration():
    ordered = OrderedRelease()
    ordered.add_registration(A0)
    with pytest.raises(ValueError, match="call it at the first read"):
        release.policy_after_first_read(ordered, False, {})


@pytest.mark.parametrize("announced", [True, False])
def test_attached_step_learns_at_the_first_read_whether_notices_are_on(caplog, announced):
    """An unregistered signal on slot 3 (an orphan's, or an early one: the streams cannot tell) then A on slot 1.
    Announced: ordered keeps A behind slot 3's signal (the notices will say). Not announced: upstream's rule sends
    A."""
    messager = StepMessager()
    part = {"request_id": "A", "current_id": 1}
    first = [encode(engine_notice("unit test")), part] if announced else [part]
    messager.engine_worker_queue = CacheInfoReads([first])
    step = attached_step(messager)
    step.handle_buffer(signal(3, 0, 4))
    with caplog.at_level(logging.INFO):
        assert messager.engine_worker_queue.get_cache_info() == [part]
    messager.idx_cache_task_dict[1] = task(1, "A", 4)
    step.handle_buffer(signal(1, 0, 4))
    if announced:
        assert step.policy.mode == "ordered" and messager.cache_prefilled_engine_ids_queue.empty()
        assert "engine notices: on (engine notices announced by unit test" in caplog.text
    else:
        assert step.policy.mode == "upstream" and messager.cache_prefilled_engine_ids_queue.get_nowait() == [(1, 4)]
        assert "engine notices: OFF" in caplog.text and "release goes on by upstream's rule (#8034)" in caplog.text


def test_layer0_task_before_its_registration_is_logged_as_early(caplog):
    messager = StepMessager()
    step = attached_step(messager)
    with caplog.at_level(logging.INFO):
        step.handle_buffer(signal(1, 0, 4))
        messager.idx_cache_task_dict[1] = task(1, "A", 8)
        step.handle_buffer(signal(1, 4, 8))
    assert step.early_layer0_signals == 1
    assert "early layer-0 signal #1: slot 1 chunk [0, 4) arrived before its registration" in caplog.text
