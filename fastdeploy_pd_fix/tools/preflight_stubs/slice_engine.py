"""The engine process of an engine slice (imported in a slice tree as ``fastdeploy._preflight.slice_engine``).

The release's own engine files run here unmodified: ``ResourceManagerV1``, ``SplitwiseConnector``, the prepare
threads (``_prepare_request_v1`` -> ``_fetch_loop`` -> ``_fetch_request_prefill``) and ``EngineWorkerQueue``: a real
server, and one real client per messager rank. The plugin's engine patch is applied by its start-up hook, through the
same import path as in a deployment. What stands in, our own code:

* :class:`ResourceManager`: the base class of ``ResourceManagerV1`` (slots, a GPU block pool, ``available_batch``);
* :func:`engine_config`: the engine config, only the fields these files read (a missing one raises);
* :class:`Scheduler`: hands each scripted wave of requests to whichever prepare thread asks first;
* :class:`DecodePeer`: the decode instance, answering each request the connector sent it with a ``cache_sync``
  message through the connector's own ``_process_message`` on its ``io_executor`` (the zmq receiver's path);
* :class:`MailboxReader`: what a cache messager's registration loop does with the mailbox (``get_cache_info``, then
  ``cache_info_barrier`` after every non-empty read), recording every item in order;
* the token processor: a request is finished (``finish_requests``) when the scenario says it has run.

It prints one JSON object: the plugin's decisions, each rank's stream, each request's slot. The host side
(:mod:`fastdeploy_pd_fix.tools.engine_slice`) judges it.
"""

import importlib
import json
import logging
import os
import pickle
import sys
import tempfile
import threading
import time
from types import SimpleNamespace

#: Slots of the instance, and GPU blocks (of 64 tokens) in its pool.
MAX_NUM_SEQS = 8
BLOCK_SIZE = 64
NUM_GPU_BLOCKS = 256
#: How long any wait of the slice may take before the run is declared stuck.
STEP_TIMEOUT_S = 20.0
#: The item that ends every rank's read loop (put last, after the scenario's own puts).
END_OF_STREAM = {"request_id": "fd-pd-fix-slice:end"}

logger = logging.getLogger("fastdeploy_pd_fix.slice")


class BlockPool:
    """The GPU block pool of ``ResourceManager.cache_manager``: ids handed out lowest first, no prefix cache."""

    num_cpu_blocks = 0

    def __init__(self, num_blocks: int):
        self.free = list(range(num_blocks))
        self.lock = threading.Lock()

    def can_allocate_gpu_blocks(self, count):
        return len(self.free) >= count

    def allocate_gpu_blocks(self, count, request_id=None):
        with self.lock:
            taken, self.free = self.free[:count], self.free[count:]
        return taken

    def recycle_gpu_blocks(self, block_ids, request_id=None):
        with self.lock:
            self.free = sorted(self.free + list(block_ids))

    def write_cache_to_storage(self, request):
        """No storage backend in the slice."""


class ResourceManager:
    """The base class of the release's ``ResourceManagerV1``: per-slot state and the block pool."""

    def __init__(self, max_num_seqs, config, tensor_parallel_size, splitwise_role, local_data_parallel_id=0):
        self.max_num_seqs = max_num_seqs
        self.cfg = config
        self.stop_flags = [True] * max_num_seqs
        self.tasks_list = [None] * max_num_seqs
        self.req_dict = {}
        self.real_bsz = 0
        self.cache_manager = BlockPool(NUM_GPU_BLOCKS)

    def available_batch(self):
        return sum(1 for free in self.stop_flags if free)

    def available_block_num(self):
        return len(self.cache_manager.free)

    def total_block_number(self):
        return NUM_GPU_BLOCKS

    def get_gpu_cache_usage_perc(self):
        return 1.0 - len(self.cache_manager.free) / NUM_GPU_BLOCKS

    def info(self):
        return f"slice resource manager: {self.available_batch()} free slots"


