"""Scripted kv-signal and registration streams of one stand-in rank, and the progress file the harness reads.

The scenario (JSON file named by ``FD_STANDIN_SCENARIO``) holds the two rank-invariant streams and the order in
which each rank sees them:

* ``signals``: layer-0 kv signals, each a list of ``[slot, chunk_token_offset, current_chunk_len]``;
* ``registrations``: ``get_cache_info`` reads, each a list of ``{"request_id", "slot", "need_prefill_tokens"}``
  (every request is delivered as its two cache-info halves, prefill side and decode side, in the same read; an
  entry's optional ``"parts"`` ``"prefill"`` or ``"decode"`` delivers one half only: a D-part that comes later,
  never, or again);
* ``schedules``: per rank, e.g. ``["reg0", "sig0", "reg1"]`` (ranks beyond the list repeat the last schedule),
  with the send-thread controls of :mod:`.contract` (``stall``, ``hold``, ``go``, ``drain``) where a scenario
  needs the send thread at a given point;
* optional ``aborted``: request ids the engine aborts (their slot goes to the next request at once, they need not
  finish), and ``owners``: the request each signal task belongs to (:mod:`.ground_truth`);
* registration-read entries that are engine notices (:data:`.contract.NOTICE_ENTRY`): put as the plugin's
  engine-side patch puts them (an abort followed by its fence) when ``fastdeploy_pd_fix.config.engine_notices()``
  is on in this rank's environment or the release carries ``make-patch``'s package, else left out (a read of
  nothing); the first non-empty read then starts with the engine's announcement. The scenario's schedules keep the
  fence: a slot's next request's signals come after the abort's read.

Event k of a rank's schedule is delivered only after event k-1 was acknowledged: a signal by the next
``get_output_kv_signal`` call (the consume loop has finished with it), a registration read by the next
``get_cache_info`` call (processed and through its barriers), or, written ``reg<N>@barrier``, as soon as its
``cache_info_barrier`` returned (its tasks may not be stored yet). This forces one interleaving of the two threads
without any sleep. A control takes effect when the schedule reaches it: put ``stall``/``hold`` before the signal
whose batch must wait. Nothing is delivered before :func:`activate`: the engine sends no request before the
messager has reported its cache ready.

A registration read that gives a slot to a new request is due only once this rank has finished the slot's previous
request, as the engine recycles a slot only after ``get_finished_req`` reported its request: the messager keys
tasks by slot, and an earlier store would replace a task its send thread still needs. An aborted request's slot is
recycled at once (the engine frees it without telling the messager), so a read reusing it is not held back.

The send loop reports every batch it takes, with the task it read for each slot, to :func:`check_sent_tasks`;
ground-truth violations are logged and written to the progress file (``{"event": "violation"}``).

``FD_STANDIN_EXIT_AFTER_BATCHES=R:N`` (tests only, inert unless set) makes rank R die by SIGKILL right after its send
loop took its N-th batch, before that batch's ``begin_send_cache_barrier``: a rank process lost mid-transfer.
"""

import copy
import importlib.util
import json
import logging
import os
import signal
import threading

from fastdeploy_pd_fix import config
from fastdeploy_pd_fix.policy import notice
from fastdeploy_pd_fix.target import UPSTREAMED_PACKAGE

from .contract import (
    BOTH_PARTS,
    DECODE_PART,
    DRAIN,
    ENV_EXIT_AFTER_BATCHES,
    ENV_OUT,
    ENV_SCENARIO,
    GO,
    HOLD,
    NOTICE_ENTRY,
    PREFILL_PART,
    REGISTRATION,
    SIGNAL,
    STALL,
    acknowledged_at_barrier,
    is_notice_entry,
    parse_event,
)
from .ground_truth import GroundTruth, block_ids, registered_requests

#: How long a non-blocking read waits for its event before reporting "nothing" (keeps polling loops cool).
NON_BLOCKING_WAIT_S = 0.005
#: Who announces engine notices in the stand-in's stream (the plugin's engine side names itself the same way).
STANDIN_ANNOUNCER = "the stand-in engine (as fastdeploy_pd_fix's engine side)"

# The cache messager's logger; its main() re-targets it to cache_messager_rank{R}.log.
logger = logging.getLogger("cache_messager")


def schedule_of_rank(scenario, rank):
    """This rank's events, and the positions of those acknowledged at their ``cache_info_barrier``."""
    schedules = scenario["schedules"]
    tokens = schedules[min(rank, len(schedules) - 1)]
    return [parse_event(token) for token in tokens], {
        n for n, token in enumerate(tokens) if acknowledged_at_barrier(token)
    }


