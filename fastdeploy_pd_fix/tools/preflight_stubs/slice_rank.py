"""A real ``cache_messager.py`` rank of an engine slice (in a slice tree: ``fastdeploy._preflight.slice_rank``).

The engine slice's engine process launches the release's ``cache_messager.py`` as a script (:mod:`.slice_messagers`),
one process per rank, with :data:`ENV_SLICE` set. In such a rank:

* the messager's ``EngineWorkerQueue`` is the release's own class (a real client of the slice engine's mailbox and
  barriers) under the preflight tap (:mod:`.engine`);
* :func:`get_output_kv_signal` reads the kv signals the slice engine's scheduler emits for this rank, one message
  per layer per step, from a channel of its own (a ``multiprocessing.connection`` to the engine process), and writes
  each into the op's buffer as the release's C++ op does;
* this module is the tap's player: it reports on the channel that the rank is ready (with the plugin's decision
  records of this process), every batch its send loop takes, every send with the tasks it read and their
  ground-truth violations, and every request it reported finished;
* :class:`Interleaving` forces an order between the rank's two threads where the scenario asks for one, by
  handshakes (never sleeps): ``"reg:<request id>"``, the registration thread storing the mailbox read that completes
  that request's registration (held after the read's ``cache_info_barrier``, so that every rank reads it), and
  ``"sig:<episode>:<n>"``, the signal thread consuming the n-th layer-0 signal of an episode (the engine starts each
  episode of a run with an ``("episode", number)`` message on the channel, ahead of its signals). Each scheduled
  event is let through once the one before it was acknowledged (its thread came back for more); events not in the
  schedule pass freely;
* for the latency benchmark it reports, with every batch put into ``cache_prefilled_engine_ids_queue``, how long
  ago the layer-0 signal of each of its tasks was returned by the op.

Ground truth of a send, as in preflight (``fastdeploy.pd_fix_standin.ground_truth``): each layer-0 signal message
names, per task, the request the scheduler computed it for and that request's blocks; the send is checked against what
this rank had received when its send loop passed ``begin_send_cache_barrier``.
"""

import importlib
import json
import os
import sys
import threading
import time
from multiprocessing.connection import Client

import numpy as np
from fastdeploy._preflight.barriers import HookedBarrier
from fastdeploy.pd_fix_standin.ground_truth import GroundTruth

#: Set in a slice rank's environment: JSON ``{"channel": address, "queue_module": module, "requests": {id: need},
#: "interleaving": [event, ...]}`` (the engine's channel listener, the release module of the mailbox class, each
#: routed request's prompt length, this rank's forced order of events).
ENV_SLICE = "FD_PREFLIGHT_SLICE"
#: The key of the engine's channel listener (a Unix socket in the engine's private temporary folder).
CHANNEL_AUTHKEY = b"fd-pd-fix-slice"
#: The mailbox class the slice engine serves, in the release module named by :data:`ENV_SLICE`.
QUEUE_CLASS = "EngineWorkerQueue"
#: Entries of the kv signal buffer: ``[tasks_count, layer_id, (slot, chunk_offset, chunk_length) x 512]``.
KV_SIGNAL_LENGTH = 512 * 3 + 2
#: How long a non-blocking read of the op waits for a signal before it reports none (keeps polling loops cool).
NON_BLOCKING_WAIT_S = 0.005

SLICE = json.loads(os.environ[ENV_SLICE]) if os.environ.get(ENV_SLICE) else None


def release_queue_class():
    """The release's mailbox class, the one the slice engine serves."""
    return getattr(importlib.import_module(SLICE["queue_module"]), QUEUE_CLASS)


