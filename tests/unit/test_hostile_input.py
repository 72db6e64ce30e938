"""Hostile input: the kv signal parser and the patched messager loops fed malformed signals and registrations.

Protocol invariant 4: malformed input is logged and dropped, the threads never die. Two layers are fuzzed with
hypothesis (derandomized, bounded budget):

* the parser, with arbitrary int32 buffers, against a plain restatement of the buffer layout;
* the patched ``consume_signals`` loop and the observed registration loop end to end, in process, on a
  ``CacheMessagerV1``-shaped fixture class (as in ``tests/unit/test_patching.py``). Both loops run in their own thread;
  a handshake hands out one merged script of events, each only after the previous one was processed, so every
  interleaving is forced, never left to timing. The queued batches must be exactly what ``OrderedRelease`` gives
  on the valid parts of the two streams, and every malformed item and every request the release abandons (a
  chunk that does not continue it, as after an abort or a duplicated signal) must leave a log line with its reason.
"""

from __future__ import annotations

import copy
import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
import paddle  # noqa: F401  imported in the main thread first, as the cache messager does (see run_loops)
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from support.release_events import logged_decisions

from fastdeploy_pd_fix.engine_history.occupancy import Occupancy, prefill_request
from fastdeploy_pd_fix.plugin.messager.patch import patch_class, unpatch_class
from fastdeploy_pd_fix.policy import notice
from fastdeploy_pd_fix.policy.decision import ABANDONED, COUNTED_BEFORE, REGISTERED_REQUEST, Decision
from fastdeploy_pd_fix.policy.kv_signal import KV_SIGNAL_LENGTH, MAX_TASKS, parse_kv_signal
from fastdeploy_pd_fix.policy.release import OrderedRelease, Registration

logger = logging.getLogger("test_hostile_input.messager")  # the plugin logs into the target module's `logger`

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
NUM_SLOTS = 4  # engine_cache_tasks of the fixture: slots 0..3 are valid, and requests often share one
HANDSHAKE_TIMEOUT_S = 30.0  # only reached when a loop died: the test then fails instead of hanging