def cache_info_parts(request, block_size, blocks=None):
    """The halves of one request's cache info the entry delivers: the prefill side's, then the decode side's."""
    blocks = block_ids(0, request["need_prefill_tokens"], block_size) if blocks is None else blocks
    prefill_part = {
        "request_id": request["request_id"],
        "src_block_ids": list(blocks),
        "current_id": int(request["slot"]),
        "need_prefill_tokens": int(request["need_prefill_tokens"]),
    }
    decode_part = {
        "request_id": request["request_id"],
        "dest_block_ids": list(blocks),
        "decode_cached_tokens": 0,
    }
    parts = request.get("parts", BOTH_PARTS)
    return {PREFILL_PART: [prefill_part], DECODE_PART: [decode_part]}.get(parts, [prefill_part, decode_part])


def notice_items(entry):
    """The cache-info items of one notice entry, as the engine-side patch puts them."""
    kind = entry[NOTICE_ENTRY]
    if kind == notice.ORPHAN:
        return [notice.encode(notice.orphan_notice(entry["slot"], entry["request_id"], entry["need_prefill_tokens"]))]
    return [
        notice.encode(notice.abort_notice(entry["slot"], entry["request_id"], entry["emitted_end"])),
        notice.encode(notice.fence_notice(f"after-abort-of-{entry['request_id']}")),
    ]


def release_carries_the_fix() -> bool:
    """Whether this stand-in release carries ``make-patch``'s package: its engine then announces and puts notices
    itself, with the plugin off too (as the make-patched engine files do)."""
    return importlib.util.find_spec(f"{__package__.rsplit('.', 1)[0]}.cache_manager.{UPSTREAMED_PACKAGE}") is not None


def read_items(read, block_size, ground_truth, notices_on):
    """The cache-info items one scenario read delivers: each request's parts, each notice's items (if on)."""
    items = []
    for entry in read:
        if is_notice_entry(entry):
            items += notice_items(entry) if notices_on else []
        else:
            items += cache_info_parts(entry, block_size, ground_truth.blocks_of(entry["request_id"]))
    return items