class SliceGroundTruth(GroundTruth):
    """Preflight's ground truth, fed as the signals arrive: the engine names each task's request and that request's
    blocks (allocated by the release's resource manager, not numbered by a scenario)."""

    def __init__(self, requests, block_size):
        self._arrived, self._arrived_owners, self._blocks = [], [], {}
        registrations = [
            [{"request_id": rid, "slot": -1, "need_prefill_tokens": need}] for rid, need in requests.items()
        ]
        # GroundTruth reads the signal and owner lists it is given as they grow: each arrival appends to both.
        super().__init__(
            {"signals": self._arrived, "owners": self._arrived_owners, "registrations": registrations}, block_size
        )

    def blocks_of(self, request_id):
        return self._blocks[request_id]

    def arrived(self, tasks, owners, blocks):
        """A layer-0 signal reached this rank: its chunks are computed."""
        self._blocks.update(blocks)
        self._arrived.append(tasks)
        self._arrived_owners.append(owners)
        self.note_delivered(len(self._arrived) - 1)


class Interleaving:
    """This rank's forced order of scheduled events (see the module docstring)."""

    def __init__(self, events):
        self.events = list(events)
        self.position = 0
        self.unacknowledged = None
        self.condition = threading.Condition()

    def enter(self, event) -> None:
        """Block until ``event`` is due: the next of the schedule, its predecessor acknowledged (unscheduled: now)."""
        if event not in self.events:
            return
        with self.condition:
            self.condition.wait_for(
                lambda: self.unacknowledged is None
                and self.position < len(self.events)
                and self.events[self.position] == event
            )
            self.unacknowledged = event

    def acknowledge(self, event) -> None:
        """``event``'s thread came back for more: it is done with it."""
        with self.condition:
            if event is not None and self.unacknowledged == event:
                self.unacknowledged = None
                self.position += 1
                self.condition.notify_all()


class GatedMailbox:
    """The registration side of the release's mailbox client (before it in the MRO): reads that complete a
    request's registration are held, after their ``cache_info_barrier``, as the :class:`Interleaving` says."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # As the registration thread sees it: the real barrier, then the scheduled hold.
        self.cache_info_barrier = HookedBarrier(self.cache_info_barrier, _rank.hold_registrations)

    def get_cache_info(self):
        _rank.registration_back()
        items = super().get_cache_info()
        _rank.read(items)
        return items


class _Rank:
    """This rank's end of the channel, once the messager reported its cache ready."""

    def __init__(self):
        self.ready = threading.Event()
        self.connection = None
        self.send_lock = threading.Lock()
        self.ground_truth = None
        self.interleaving = Interleaving(SLICE["interleaving"] if SLICE else ())
        self.parts = {}  # request id -> the cache-info parts read ("src_block_ids": prefill, "dest_block_ids": decode)
        self.completing = []  # the registrations the last read completes
        self.entered_registration = None
        self.entered_signal = None
        self.episode = 0
        self.layer0_signals = 0
        self.signal_returned = {}  # (slot, prefilled_token_num) -> when the op returned its layer-0 signal

    def report(self, *message):
        with self.send_lock:
            self.connection.send(message)

    def registration_back(self):
        """The registration thread is back for another read: done with the registrations it stored."""
        self.interleaving.acknowledge(self.entered_registration)

    def read(self, items):
        """A mailbox read: report what it holds (per item its request id and ``P``, ``D`` or a notice's kind), and
        note which registrations it completes (both cache-info parts of the request read)."""
        if items:
            self.report("read", [[item.get("request_id"), _part(item)] for item in items])
        self.completing = []
        for item in items:
            parts = self.parts.setdefault(item.get("request_id"), set())
            before = len(parts)
            parts.update(part for part in ("src_block_ids", "dest_block_ids") if part in item)
            if len(parts) == 2 and before < 2:
                self.completing.append(item["request_id"])

    def hold_registrations(self):
        """After the read's barrier: wait until each registration it completes is due (several: one after another)."""
        for request_id in self.completing:
            self.interleaving.acknowledge(self.entered_registration)
            self.entered_registration = f"reg:{request_id}"
            self.interleaving.enter(self.entered_registration)

    def begin_episode(self, number):
        """The engine starts episode ``number``: its layer-0 signals are counted from 0."""
        self.episode, self.layer0_signals = number, 0

    def signal_arrived(self, layer, tasks):
        """A signal is about to be consumed: a layer-0 one waits until it is due, then its return time is noted."""
        if layer == 0:
            self.entered_signal = f"sig:{self.episode}:{self.layer0_signals}"
            self.layer0_signals += 1
            self.interleaving.enter(self.entered_signal)
            returned = time.perf_counter()
            for slot, offset, length in tasks:
                self.signal_returned[(slot, offset + length)] = returned


