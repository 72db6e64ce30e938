"""Ground truth of a stand-in rank: which request each kv-signal task belongs to, and the send thread's checks.

The scenario says which request computed each signal task (``owners``: per signal, one request id per task; a
request that never registers, an orphan, owns tasks too). Without ``owners`` the normal flow is assumed: each task
belongs to its slot's current registered request, in registration order, until a task reaches that request's
``need_prefill_tokens``.

For every batch the send thread takes, :meth:`GroundTruth.check_batch` compares the task it read from
``idx_cache_task_dict`` for each ``(slot, prefilled_token_num)`` with the truth:

* binding: the batch carries a signal task with that slot and end delivered to this rank and not carried by an
  earlier batch; one of the read request's own, when there is one (so that two identical chunks of different
  requests count in the policy's favour), else the oldest. The task read must be that task's request's: its
  request id, ``need_prefill_tokens`` and blocks as registered;
* computed: the read request's chunk reaching that end was computed, i.e. its signal was delivered to this rank
  before the send (the rank cannot know more: a schedule delivering it later models a chunk computed later).

Each violation is one line without timing or process details, so that ranks that err alike report alike.
Imported by the ranks only (``fastdeploy.pd_fix_standin.ground_truth``); it reads nothing at import time.
"""

import threading

from .contract import DECODE_PART, is_notice_entry

#: Block ids of the n-th request of a scenario start at ``BLOCK_ID_BASE * (n + 1)``: every request has its own.
BLOCK_ID_BASE = 1000


def registered_requests(registrations):
    """``request_id -> {"slot", "need_prefill_tokens", "ordinal"}`` from the prefill parts of the registration reads,
    in order of first appearance."""
    requests = {}
    for read in registrations:
        for request in read:
            if is_notice_entry(request) or request.get("parts") == DECODE_PART or request["request_id"] in requests:
                continue
            requests[request["request_id"]] = {
                "slot": int(request["slot"]),
                "need_prefill_tokens": int(request["need_prefill_tokens"]),
                "ordinal": len(requests),
            }
    return requests


def block_ids(ordinal, need_prefill_tokens, block_size):
    """The blocks of a scenario's ``ordinal``-th request: as many as its prompt needs, numbered apart."""
    num_blocks = max(1, -(-int(need_prefill_tokens) // block_size))
    return [BLOCK_ID_BASE * (ordinal + 1) + index for index in range(num_blocks)]


def normal_flow_owners(signals, registrations):
    """Owners of the signal tasks when every request registers and completes, one after another per slot."""
    queues = {}
    for request_id, request in registered_requests(registrations).items():
        queues.setdefault(request["slot"], []).append((request_id, request["need_prefill_tokens"]))
    owners = []
    for signal in signals:
        owners.append([])
        for slot, offset, length in signal:
            queue = queues.get(slot, [])
            owners[-1].append(queue[0][0] if queue else None)
            if queue and offset + length >= queue[0][1]:
                queue.pop(0)
    return owners


class _DeliveredTask:
    __slots__ = ("slot", "end", "owner", "carried")

    def __init__(self, slot, end, owner):
        self.slot, self.end, self.owner, self.carried = slot, end, owner, False


class GroundTruth:
    """What this rank was shown, and the send thread's checks against it (thread-safe)."""

    def __init__(self, scenario, block_size):
        self._signals = scenario["signals"]
        owners = scenario.get("owners")
        self._owners = owners if owners is not None else normal_flow_owners(self._signals, scenario["registrations"])
        self._requests = registered_requests(scenario["registrations"])
        self._block_size = block_size
        self._lock = threading.Lock()
        self._delivered = []
        self._batches = 0

    def blocks_of(self, request_id):
        request = self._requests[request_id]
        return block_ids(request["ordinal"], request["need_prefill_tokens"], self._block_size)

    def note_delivered(self, index):
        """Signal ``index`` reached this rank's kv-signal thread: its chunks are computed."""
        with self._lock:
            for (slot, offset, length), owner in zip(self._signals[index], self._owners[index]):
                self._delivered.append(_DeliveredTask(int(slot), int(offset) + int(length), owner))

    def check_batch(self, batch, tasks):
        """The violations of one batch: ``batch`` as taken from the queue, ``tasks`` the task dict read for each of
        its ``(slot, prefilled_token_num)`` (None: none)."""
        with self._lock:
            self._batches += 1
            return [
                f"batch #{self._batches} task ({slot}, {end}): {problem}"
                for (slot, end), task in zip(batch, tasks)
                for problem in self._check_task(int(slot), int(end), task)
            ]

    def _check_task(self, slot, end, task):
        read = None if task is None else task.get("request_id")
        candidates = [d for d in self._delivered if not d.carried and (d.slot, d.end) == (slot, end)]
        if not candidates:
            return ["no signal of this chunk was delivered to this rank (or every one was sent already)"]
        carried = next((d for d in candidates if d.owner == read), candidates[0])
        carried.carried = True
        if carried.owner is None:
            return []  # the scenario does not say whose chunk this is
        problems = []
        if read != carried.owner:
            problems.append(f"the chunk is {carried.owner}'s, the send thread read {read}'s task")
        elif read in self._requests:
            expected = self._requests[read]
            actual = (task.get("need_prefill_tokens"), list(task.get("src_block_ids", [])))
            registered = (expected["need_prefill_tokens"], self.blocks_of(read))
            if actual != registered:
                problems.append(f"{read}'s task read has need and blocks {actual}, registered were {registered}")
        if read is not None and not any(d.owner == read and d.slot == slot and d.end >= end for d in self._delivered):
            problems.append(f"sends {read}'s blocks up to token {end} before that chunk was computed")
        return problems