PARSER_SETTINGS = settings(max_examples=400, deadline=None, derandomize=True, database=None)
LOOP_SETTINGS = settings(
    max_examples=500,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


# ---------------------------------------------------------------------------------------------------------------
# The buffer layout, restated plainly (the specification the parser is checked against)
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class ExpectedSignal:
    """What a buffer must parse to: ``kind`` is "none" (no signal), "rejected" (whole signal) or "signal"."""

    kind: str
    layer: int = 0
    reason: str = ""  # for "rejected": a substring of the one problem line
    tasks: List[Tuple[int, int, int]] = field(default_factory=list)  # (slot, chunk_offset, prefilled_token_num)
    dropped: List[Tuple[int, int, int, int]] = field(default_factory=list)  # (index, slot, offset, length)


def expected_parse(values, num_slots: int) -> ExpectedSignal:
    values = [int(value) for value in np.asarray(values).reshape(-1)]
    if len(values) < 2:
        return ExpectedSignal("rejected", reason=f"buffer has {len(values)} entries")
    count, layer = values[0], values[1]
    if count == -1:
        return ExpectedSignal("none")
    capacity = min(MAX_TASKS, (len(values) - 2) // 3)
    if count < 0 or count > capacity:
        return ExpectedSignal("rejected", layer, reason=f"tasks_count {count} out of range [0, {capacity}]")
    if layer < 0:
        return ExpectedSignal("rejected", layer, reason=f"layer {layer} is negative")
    expected = ExpectedSignal("signal", layer)
    for index in range(count):
        slot, offset, length = values[2 + 3 * index : 5 + 3 * index]
        if 0 <= slot < num_slots and offset >= 0 and length > 0:
            expected.tasks.append((slot, offset, offset + length))
        else:
            expected.dropped.append((index, slot, offset, length))
    return expected


def check_parse(values, num_slots: int) -> None:
    parsed = parse_kv_signal(values, num_slots=num_slots)  # must not raise, whatever the buffer holds
    expected = expected_parse(values, num_slots)
    if expected.kind == "none":
        assert parsed.signal is None and parsed.problems == []
    elif expected.kind == "rejected":
        assert parsed.signal is None and len(parsed.problems) == 1 and expected.reason in parsed.problems[0]
    else:
        assert parsed.signal is not None and parsed.signal.layer == expected.layer
        assert list(parsed.signal.tasks) == expected.tasks
        assert all(type(value) is int for task in parsed.signal.tasks for value in task)
        assert len(parsed.problems) == len(expected.dropped)  # one problem line per dropped task
        for problem, (index, slot, _, _) in zip(parsed.problems, expected.dropped):
            assert f"task {index} dropped: slot {slot} " in problem


# ---------------------------------------------------------------------------------------------------------------
# 1a. the parser
# ---------------------------------------------------------------------------------------------------------------

EXTREMES = st.sampled_from([INT32_MIN, -2, -1, 0, 1, MAX_TASKS - 1, MAX_TASKS, MAX_TASKS + 1, INT32_MAX])


def small_or_extreme(low: int, high: int):
    return st.one_of(st.integers(low, high), EXTREMES)


@st.composite
def structured_buffers(draw):
    """Buffers shaped like kv signals: a header, some triples, a tail of arbitrary values, any total length."""
    triples = draw(
        st.lists(st.tuples(small_or_extreme(-2, 6), small_or_extreme(-3, 40), small_or_extreme(-3, 40)), max_size=12)
    )
    count = draw(
        st.one_of(
            st.just(len(triples)),
            st.integers(-3, len(triples) + 3),
            st.sampled_from([-1, MAX_TASKS, MAX_TASKS + 1, INT32_MAX, INT32_MIN]),
        )
    )
    head = [count, draw(small_or_extreme(-2, 70))] + [value for triple in triples for value in triple]
    length = draw(
        st.one_of(
            st.just(len(head)),
            st.integers(0, len(head) + 4),
            st.sampled_from([KV_SIGNAL_LENGTH - 1, KV_SIGNAL_LENGTH, KV_SIGNAL_LENGTH + 5]),
        )
    )
    fill = draw(st.one_of(st.just(-1), st.integers(INT32_MIN, INT32_MAX)))
    values = np.full(length, fill, dtype=np.int32)
    values[: min(length, len(head))] = head[:length]
    return values


RAW_BUFFERS = arrays(
    np.int32, st.integers(0, 3 * 16 + 2), elements=st.integers(INT32_MIN, INT32_MAX) | st.integers(-2, 8)
)


@PARSER_SETTINGS
@given(values=st.one_of(structured_buffers(), RAW_BUFFERS), num_slots=st.sampled_from([1, NUM_SLOTS, MAX_TASKS]))
def test_parser_never_raises_and_keeps_exactly_the_valid_tasks_in_order(values, num_slots):
    check_parse(values, num_slots)


@PARSER_SETTINGS
@given(count=st.integers(MAX_TASKS - 2, MAX_TASKS), slot=st.integers(-1, MAX_TASKS))
def test_parser_full_buffers(count, slot):
    values = np.full(KV_SIGNAL_LENGTH, 3, dtype=np.int32)  # every triple (3, 3, 3): valid
    values[0], values[1] = count, 0
    values[2 + 3 * (count // 2)] = slot
    check_parse(values, MAX_TASKS)


# ---------------------------------------------------------------------------------------------------------------
# 1b. the patched loops, end to end in process
# ---------------------------------------------------------------------------------------------------------------


class StopLoop(BaseException):
    """Ends an otherwise endless loop when its part of the script is over (BaseException: loops survive Exception)."""


class ScriptStuck(BaseException):
    """A handshake waited too long: a loop died or stopped asking for events."""


class Turns:
    """Hands out one merged script of kv-signal reads ("sig") and registration reads ("reg") to the two loops.

    Event k is handed out only when its reader asks for it and the reader of event k-1 has come back for more,
    i.e. has finished processing it. A reader whose kind has no events left gets :class:`StopLoop`.
    """

    def __init__(self, kinds: List[str], events: Dict[str, list]):
        self.kinds = kinds
        self.events = {kind: list(items) for kind, items in events.items()}
        self.condition = threading.Condition()
        self.position = 0
        self.handed_out: Optional[str] = None  # kind of the event handed out and not yet acknowledged
        self.calls = {"sig": 0, "reg": 0}
        self.trace: List[tuple] = []  # what the loops did, in processing order

    def take(self, kind: str):
        with self.condition:
            self.calls[kind] += 1
            if self.handed_out == kind:
                self.handed_out = None  # the reader came back: it is done with its previous event
                self.position += 1
                self.condition.notify_all()
            if not self.condition.wait_for(lambda: self._ready(kind), timeout=HANDSHAKE_TIMEOUT_S):
                raise ScriptStuck(f"{kind} reader waited {HANDSHAKE_TIMEOUT_S}s at event {self.position}")
            if kind not in self.kinds[self.position :]:
                raise StopLoop
            self.handed_out = kind
            event = self.events[kind].pop(0)
            self.trace.append((kind, event))
            return copy.deepcopy(event)

    def _ready(self, kind: str) -> bool:
        if kind not in self.kinds[self.position :]:
            return True
        return self.handed_out is None and self.kinds[self.position] == kind


TURNS: Optional[Turns] = None  # the running example's script


def get_output_kv_signal(buffer, *args):
    """The fake op: the next scripted buffer (or error) once it is this reader's turn."""
    event = TURNS.take("sig")
    if isinstance(event, Exception):
        raise event
    buffer.set_value(event)


class FakeEngineWorkerQueue:
    """The mailbox of an engine whose engine side is on: its first batch starts with the announcement (rule 10)."""

    def __init__(self):
        self.announced = False

    def get_cache_info(self):
        items = TURNS.take("reg")
        if isinstance(items, list) and items and not self.announced:
            self.announced = True
            items = [notice.encode(notice.engine_notice("hostile-input fixture"))] + items
        return items


class HostileMessager:
    """CacheMessagerV1's attributes and loop shapes (protocol.md); its registration loop validates nothing."""

    def __init__(self):
        self.engine_cache_task_thread_lock = threading.Lock()
        self.engine_cache_tasks = [dict() for _ in range(NUM_SLOTS)]
        self.idx_cache_task_dict = {}
        self.cache_prefilled_engine_ids_queue = queue.Queue()
        self.cache_info = {}
        self.engine_worker_queue = FakeEngineWorkerQueue()
        self.rank, self.rank_id = 0, 0

    def consume_signals(self):
        get_output_kv_signal(None, self.rank_id, 0)

    def _add_cache_task_thread(self):
        while True:
            try:
                cache_info = self.engine_worker_queue.get_cache_info()
                if not cache_info:
                    continue
                for info in cache_info:
                    request_id = info["request_id"]
                    if request_id not in self.cache_info:
                        self.cache_info[request_id] = dict(info)  # the first of the request's two parts
                        continue
                    task = {**self.cache_info[request_id], **info}  # a later part completes (again) the task
                    self.cache_info[request_id] = task
                    self.idx_cache_task_dict[task.get("current_id")] = task
                    TURNS.trace.append(("store", task.get("current_id"), request_id))
            except Exception:
                logger.exception("fixture registration loop: read failed")


# ---- the script generator ----


GOOD_NEED_FORMS = (int, np.int64, float)  # all stand for the same integral number
BAD_NEEDS = ("8", 4.5, -3, 0, None, [4], float("inf"), float("nan"))
BAD_SLOTS = ("1", -1, 1.5, None)


@st.composite
def requests_and_reads(draw):
    """Requests and the registration reads that deliver their cache-info parts (some hostile)."""
    requests, parts, late_parts = [], [], []
    for index in range(draw(st.integers(1, 4))):
        request_id, slot, need = f"r{index}", draw(st.integers(0, NUM_SLOTS - 1)), draw(st.integers(1, 12))
        boundaries = draw(st.lists(st.integers(1, need), max_size=2, unique=True))
        chunks = tuple(sorted(set(boundaries) | {need}))
        prefill = {"request_id": request_id, "src_block_ids": [0], "current_id": slot, "need_prefill_tokens": need}
        decode = {"request_id": request_id, "dest_block_ids": [0], "decode_cached_tokens": 0}
        shape = draw(st.sampled_from(["ok", "ok", "reversed", "form", "missing", "bad", "half", "duplicate"]))
        valid = shape in ("ok", "reversed", "form", "duplicate")
        if shape == "form":
            prefill["need_prefill_tokens"] = draw(st.sampled_from(GOOD_NEED_FORMS))(need)
            prefill["current_id"] = draw(st.sampled_from(GOOD_NEED_FORMS))(slot)
        elif shape == "missing":
            del prefill[draw(st.sampled_from(["current_id", "need_prefill_tokens"]))]
        elif shape == "bad":
            if draw(st.booleans()):
                prefill["need_prefill_tokens"] = draw(st.sampled_from(BAD_NEEDS))
            else:
                prefill["current_id"] = draw(st.sampled_from(BAD_SLOTS))
        if shape == "reversed":
            parts += [decode, prefill]
        elif shape == "half":
            parts.append(draw(st.sampled_from([prefill, decode])))  # never completed: no registration at all
        else:
            parts += [prefill, decode]
        if shape == "duplicate":  # a repeated part completes the same task again, now or after later requests
            (parts if draw(st.booleans()) else late_parts).append(draw(st.sampled_from([prefill, decode])))
        # an engine history's request; it registers iff its completed task is a well-formed registration
        requests.append(prefill_request(request_id, slot, chunks, registers=valid and shape != "half"))
    parts += late_parts
    reads, position = [], 0
    while position < len(parts):  # cut the parts into reads, with empty reads in between
        if draw(st.integers(0, 4)) == 0:
            reads.append([])
        size = draw(st.integers(1, 3))
        reads.append(parts[position : position + size])
        position += size
    return requests, reads


@st.composite
def triples_of_step(draw, requests: List[Occupancy], progress: Dict[str, int]):
    """The tasks of one engine step: next chunks, repeated or shrinking chunks, and garbage triples."""
    triples = []
    for _ in range(draw(st.integers(1, 4))):
        request = draw(st.sampled_from(requests))
        done = progress[request.request_id]
        kind = draw(st.sampled_from(["next", "next", "next", "repeat", "shrink", "garbage"]))
        if kind == "next" and done < len(request.ends):
            start = request.ends[done - 1] if done else 0
            triples.append((request.slot, start, request.ends[done] - start))
            progress[request.request_id] = done + 1
        elif kind == "repeat" and done:  # the chunk just signalled, once more
            start = request.ends[done - 2] if done > 1 else 0
            triples.append((request.slot, start, request.ends[done - 1] - start))
        elif kind == "shrink" and done:
            triples.append((request.slot, 0, draw(st.integers(1, request.ends[done - 1]))))
        else:
            triples.append(
                (draw(small_or_extreme(-1, NUM_SLOTS)), draw(small_or_extreme(-2, 12)), draw(small_or_extreme(-2, 12)))
            )
    return triples


def kv_buffer(count: int, layer: int, triples) -> np.ndarray:
    values = np.full(KV_SIGNAL_LENGTH, -1, dtype=np.int32)
    values[0], values[1] = count, layer
    for index, triple in enumerate(triples):
        values[2 + 3 * index : 5 + 3 * index] = triple
    return values


@st.composite
def signal_events(draw, requests: List[Occupancy]):
    """Op results: valid and mixed layer-0 signals, other layers, no signal, malformed headers and op errors."""
    progress = {request.request_id: 0 for request in requests}
    events = []
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(
            st.sampled_from(
                ["layer0"] * 6 + ["later_layer", "none", "bad_count", "overcount", "bad_layer", "empty", "error"]
            )
        )
        if kind == "error":
            events.append(ValueError("get_output_kv_signal failed"))
            continue
        if kind in ("none", "empty"):
            events.append(kv_buffer(-1 if kind == "none" else 0, 0, []))
            continue
        triples = draw(triples_of_step(requests, progress))
        count, layer = len(triples), 0
        if kind == "later_layer":
            layer = draw(st.integers(1, 3))
        elif kind == "bad_count":
            count = draw(st.sampled_from([MAX_TASKS + 1, 600, -2, INT32_MIN, INT32_MAX]))
        elif kind == "overcount":
            count += draw(st.integers(1, 3))  # the op's buffer holds -1 beyond the written triples
        elif kind == "bad_layer":
            layer = draw(st.sampled_from([-1, -7, INT32_MIN]))
        events.append(kv_buffer(count, layer, triples))
    return events


@st.composite
def hostile_scripts(draw):
    requests, reads = draw(requests_and_reads())
    signals = draw(signal_events(requests))
    kinds = draw(st.permutations(["sig"] * len(signals) + ["reg"] * len(reads)))
    return requests, signals, reads, kinds


# ---- the oracle ----


@dataclass
class Outcome:
    batches: List[list] = field(default_factory=list)
    drops: List[Tuple[int, int]] = field(default_factory=list)
    rejected_slots: List[object] = field(default_factory=list)
    malformed: List[str] = field(default_factory=list)  # a substring of each expected "malformed kv signal" line
    abandoned: List[Decision] = field(default_factory=list)  # each request abandoned (release rule 4)
    repeated: List[Tuple[str, int]] = field(default_factory=list)  # (request id, slot) of each repeat (rule 2)
    errors: int = 0
    progress: List[dict] = field(default_factory=lambda: [dict() for _ in range(NUM_SLOTS)])


def expected_outcome(requests: List[Occupancy], trace: List[tuple]) -> Outcome:
    """Replay what the loops saw, in processing order, through OrderedRelease with only the valid items."""
    by_id = {request.request_id: request for request in requests}
    release, outcome = OrderedRelease(), Outcome()
    counted = set()  # request ids of the accepted registrations: any later one is a repeat (release rule 2)
    for entry in trace:
        released = None
        if entry[0] == "sig":
            event = entry[1]
            if isinstance(event, Exception):
                outcome.errors += 1
                continue
            expected = expected_parse(event, NUM_SLOTS)
            if expected.kind == "rejected":
                outcome.malformed.append(expected.reason)
            for index, slot, _, _ in expected.dropped:
                outcome.malformed.append(f"layer {expected.layer} task {index} dropped: slot {slot} ")
            for slot, _, prefilled_token_num in expected.tasks:
                outcome.progress[slot] = {
                    "prefilled_layer_idx": expected.layer,
                    "prefilled_token_num": prefilled_token_num,
                }
            if expected.kind == "signal" and expected.layer == 0 and expected.tasks:
                released = release.add_signal(expected.tasks)
        elif entry[0] == "store":
            _, slot, request_id = entry
            request = by_id[request_id]
            if not request.registers:
                outcome.rejected_slots.append(slot)
                continue
            if request_id in counted:
                outcome.repeated.append((request_id, request.slot))
                continue
            counted.add(request_id)
            released = release.add_registration(Registration(request.slot, request_id, request.need))
        if released is not None:
            outcome.batches += [list(batch) for batch in released.batches]
            outcome.drops += [(drop.slot, drop.prefilled_token_num) for drop in released.drops]
            outcome.abandoned += [decision for decision in released.decisions if decision.kind == ABANDONED]
    return outcome


def messages(records, needle: str) -> List[str]:
    return [record.getMessage() for record in records if needle in record.getMessage()]


@pytest.fixture
def patched_fixture_class():
    patch_class(HostileMessager, "ordered")
    yield HostileMessager
    unpatch_class(HostileMessager)


@pytest.fixture
def quiet_diagnostics(monkeypatch):
    monkeypatch.delenv("FD_PD_FIX_WATCHDOG_S", raising=False)
    monkeypatch.delenv("FD_PD_FIX_INJECT", raising=False)


def run_loops(messager, script: Turns) -> Dict[str, BaseException]:
    """Run both patched loops in their own threads until the script is over; how each thread ended."""
    global TURNS
    TURNS = script
    endings: Dict[str, BaseException] = {}

    def run(name, loop):
        try:
            loop()
        except BaseException as ending:  # StopLoop is the only expected ending
            endings[name] = ending

    threads = [
        threading.Thread(target=run, args=("consume_signals", messager.consume_signals)),
        threading.Thread(target=run, args=("_add_cache_task_thread", messager._add_cache_task_thread)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(2 * HANDSHAKE_TIMEOUT_S)
    assert not any(thread.is_alive() for thread in threads), "a loop neither finished its script nor died"
    return endings


def drain(batch_queue) -> List[list]:
    batches = []
    while not batch_queue.empty():
        batches.append(batch_queue.get_nowait())
    return batches


@LOOP_SETTINGS
@given(script=hostile_scripts())
def test_patched_loops_survive_hostile_streams_and_release_exactly_the_valid_ones(
    script, patched_fixture_class, quiet_diagnostics, caplog
):
    requests, signals, reads, kinds = script
    caplog.clear()
    caplog.set_level(logging.INFO, logger=logger.name)
    messager = patched_fixture_class()
    turns = Turns(kinds, {"sig": signals, "reg": reads})

    endings = run_loops(messager, turns)

    # The loops never died: each ran to the end of its part of the script and asked once more.
    assert {name: type(ending) for name, ending in endings.items()} == {
        "consume_signals": StopLoop,
        "_add_cache_task_thread": StopLoop,
    }
    assert turns.calls == {"sig": len(signals) + 1, "reg": len(reads) + 1}

    expected = expected_outcome(requests, turns.trace)
    records = caplog.records
    for name, count in (
        ("batches", len(expected.batches)),
        ("drops", len(expected.drops)),
        ("rejected registrations", len(expected.rejected_slots)),
        ("malformed signal lines", len(expected.malformed)),
    ):
        event(f"{name}: {'none' if count == 0 else 'some'}")
    # The valid signals around the bad ones are queued exactly once, in order, as OrderedRelease releases them.
    assert drain(messager.cache_prefilled_engine_ids_queue) == expected.batches
    assert len(messages(records, "queued batch #")) == len(expected.batches)
    assert messager.engine_cache_tasks == expected.progress  # progress recorded for valid tasks only

    # Every drop and every rejected item left a line with its reason.
    malformed = messages(records, "malformed kv signal: ")
    assert len(malformed) == len(expected.malformed)
    for line, needle in zip(malformed, expected.malformed):
        assert needle in line
    drops = messages(records, "dropped layer-0 task ")
    assert [line.split("dropped layer-0 task ")[1].split(" from ")[0] for line in drops] == [
        f"slot={slot} prefilled_token_num={number}" for slot, number in expected.drops
    ]
    assert all(": " in line.split(" from ")[1] for line in drops)  # "from <source>: <reason>"
    rejected = messages(records, ", malformed task: ")
    assert len(rejected) == len(expected.rejected_slots)
    for line, slot in zip(rejected, expected.rejected_slots):
        assert f"registration for slot {slot!r} ignored" in line
    assert len(messages(records, "error in consume_signals")) == expected.errors
    # Every decision of the policy left its line, read back as the decision itself.
    decisions = logged_decisions(record.getMessage() for record in records)
    assert [(decision.request_id, decision.slot) for decision in decisions if decision.kind == COUNTED_BEFORE] == (
        expected.repeated
    )
    assert [decision for decision in decisions if decision.kind == ABANDONED] == expected.abandoned


# ---- the two bugs the fuzzing found, as plain examples ----


def prefill_part(request_id, slot, need):
    return {"request_id": request_id, "src_block_ids": [0], "current_id": slot, "need_prefill_tokens": need}


def decode_part(request_id):
    return {"request_id": request_id, "dest_block_ids": [0], "decode_cached_tokens": 0}


def test_a_repeated_cache_info_part_does_not_register_the_request_twice(
    patched_fixture_class, quiet_diagnostics, caplog
):
    # A (need 4) gets its decode part twice, so the registration loop stores A's task twice; then B (need 8)
    # takes slot 0 and is prefilled in two chunks. Registered twice, A stayed the slot's current registration and
    # B's chunks were dropped as "exceeds need_prefill_tokens 4 of request A": B was never sent. Now any repeat of
    # a request id counted before is ignored (release rule 2), also one arriving after the slot was reused.
    reads = [
        [prefill_part("A", 0, 4), decode_part("A"), decode_part("A")],
        [prefill_part("B", 0, 8), decode_part("B")],
    ]
    signals = [kv_buffer(1, 0, [(0, 0, 4)]), kv_buffer(1, 0, [(0, 0, 6)]), kv_buffer(1, 0, [(0, 6, 2)])]
    messager = patched_fixture_class()
    with caplog.at_level(logging.INFO, logger=logger.name):
        endings = run_loops(messager, Turns(["reg", "sig", "reg", "sig", "sig"], {"sig": signals, "reg": reads}))
    assert {type(ending) for ending in endings.values()} == {StopLoop}
    assert drain(messager.cache_prefilled_engine_ids_queue) == [[(0, 4)], [(0, 6)], [(0, 8)]]
    repeat = Decision(COUNTED_BEFORE, "A", 0, occupant=REGISTERED_REQUEST)
    assert logged_decisions(record.getMessage() for record in caplog.records) == [repeat]
    assert "dropped layer-0 task" not in caplog.text


@pytest.mark.parametrize(
    "signals, batches, waiting",
    [
        (
            [kv_buffer(1, 0, [(0, 0, 4)]), kv_buffer(1, 0, [(0, 0, 4)]), kv_buffer(1, 0, [(0, 4, 4)])],
            [[(0, 4)]],
            [((0, 0, 4),), ((0, 4, 8),)],
        ),
        (  # twice in one signal: its first task is bound to A, the signal waits whole
            [kv_buffer(2, 0, [(0, 0, 4), (0, 0, 4)]), kv_buffer(1, 0, [(0, 4, 4)])],
            [],
            [((0, 0, 4), (0, 0, 4)), ((0, 4, 8),)],
        ),
    ],
    ids=["next-signal", "same-signal"],
)
def test_a_duplicate_kv_signal_of_the_current_chunk_is_logged_and_no_thread_dies(
    signals, batches, waiting, patched_fixture_class, quiet_diagnostics, caplog
):
    # A (need 8) has its first chunk [0, 4) signalled twice. The duplicate does not continue A, so A counts as
    # aborted (release rule 4): abandoned with one log line, the same on every rank; the duplicate and A's second
    # chunk wait for slot 0's next registration (a limit of the two streams, which the watchdog reports).
    reads = [[prefill_part("A", 0, 8), decode_part("A")]]
    messager = patched_fixture_class()
    with caplog.at_level(logging.INFO, logger=logger.name):
        endings = run_loops(messager, Turns(["reg"] + ["sig"] * len(signals), {"sig": signals, "reg": reads}))
    assert {name: type(ending) for name, ending in endings.items()} == {
        "consume_signals": StopLoop,
        "_add_cache_task_thread": StopLoop,
    }
    assert drain(messager.cache_prefilled_engine_ids_queue) == batches
    assert logged_decisions(record.getMessage() for record in caplog.records) == [
        Decision(ABANDONED, "A", 0, (0, 4), last_end=4, run_end=8, occupant=REGISTERED_REQUEST)
    ]
    assert messager._fd_pd_fix_runtime.step.policy.waiting_signals() == waiting


@pytest.mark.parametrize(
    "slot, need, accepted",
    [
        (1, 4, True),
        (np.int64(1), np.int64(4), True),
        (1.0, 4.0, True),  # the same dict key and token number as 1 and 4
        ("1", 4, False),  # int("1") made it slot 1, but the engine stored the task under the key "1"
        (1, "4", False),
        (1.5, 4, False),
        (1, 4.5, False),  # int(4.5) made it 4 tokens
        (1, float("inf"), False),  # int(inf) raised OverflowError into the original registration loop
        (1, None, False),
    ],
    ids=lambda value: repr(value) if not isinstance(value, bool) else ("accepted" if value else "rejected"),
)
def test_registration_fields_must_be_integral_numbers(slot, need, accepted, patched_fixture_class, caplog):
    messager = patched_fixture_class()
    reads = [[prefill_part("A", slot, need), decode_part("A"), prefill_part("B", 2, 4), decode_part("B")]]
    signals = [kv_buffer(2, 0, [(1, 0, 4), (2, 0, 4)])]
    with caplog.at_level(logging.INFO, logger=logger.name):
        endings = run_loops(messager, Turns(["reg", "sig"], {"sig": signals, "reg": reads}))
    assert {type(ending) for ending in endings.values()} == {StopLoop}
    assert set(messager.idx_cache_task_dict) == {slot, 2}  # the original loop went on to store B
    if accepted:
        assert drain(messager.cache_prefilled_engine_ids_queue) == [[(1, 4), (2, 4)]]
    else:
        assert drain(messager.cache_prefilled_engine_ids_queue) == []  # the signal waits for a valid slot-1 task
        assert f"registration for slot {slot!r} ignored, malformed task" in caplog.text
