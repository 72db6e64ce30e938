"""The engine around a real ``cache_messager.py`` in the preflight tree (imported there as
``fastdeploy._preflight.engine``), built on the stand-in's machinery.

* :class:`EngineWorkerQueue`: a client of the harness's engine process (the stand-in's manager: real
  ``threading.Barrier(nranks)`` objects, no timeout, the ranks' reports recorded). The registration stream is the
  scenario's cache-info reads, each request as FastDeploy's engine puts it: the prefill side's part, then the decode
  side's with what a send loop needs to reach the decode instance (``transfer_protocol``, ``ip``, ``rdma_ports``,
  ``device_ids``). ``put_finished_req`` is the engine reading finished requests.
* :class:`IPCSignal`: process-local arrays. Setting ``cache_ready_signal`` (every release does, right before it
  enters its send loop) is the moment the engine starts sending requests: :func:`on_cache_ready` starts the tap.
* The tap observes without touching the file: it wraps ``put`` and ``get`` of the messager's
  ``cache_prefilled_engine_ids_queue`` on the instance (as the plugin's own observer does) to see each batch queued
  and record each batch the send loop takes, and the queue's ``begin_send_cache_barrier`` to check, after the
  barrier, the task each slot of the batch holds against the ground truth (the send loop reads it right then). What
  it does at those points is its player's: :class:`ScriptedPlay` (preflight: the stand-in's scenario script applies
  its ``stall``/``hold``/``drain`` controls, a rank leaves with code 0 when its send loop comes back for a batch after
  every request finished, as the stand-in's does) or, in a rank of an engine slice, :mod:`.slice_rank` (reports to
  the slice engine). In a slice rank :data:`EngineWorkerQueue` is the release's own mailbox client under the same
  tap (:class:`TappedQueue`).
* :class:`TransferManager`: the IPC and RDMA managers; every connect and write succeeds.
"""

import logging
import sys
import threading
import time

import numpy as np
from fastdeploy._preflight import slice_rank
from fastdeploy._preflight.barriers import HookedBarrier
from fastdeploy._preflight.names import Permissive
from fastdeploy._preflight.standin_queue import EngineWorkerQueue as StandinQueue
from fastdeploy.pd_fix_standin import script

logger = logging.getLogger("fastdeploy_pd_fix.preflight")
#: The queue attribute every CacheMessagerV1 sends from; its owner is the messager the tap watches.
BATCH_QUEUE = "cache_prefilled_engine_ids_queue"
#: Where the decode side of every scenario request lives (never contacted: the transfer managers are stubs).
DECODE_IP = "127.0.0.1"
#: How long an idle poll of a connect task waits before it answers "none" (keeps the release's polling loop cool).
IDLE_POLL_S = 0.05
#: How long the tap waits for the plugin to finish activating on the messager (it wraps the same queue's get).
PLUGIN_ACTIVATION_TIMEOUT_S = 60.0

_queues = []
_tap = {"active": False, "messager": None, "held": None, "lock": threading.Lock()}
_idle = threading.Event()


class ScriptedPlay:
    """The tap's player in preflight: the stand-in's scenario script (:mod:`fastdeploy.pd_fix_standin.script`)."""

    activate = staticmethod(script.activate)
    took = staticmethod(script.record_batch)

    @staticmethod
    def queued(batch):
        """Preflight's scenarios judge the batches taken, not when they were queued."""

    finished = staticmethod(script.record_finished)

    @staticmethod
    def before_take():
        script.batch_sent()  # back at the queue: done with the previous batch
        if script.all_requests_finished():
            script.exit_process()
        script.wait_to_take()

    @staticmethod
    def at_send(batch, tasks):
        script.wait_to_send()
        script.check_sent_tasks(batch, tasks)


#: What the tap does at each point it observes (see the module docstring).
player = slice_rank if slice_rank.SLICE else ScriptedPlay


class TappedQueue:
    """The tap on a messager's queue to the engine, over whichever client class follows it in the MRO: it knows its
    messager (whose ``__init__`` creates it), wraps ``begin_send_cache_barrier`` and reports finished requests."""

    def __init__(self, *args, **kwargs):
        caller = sys._getframe(1)
        while caller.f_locals.get("self") is self:  # a subclass's __init__: its caller is the messager
            caller = caller.f_back
        super().__init__(*args, **kwargs)
        self.owner = caller.f_locals.get("self")
        # As the send loop sees it: the real barrier, then the player's send check.
        self.begin_send_cache_barrier = HookedBarrier(self.begin_send_cache_barrier, _play_held_batch)
        _queues.append(self)

    def put_finished_req(self, finished_reqs):
        super().put_finished_req(finished_reqs)
        if _tap["active"]:
            for request_id, *_ in finished_reqs:
                player.finished(request_id)

    def get_connect_rdma_task(self):
        """No decode instance asks to connect."""
        _idle.wait(IDLE_POLL_S)
        return None, None