class ScriptedStreams:
    """Delivers one rank's events in its schedule order, each after the previous one was acknowledged."""

    def __init__(self):
        self._condition = threading.Condition()
        self._active = False
        self._events = []
        self._signals = []
        self._reads = []
        self._next_event = 0
        self._unacknowledged = None  # kind of the event delivered and not yet acknowledged
        self._acknowledged_at_barrier = set()  # positions of the reg<N>@barrier events
        self._recycled_requests = []  # per read: the requests whose slots it hands on (must be finished first)
        self._finished = set()
        self._ground_truth = None
        # The send thread: the queue it takes batches from (its unfinished_tasks: batches put and not yet sent), the
        # batches it took and sent, and the stall/hold controls.
        self._send_queue = None
        self._taken = self._sent = 0
        self._stalled = False
        self._held = False
        self._has_stall = False

    def activate(
        self, events, signals, reads, recycled_requests=None, ground_truth=None, send_queue=None, at_barrier=()
    ):
        with self._condition:
            self._events, self._signals, self._reads = list(events), signals, reads
            self._acknowledged_at_barrier = set(at_barrier)
            self._recycled_requests = recycled_requests or [[] for _ in reads]
            self._ground_truth = ground_truth
            self._send_queue = send_queue
            self._has_stall = any(kind == STALL for kind, _ in self._events)
            self._active = True
            self._pass_controls()
            self._condition.notify_all()

    def cache_info_barrier_passed(self):
        """The registration thread's ``cache_info_barrier.wait()`` returned: a ``reg<N>@barrier`` read delivered last
        counts as acknowledged now, before its tasks are stored."""
        with self._condition:
            if self._unacknowledged == REGISTRATION and self._next_event in self._acknowledged_at_barrier:
                self._unacknowledged = None
                self._next_event += 1
                self._condition.notify_all()

    def note_finished(self, request_id):
        with self._condition:
            self._finished.add(request_id)
            self._condition.notify_all()

    def next_kv_signal(self, block):
        """The next signal's ``[slot, offset, length]`` triples, or None when none is due (non-blocking read)."""
        return self._next(SIGNAL, timeout=None if block else NON_BLOCKING_WAIT_S)

    def next_cache_infos(self):
        """The next registration read's cache-info parts, or ``[]`` when none is due."""
        infos = self._next(REGISTRATION, timeout=NON_BLOCKING_WAIT_S)
        return [] if infos is None else infos

    def wait_to_take(self):
        """The send loop, before it takes its next batch: wait while stalled (only once a batch is queued, so that
        a ``stall`` reached before a signal keeps that signal's batch in the queue). Without a ``stall`` in the
        schedule the send loop blocks in the queue's ``get`` as upstream's does."""
        if not self._has_stall:
            return
        with self._condition:
            while self._stalled or self._send_queue is None or self._send_queue.empty():
                self._condition.wait(NON_BLOCKING_WAIT_S)

    def took_batch(self):
        with self._condition:
            self._taken += 1
            self._condition.notify_all()

    def wait_to_send(self):
        """The send loop, after the batch's begin barrier and before it reads its tasks: wait while held."""
        with self._condition:
            self._condition.wait_for(lambda: not self._held)

    def batch_done(self):
        """The send loop is done with the batch it took last (preflight's tap says so each time the send loop comes
        back to the queue, the first time included)."""
        with self._condition:
            if self._sent < self._taken:
                self._sent += 1
                if self._send_queue is not None:
                    self._send_queue.task_done()
            self._condition.notify_all()

    def _send_idle(self):
        """Every batch put into the queue has been sent. Counted, not read off the queue and a flag: between the
        send loop's ``get`` and its report that it took the batch, the queue is empty and nothing is sending."""
        if self._send_queue is None:
            return True
        with self._send_queue.mutex:
            return self._send_queue.unfinished_tasks == 0

    def _pass_controls(self):
        """Apply the controls the schedule has reached; a ``drain`` is passed once the send thread is idle."""
        while self._next_event < len(self._events):
            kind = self._events[self._next_event][0]
            if kind == DRAIN and not self._send_idle():
                return
            if kind not in (STALL, HOLD, GO, DRAIN):
                return
            self._stalled = kind == STALL or (self._stalled and kind != GO)
            self._held = kind == HOLD or (self._held and kind != GO)
            logger.info(f"standin: control {kind} (event {self._next_event} of this rank's schedule)")
            self._next_event += 1
            self._condition.notify_all()

    def _next(self, kind, timeout):
        with self._condition:
            if self._unacknowledged == kind:
                # The reader came back for more, so it has finished with the event it got last time.
                self._unacknowledged = None
                self._next_event += 1
                self._condition.notify_all()
            if not self._condition.wait_for(lambda: self._is_due(kind), timeout=timeout):
                return None
            self._unacknowledged = kind
            position = self._next_event
            _, index = self._events[position]
            logger.info(f"standin: delivering {kind}{index} (event {position} of this rank's schedule)")
            if kind == SIGNAL and self._ground_truth is not None:
                self._ground_truth.note_delivered(index)
            return copy.deepcopy((self._signals if kind == SIGNAL else self._reads)[index])

    def _is_due(self, kind):
        if self._active and self._unacknowledged is None:
            self._pass_controls()
        if not (
            self._active
            and self._unacknowledged is None
            and self._next_event < len(self._events)
            and self._events[self._next_event][0] == kind
        ):
            return False
        if kind == SIGNAL:
            return True
        return set(self._recycled_requests[self._events[self._next_event][1]]) <= self._finished


class ProgressFile:
    """JSON lines ``{"event": ...}`` flushed one by one, so that a killed rank still leaves its history."""

    def __init__(self):
        self._lock = threading.Lock()
        self._file = None
        self._request_ids = set()
        self._finished = set()

    def open(self, path, request_ids):
        with self._lock:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self._file = open(path, "a", encoding="utf-8")
            self._request_ids = set(request_ids)

    def write(self, event, **fields):
        with self._lock:
            if event == "finished":
                self._finished.add(fields["request_id"])
            if self._file is not None:
                self._file.write(json.dumps({"event": event, **fields}) + "\n")
                self._file.flush()

    def all_requests_finished(self):
        with self._lock:
            return bool(self._request_ids) and self._request_ids <= self._finished


_streams = ScriptedStreams()
_progress = ProgressFile()
_death = {"after_batches": None, "taken": 0}  # this rank's FD_STANDIN_EXIT_AFTER_BATCHES, and batches taken
_ground_truth = {"checker": None}


def batches_before_death(rank):
    """N when ``FD_STANDIN_EXIT_AFTER_BATCHES=R:N`` names this rank, else None."""
    value = os.getenv(ENV_EXIT_AFTER_BATCHES, "").strip()
    if not value:
        return None
    dying_rank, after_batches = (int(part) for part in value.split(":"))
    return after_batches if dying_rank == rank else None