def engine_config(queue_port: int, nranks: int) -> SimpleNamespace:
    """The engine config, as far as the slice's files read it; any other field raises AttributeError."""
    return SimpleNamespace(
        parallel_config=SimpleNamespace(
            local_data_parallel_id=0,
            data_parallel_size=1,
            local_engine_worker_queue_port=queue_port,
            tensor_parallel_size=nranks,
        ),
        scheduler_config=SimpleNamespace(splitwise_role="prefill", max_num_batched_tokens=8192),
        cache_config=SimpleNamespace(
            block_size=BLOCK_SIZE,
            enc_dec_block_num=0,
            enable_prefix_caching=False,
            kvcache_storage_backend=None,
            local_pd_comm_port=0,
            max_block_num_per_seq=NUM_GPU_BLOCKS,
            max_encoder_cache=0,
            max_processor_cache=0,
        ),
        model_config=SimpleNamespace(max_model_len=8192),
        enable_mm_runtime=False,
        max_prefill_batch=MAX_NUM_SEQS,
    )


class Scheduler:
    """Hands out the scripted waves: each wave is one batch of requests for the first prepare thread that asks."""

    def __init__(self):
        self.lock = threading.Lock()
        self.waves = []
        self.results = []

    def submit(self, requests) -> None:
        with self.lock:
            self.waves.append(list(requests))

    def get_requests(self, *args, **kwargs):
        with self.lock:
            return self.waves.pop(0) if self.waves else []

    def put_results(self, results) -> None:
        with self.lock:
            self.results.extend(results)


class DecodePeer(threading.Thread):
    """The decode instance: answers every request the connector is waiting on (status ``init``) with the
    ``cache_sync`` message the decode side sends (its block ids), delivered the way the connector's receiver
    delivers frames."""

    def __init__(self, connector, stop: threading.Event):
        super().__init__(name="slice-decode-peer", daemon=True)
        self.connector = connector
        self.stop = stop
        self.answered = set()

    def run(self):
        while not self.stop.is_set():
            for request_id, status in list(self.connector.current_request_ids.items()):
                if status == "init" and request_id not in self.answered:
                    self.answered.add(request_id)
                    payload = [{"request_id": request_id, "dest_block_ids": [1000 + len(self.answered)]}]
                    frames = [b"decode", pickle.dumps({"type": "cache_sync", "payload": payload}, protocol=5)]
                    self.connector.io_executor.submit(self.connector._process_message, frames)
            time.sleep(0.001)


class MailboxReader(threading.Thread):
    """One messager rank's registration loop on the mailbox: every item it reads, in order."""

    def __init__(self, queue_class, address, nranks: int, rank: int):
        super().__init__(name=f"slice-rank-{rank}", daemon=True)
        self.queue = queue_class(address=address, is_server=False, num_client=nranks, client_id=rank)
        self.items = []
        self.error = None

    def run(self):
        try:
            while True:
                items = self.queue.get_cache_info()
                if not items:
                    time.sleep(0.001)
                    continue
                self.items.extend(items)
                self.queue.cache_info_barrier.wait(STEP_TIMEOUT_S)
                if any(item.get("request_id") == END_OF_STREAM["request_id"] for item in items):
                    return
        except Exception as error:  # reported by the host side; the run is then not a pass
            self.error = repr(error)


def _wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + STEP_TIMEOUT_S
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"slice stuck: {what} within {STEP_TIMEOUT_S} s")
        time.sleep(0.002)


def _class_defining(module, method: str):
    return next(value for value in vars(module).values() if isinstance(value, type) and method in vars(value))


def _jsonable(item):
    return json.loads(json.dumps(item, default=repr))