class StandinEngineWorkerQueue(TappedQueue, StandinQueue):
    """Preflight's queue to the engine (a client of the harness's engine process)."""

    def __init__(
        self, address=("127.0.0.1", 0), is_server=False, num_client=1, client_id=-1, local_data_parallel_id=0, **_
    ):
        super().__init__(
            address=tuple(address),
            is_server=False,
            num_client=num_client,
            client_id=client_id,
            local_data_parallel_id=local_data_parallel_id,
        )

    def get_cache_info(self):
        parts = super().get_cache_info()
        for part in parts:
            if "dest_block_ids" in part:  # the decode side's answer: where the blocks go, and how
                part.setdefault("transfer_protocol", "rdma")
                part.setdefault("ip", DECODE_IP)
                part.setdefault("rdma_ports", [str(7000 + rank) for rank in range(self.num_client)])
                part.setdefault("device_ids", list(range(self.num_client)))
        return parts

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        print(f"fastdeploy_pd_fix preflight: EngineWorkerQueue.{name} is not stubbed", file=sys.stderr)
        return Permissive()


class _ReadySignal(np.ndarray):
    """The value of ``cache_ready_signal``: a rank marking itself ready starts the engine's requests."""

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        on_cache_ready()


class IPCSignal:
    """A process-local array where FastDeploy shares memory between processes (nobody else reads it here)."""

    def __init__(self, name="", array=None, dtype=None, suffix=None, create=True, **_):
        self.name = name
        value = np.array(array if array is not None else [0], dtype=dtype)
        self.value = value.view(_ReadySignal) if name == "cache_ready_signal" else value

    def clear(self):
        pass

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return Permissive()


def shared_memory_exists(name):
    return False


class TransferManager:
    """``IPCCommManager`` / ``RDMACommManager``: every connection and write succeeds at once."""

    def __init__(self, *args, **kwargs):
        self.writes = 0

    def connect(self, *args, **kwargs):
        return True

    def write_cache(self, *args, **kwargs):
        self.writes += 1
        return 0

    def write_block_by_sync(self, *args, **kwargs):
        return 0

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return Permissive()


def _wait_for_plugin(messager):
    """When the plugin patched the class, wait until it activated on this messager: activation wraps the same
    queue's ``get`` (from the messager's own threads), and the tap must wrap after it, never concurrently."""
    patch = sys.modules.get("fastdeploy_pd_fix.plugin.messager.patch")
    runtime = sys.modules.get("fastdeploy_pd_fix.plugin.messager.runtime")
    if patch is None or runtime is None or patch.STATE_ATTRIBUTE not in vars(type(messager)):
        return
    deadline = time.monotonic() + PLUGIN_ACTIVATION_TIMEOUT_S
    while runtime.RUNTIME_ATTRIBUTE not in vars(messager) and time.monotonic() < deadline:
        time.sleep(0.002)  # detection only: nothing is delivered before the tap starts


def _play_held_batch():
    """The player's send point, with the task each slot of the held batch holds, read as the send loop reads it
    (nothing before the tap is active: it has no messager then)."""
    messager, batch = _tap["messager"], _tap["held"]
    if messager is None or batch is None:
        return
    tasks = getattr(messager, "idx_cache_task_dict", {})
    player.at_send(batch, [tasks[slot] if slot in tasks else None for slot, _ in batch])


def on_cache_ready():
    """The messager reported its cache ready (main thread, right before its send loop): start playing."""
    with _tap["lock"]:
        if _tap["active"]:
            return
        queue = next((queue for queue in reversed(_queues) if hasattr(queue.owner, BATCH_QUEUE)), None)
        if queue is None:
            print(f"fastdeploy_pd_fix preflight: no messager with {BATCH_QUEUE}, nothing to play", file=sys.stderr)
            return
        messager = queue.owner
        _wait_for_plugin(messager)
        batch_queue = getattr(messager, BATCH_QUEUE)
        original_get, original_put = batch_queue.get, batch_queue.put

        def put(batch, *args, **kwargs):
            player.queued(batch)
            return original_put(batch, *args, **kwargs)

        def get(*args, **kwargs):
            player.before_take()
            batch = original_get(*args, **kwargs)
            _tap["held"] = [[int(slot), int(token_num)] for slot, token_num in batch]
            player.took(batch)
            return batch

        batch_queue.get, batch_queue.put = get, put
        _tap.update(active=True, messager=messager)
    player.activate(rank=queue.client_id, block_size=int(getattr(messager, "block_size", 64)), send_queue=batch_queue)


#: The messager's ``EngineWorkerQueue``: in an engine slice the release's own, else the stand-in's; tapped either way.
#: Last in this module: the release's mailbox module imports names of it (``IPCSignal``).
EngineWorkerQueue = (
    type("EngineWorkerQueue", (TappedQueue, slice_rank.GatedMailbox, slice_rank.release_queue_class()), {})
    if slice_rank.SLICE
    else StandinEngineWorkerQueue
)