def recycled_requests(registrations, aborted=()):
    """Per registration read: the earlier requests whose slots it hands to a new request (aborted ones excepted:
    their slot is free at once). An entry without a prefill part hands no slot on."""
    last_request_of_slot, recycled = {}, []
    for read in registrations:
        handing = [r for r in read if not is_notice_entry(r) and r.get("parts") != DECODE_PART]
        recycled.append(
            [
                last_request_of_slot[r["slot"]]
                for r in handing
                if last_request_of_slot.get(r["slot"], r["request_id"]) not in (r["request_id"], *aborted)
            ]
        )
        last_request_of_slot.update({r["slot"]: r["request_id"] for r in handing})
    return recycled


def activate(rank, block_size, send_queue=None):
    """Load this rank's scenario, report "ready" and start delivering events. Returns False without a scenario.
    ``send_queue``: the messager's batch queue (the ``stall`` and ``drain`` controls look at it)."""
    scenario_path = os.getenv(ENV_SCENARIO)
    if not scenario_path:
        logger.info(f"standin: {ENV_SCENARIO} not set, no kv signal or cache info will arrive")
        return False
    with open(scenario_path, encoding="utf-8") as scenario_file:
        scenario = json.load(scenario_file)
    aborted = scenario.get("aborted", [])
    ground_truth = GroundTruth(scenario, block_size)
    _ground_truth["checker"] = ground_truth
    must_finish = [
        request_id for request_id in registered_requests(scenario["registrations"]) if request_id not in aborted
    ]
    notices_on = config.engine_notices()[0] or release_carries_the_fix()
    reads = [read_items(read, block_size, ground_truth, notices_on) for read in scenario["registrations"]]
    first = next((items for items in reads if items), None)
    if notices_on and first is not None:  # as the engine side's AnnouncedPut heads its first batch
        first.insert(0, notice.encode(notice.engine_notice(STANDIN_ANNOUNCER)))
    _progress.open(os.path.join(os.getenv(ENV_OUT, "."), f"rank{rank}.jsonl"), must_finish)
    _death["after_batches"] = batches_before_death(rank)
    _progress.write("ready", rank=rank, pid=os.getpid())
    recycled = recycled_requests(scenario["registrations"], aborted)
    events, at_barrier = schedule_of_rank(scenario, rank)
    _streams.activate(events, scenario["signals"], reads, recycled, ground_truth, send_queue, at_barrier)
    return True


def next_kv_signal(block):
    return _streams.next_kv_signal(block)


def next_cache_infos():
    return _streams.next_cache_infos()


def cache_info_barrier_passed():
    _streams.cache_info_barrier_passed()


def record_batch(batch):
    """Called by the send loop right after it took a batch from the queue (before the barrier)."""
    _streams.took_batch()
    _progress.write("batch", batch=[[int(slot), int(token_num)] for slot, token_num in batch])
    _death["taken"] += 1
    if _death["taken"] == _death["after_batches"]:
        _progress.write("dying", batches=_death["taken"])
        logger.warning(f"standin: {ENV_EXIT_AFTER_BATCHES}: killing this rank after {_death['taken']} batches")
        os.kill(os.getpid(), signal.SIGKILL)


def wait_to_take():
    """Called by the send loop before it takes a batch from the queue (the ``stall`` control)."""
    _streams.wait_to_take()


def wait_to_send():
    """Called by the send loop after the begin barrier, before it reads the batch's tasks (the ``hold`` control)."""
    _streams.wait_to_send()


def check_sent_tasks(batch, tasks):
    """The send loop read ``tasks`` (None: no task) for the ``(slot, prefilled_token_num)`` of ``batch``: report every
    ground-truth violation to the rank's log and progress file."""
    checker = _ground_truth["checker"]
    for violation in checker.check_batch(batch, tasks) if checker is not None else []:
        logger.error(f"standin: GROUND TRUTH VIOLATION {violation}")
        _progress.write("violation", violation=violation)


def batch_sent():
    """Called by the send loop when it is done with a batch (the ``drain`` control waits for this)."""
    _streams.batch_done()


def record_finished(request_id):
    _progress.write("finished", request_id=request_id)
    _streams.note_finished(request_id)


def all_requests_finished():
    return _progress.all_requests_finished()


def exit_process():
    """Leave with code 0 right away: the other threads are parked in proxy calls that would never return."""
    _progress.write("done")
    logging.shutdown()
    os._exit(0)