_rank = _Rank()


def _part(item) -> str:
    """What a cache-info item is: the prefill side's part ``P``, the decode side's ``D``, or a notice's kind."""
    if "src_block_ids" in item:
        return "P"
    return "D" if "dest_block_ids" in item else str(item.get("kind"))


def _decisions():
    patching = sys.modules.get("fastdeploy_pd_fix.plugin.patching")
    return [record.describe() for record in patching.RECORDS] if patching is not None else []


def activate(rank, block_size, send_queue=None):
    """The messager reported its cache ready: connect to the engine and say so (the engine then sends requests)."""
    _rank.connection = Client(SLICE["channel"], family="AF_UNIX", authkey=CHANNEL_AUTHKEY)
    _rank.ground_truth = SliceGroundTruth(SLICE["requests"], block_size)
    _rank.report("ready", rank, os.getpid(), _decisions())
    _rank.ready.set()


def get_output_kv_signal(*args):
    """The kv-signal op, ``(buf, rank_id, wait_flag)`` or ``(buf, rank_id, device_id, wait_flag)``: the next signal
    the engine sent this rank, or ``buf[0:2] = -1`` when none came (``wait_flag`` 0; a truthy one blocks)."""
    if len(args) not in (3, 4):
        raise TypeError(f"get_output_kv_signal takes 3 or 4 positional arguments, got {len(args)}")
    buf, wait_flag = args[0], int(args[-1])
    _rank.ready.wait()
    _rank.interleaving.acknowledge(_rank.entered_signal)  # back for more: done with the previous signal
    while True:
        if not wait_flag and not _rank.connection.poll(NON_BLOCKING_WAIT_S):
            buf[0:2] = -1
            return
        message = _rank.connection.recv()
        if message[0] != "episode":
            break
        _rank.begin_episode(message[1])
    _, layer, tasks, owners, blocks = message
    _rank.signal_arrived(layer, tasks)
    if layer == 0:
        _rank.ground_truth.arrived(tasks, owners, blocks)
    values = np.full([KV_SIGNAL_LENGTH], -1, dtype=np.int32)
    values[0:2] = (len(tasks), layer)
    for position, task in enumerate(tasks):
        values[2 + 3 * position : 5 + 3 * position] = task
    buf.set_value(values)


def before_take():
    """The send loop is back for a batch: nothing to wait for (the engine ends the rank when the run is over)."""


def queued(batch):
    """A batch goes into ``cache_prefilled_engine_ids_queue``: report it with, per task, the seconds since the op
    returned its layer-0 signal (None for a task whose signal this rank has not seen)."""
    now = time.perf_counter()
    tasks = [(int(slot), int(token_num)) for slot, token_num in batch]
    returned = [_rank.signal_returned.pop(task, None) for task in tasks]
    waited = [None if at is None else now - at for at in returned]
    _rank.report("queued", [list(task) for task in tasks], waited)


def took(batch):
    _rank.report("batch", [[int(slot), int(token_num)] for slot, token_num in batch])


def at_send(batch, tasks):
    """The send loop passed the batch's begin barrier and is about to read ``tasks``: check them, report the send."""
    violations = _rank.ground_truth.check_batch(batch, tasks)
    _rank.report("send", batch, [None if task is None else task.get("request_id") for task in tasks], violations)


def finished(request_id):
    _rank.report("finished", request_id)