def run(modules: dict, nranks: int, waves: list, socket_dir: str) -> dict:
    """Play ``waves`` through the release's engine: each wave a list of requests ``{"id", "prompt", "routed",
    "finish"}`` handed to the scheduler at once; the driver waits until all are admitted, then finishes those with
    ``finish`` (the token processor's ``finish_requests``)."""
    queue_module = importlib.import_module(modules["queue"])
    resource_module = importlib.import_module(modules["resource_manager"])
    connector_module = importlib.import_module(modules["connector"])
    prepare_module = importlib.import_module(modules["prepare"])
    request_module = importlib.import_module(modules["request"])
    queue_class = queue_module.EngineWorkerQueue

    envs = importlib.import_module("fastdeploy").envs
    # The transport the release defaults to: a Unix socket (FD_ENGINE_TASK_QUEUE_WITH_SHM), else TCP.
    address = os.path.join(socket_dir, "task_queue.sock") if envs.FD_ENGINE_TASK_QUEUE_WITH_SHM else ("127.0.0.1", 0)
    server = queue_class(address=address, is_server=True, num_client=nranks)
    # As the engine does: the server holds the mailbox, the engine puts through a client of its own.
    engine_queue = queue_class(address=server.address, is_server=False, num_client=nranks, client_id=0)
    config = engine_config(0, nranks)
    resource_manager = resource_module.ResourceManagerV1(MAX_NUM_SEQS, config, nranks, "prefill")
    connector = connector_module.SplitwiseConnector(config, engine_queue, resource_manager)
    readers = [MailboxReader(queue_class, server.address, nranks, rank) for rank in range(nranks)]
    for reader in readers:
        reader.start()
    stop = threading.Event()
    DecodePeer(connector, stop).start()

    engine = type("SliceEngine", (_class_defining(prepare_module, "_fetch_request_prefill"),), {})()
    engine.cfg, engine.resource_manager, engine.split_connector = config, resource_manager, connector
    engine.scheduler, engine.llm_logger = Scheduler(), logger
    engine.running, engine.is_paused, engine._pause_cond = True, False, threading.Condition()
    threading.Thread(target=engine._prepare_request_v1, name="slice-prepare", daemon=True).start()

    slots = {}
    try:
        for wave in waves:
            requests = []
            for spec in wave:
                info = {"decode_ip": "127.0.0.1", "decode_connector_port": 1} if spec["routed"] else None
                requests.append(
                    request_module.Request(
                        request_id=spec["id"], prompt_token_ids=list(range(spec["prompt"])), disaggregate_info=info
                    )
                )
            engine.scheduler.submit(requests)
            admitted = {spec["id"] for spec in wave}
            _wait_for(
                lambda: admitted <= {request.request_id for request in resource_manager.running},
                f"requests {sorted(admitted)} admitted by add_request_in_p",
            )
            slots.update({request.request_id: request.idx for request in requests})
            finished = [spec["id"] for spec in wave if spec.get("finish")]
            if finished:  # the token processor: get_finished_req reported them (or they were not transferred)
                resource_manager.finish_requests(finished)
        engine_queue.put_cache_info([dict(END_OF_STREAM)])
        for reader in readers:
            reader.join(STEP_TIMEOUT_S)
        stuck = [reader.name for reader in readers if reader.is_alive()]
        if stuck:
            raise TimeoutError(f"slice stuck: {', '.join(stuck)} did not read the end of the stream")
        error = None
    except Exception as failure:
        error = repr(failure)
    finally:
        stop.set()
        engine.running = False

    from fastdeploy_pd_fix.plugin.patching import RECORDS

    return {
        "error": error,
        "decisions": [record.describe() for record in RECORDS],
        "slots": slots,
        "ranks": [_jsonable(reader.items) for reader in readers],
        "rank_errors": [reader.error for reader in readers],
    }


def main() -> int:
    """``python -c 'from fastdeploy._preflight import slice_engine; slice_engine.main()' SPEC_JSON RESULT_PATH``: the
    spec is ``{"modules": {...}, "nranks": N, "waves": [...]}``; the result is written to RESULT_PATH as JSON (stdout
    belongs to the release's loggers)."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    spec, result_path = json.loads(sys.argv[1]), sys.argv[2]
    with tempfile.TemporaryDirectory(prefix="fd-pd-fix-slice-") as socket_dir:
        result = run(spec["modules"], spec["nranks"], spec["waves"], socket_dir)
    with open(result_path, "w", encoding="utf-8") as out:
        json.dump(result, out)
    return 0
