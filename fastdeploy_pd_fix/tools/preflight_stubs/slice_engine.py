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
* the messager ranks, either :class:`MailboxReader` threads (what a cache messager's registration loop does with the
  mailbox: ``get_cache_info``, then ``cache_info_barrier`` after every non-empty read, recording every item in
  order; :func:`run`), or the release's own ``cache_messager.py`` run unmodified as a script in one process per rank
  (:class:`MessagerRanks`, :func:`run_with_messagers`): real clients of the mailbox, kv signals from the
  :class:`Worker` through a channel per rank (:mod:`.slice_rank`), the preflight tap reporting their batches, sends
  and ground truth back;
* :class:`Worker`: the model runner, stepping admitted requests and emitting one kv signal per layer per step;
* the token processor: with :class:`MailboxReader` ranks a request is finished (``finish_requests``) when the scenario
  says it has run; with real ranks an orphan once computed, a routed request once ``get_finished_req`` reported its
  transfer (:class:`TokenProcessor`).

It writes one JSON object: the plugin's decisions, each request's slot, and each rank's stream (readers) or reports
(real ranks). The host side (:mod:`fastdeploy_pd_fix.tools.engine_slice`) judges it.
"""

import ast
import importlib
import json
import logging
import os
import pickle
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing.connection import Listener
from pathlib import Path
from types import SimpleNamespace

from fastdeploy._preflight.slice_rank import CHANNEL_AUTHKEY, ENV_SLICE

#: Slots of the instance, and GPU blocks (of 64 tokens) in its pool.
MAX_NUM_SEQS = 8
BLOCK_SIZE = 64
NUM_GPU_BLOCKS = 256
#: How long any wait of the slice may take before the run is declared stuck.
STEP_TIMEOUT_S = 20.0
#: The item that ends every rank's read loop (put last, after the scenario's own puts).
END_OF_STREAM = {"request_id": "fd-pd-fix-slice:end"}
#: Real messager ranks: layers of the model (one kv signal per layer per step), tokens a request computes per step at
#: most (a longer prompt is prefilled in chunks), and how long the ranks may take to start (they import paddle).
NUM_LAYERS = 2
CHUNK_TOKENS = 512
STARTUP_TIMEOUT_S = 90.0
#: What a rank reports on its channel (:mod:`.slice_rank`).
REPORT_KINDS = ("ready", "batch", "send", "finished")
#: The decode instance: its blocks are numbered from here (per request), its RDMA ports from here (per rank).
DECODE_BLOCK_BASE = 10000
DECODE_RDMA_PORT = 7000

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
    ``cache_sync`` message the decode side sends (as many block ids as the request has on the prefill side),
    delivered the way the connector's receiver delivers frames."""

    def __init__(self, connector, resource_manager, stop: threading.Event):
        super().__init__(name="slice-decode-peer", daemon=True)
        self.connector = connector
        self.resource_manager = resource_manager
        self.stop = stop
        self.answered = set()

    def run(self):
        while not self.stop.is_set():
            for request_id, status in list(self.connector.current_request_ids.items()):
                if status == "init" and request_id not in self.answered:
                    self.answered.add(request_id)
                    count = len(self.resource_manager.requests[request_id].block_tables)
                    first = DECODE_BLOCK_BASE * len(self.answered)
                    payload = [{"request_id": request_id, "dest_block_ids": list(range(first, first + count))}]
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


class Stuck(TimeoutError):
    """A wait of the slice did not end within its deadline: the run hangs."""


def _wait_for(condition, what: str, timeout_s: float = STEP_TIMEOUT_S, failure=lambda: "") -> None:
    """Wait until ``condition()``; :class:`Stuck` after ``timeout_s``, RuntimeError as soon as ``failure()`` says why
    the wait cannot end (a rank process died). Polls: detection only, nothing is ordered by it."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        why = failure()
        if why:
            raise RuntimeError(f"{why} while waiting for {what}")
        if time.monotonic() > deadline:
            raise Stuck(f"slice stuck: {what} within {timeout_s:.1f} s")
        time.sleep(0.002)


def _class_defining(module, method: str):
    return next(value for value in vars(module).values() if isinstance(value, type) and method in vars(value))


def _jsonable(item):
    return json.loads(json.dumps(item, default=repr))


def _disaggregate_info(nranks: int) -> dict:
    """A routed request's ``disaggregate_info``: where its decode instance is and how its cache gets there."""
    return {
        "decode_ip": "127.0.0.1",
        "decode_connector_port": 1,
        "transfer_protocol": "rdma",
        "decode_rdma_ports": [str(DECODE_RDMA_PORT + rank) for rank in range(nranks)],
        "decode_tp_size": nranks,
    }


def start_engine(modules: dict, nranks: int, address) -> SimpleNamespace:
    """The release's engine on the mailbox served at ``address``: resource manager, connector (with the decode peer
    answering it) and prepare threads, fed by a :class:`Scheduler`."""
    queue_class = importlib.import_module(modules["queue"]).EngineWorkerQueue
    server = queue_class(address=address, is_server=True, num_client=nranks)
    # As the engine does: the server holds the mailbox, the engine puts through a client of its own.
    engine_queue = queue_class(address=server.address, is_server=False, num_client=nranks, client_id=0)
    config = engine_config(0, nranks)
    resource_manager = importlib.import_module(modules["resource_manager"]).ResourceManagerV1(
        MAX_NUM_SEQS, config, nranks, "prefill"
    )
    connector = importlib.import_module(modules["connector"]).SplitwiseConnector(
        config, engine_queue, resource_manager
    )
    stop = threading.Event()
    DecodePeer(connector, resource_manager, stop).start()
    prepare_class = _class_defining(importlib.import_module(modules["prepare"]), "_fetch_request_prefill")
    engine = type("SliceEngine", (prepare_class,), {})()
    engine.cfg, engine.resource_manager, engine.split_connector = config, resource_manager, connector
    engine.scheduler, engine.llm_logger = Scheduler(), logger
    engine.running, engine.is_paused, engine._pause_cond = True, False, threading.Condition()
    return SimpleNamespace(
        queue_class=queue_class,
        server=server,
        engine_queue=engine_queue,
        resource_manager=resource_manager,
        engine=engine,
        request_class=importlib.import_module(modules["request"]).Request,
        stop=stop,
        nranks=nranks,
    )


def start_prepare_threads(engine) -> None:
    threading.Thread(target=engine.engine._prepare_request_v1, name="slice-prepare", daemon=True).start()


def stop_engine(engine) -> None:
    engine.stop.set()
    engine.engine.running = False


def admit(engine, wave: list, timeout_s: float = STEP_TIMEOUT_S, failure=lambda: "") -> list:
    """Hand one wave of requests ``{"id", "prompt", "routed"}`` to the scheduler; the release's requests once
    ``add_request_in_p`` admitted all of them."""
    requests = [
        engine.request_class(
            request_id=spec["id"],
            prompt_token_ids=list(range(spec["prompt"])),
            disaggregate_info=_disaggregate_info(engine.nranks) if spec["routed"] else None,
        )
        for spec in wave
    ]
    engine.engine.scheduler.submit(requests)
    admitted = {spec["id"] for spec in wave}
    _wait_for(
        lambda: admitted <= {request.request_id for request in engine.resource_manager.running},
        f"requests {sorted(admitted)} admitted by add_request_in_p",
        timeout_s,
        failure,
    )
    return requests


def run(modules: dict, nranks: int, waves: list, socket_dir: str) -> dict:
    """Play ``waves`` through the release's engine with :class:`MailboxReader` ranks: each wave a list of requests
    ``{"id", "prompt", "routed", "finish"}`` handed to the scheduler at once; the driver waits until all are admitted,
    then finishes those with ``finish`` (the token processor's ``finish_requests``)."""
    envs = importlib.import_module("fastdeploy").envs
    # The transport the release defaults to: a Unix socket (FD_ENGINE_TASK_QUEUE_WITH_SHM), else TCP.
    address = os.path.join(socket_dir, "task_queue.sock") if envs.FD_ENGINE_TASK_QUEUE_WITH_SHM else ("127.0.0.1", 0)
    engine = start_engine(modules, nranks, address)
    readers = [MailboxReader(engine.queue_class, engine.server.address, nranks, rank) for rank in range(nranks)]
    for reader in readers:
        reader.start()
    start_prepare_threads(engine)
    slots = {}
    try:
        for wave in waves:
            slots.update({request.request_id: request.idx for request in admit(engine, wave)})
            finished = [spec["id"] for spec in wave if spec.get("finish")]
            if finished:  # the token processor: get_finished_req reported them (or they were not transferred)
                engine.resource_manager.finish_requests(finished)
        engine.engine_queue.put_cache_info([dict(END_OF_STREAM)])
        for reader in readers:
            reader.join(STEP_TIMEOUT_S)
        stuck = [reader.name for reader in readers if reader.is_alive()]
        if stuck:
            raise Stuck(f"slice stuck: {', '.join(stuck)} did not read the end of the stream")
        error = None
    except Exception as failure:
        error = repr(failure)
    finally:
        stop_engine(engine)
    return {
        "error": error,
        "decisions": _decisions(),
        "slots": slots,
        "ranks": [_jsonable(reader.items) for reader in readers],
        "rank_errors": [reader.error for reader in readers],
    }


def _decisions() -> list:
    from fastdeploy_pd_fix.plugin.patching import RECORDS

    return [record.describe() for record in RECORDS]


class MessagerRanks:
    """The release's ``cache_messager.py``, one process per rank launched as the engine launches it, each with its
    channel (:mod:`.slice_rank`): the kv signals of the :class:`Worker` go to it, its reports come back (readiness,
    the batches its send loop took, its sends with their ground-truth violations, the requests it finished)."""

    def __init__(
        self, script: str, nranks: int, queue: tuple, socket_dir: str, log_dir: str, routed: dict, interleaving: list
    ):
        """``queue``: the module of the mailbox class and the port it is served on; ``routed``: request id -> prompt
        length of every routed request (the ranks' ground truth); ``interleaving``: per rank, its forced order of
        events (:class:`.slice_rank.Interleaving`; ranks beyond the list repeat its last, none: free)."""
        from fastdeploy_pd_fix.tools import preflight_tree

        self.nranks = nranks
        self.listener = Listener(os.path.join(socket_dir, "kv_signals.sock"), "AF_UNIX", authkey=CHANNEL_AUTHKEY)
        self.connections = {}
        self.reports = {rank: {kind: [] for kind in REPORT_KINDS} for rank in range(nranks)}
        self.lock = threading.Lock()
        options = preflight_tree.parser_options(ast.parse(Path(script).read_bytes()))
        os.makedirs(log_dir, exist_ok=True)
        environment = dict(os.environ, FD_LOG_DIR=log_dir, OMP_NUM_THREADS="1")
        self.processes = []
        for rank in range(nranks):
            events = interleaving[min(rank, len(interleaving) - 1)] if interleaving else []
            environment[ENV_SLICE] = json.dumps(
                {
                    "channel": self.listener.address,
                    "queue_module": queue[0],
                    "requests": routed,
                    "interleaving": events,
                }
            )
            arguments = preflight_tree.command_line(options, rank, nranks, queue[1], NUM_LAYERS)
            with open(os.path.join(log_dir, f"launch_cache_messager_{rank}.log"), "wb") as launch_log:
                self.processes.append(
                    subprocess.Popen(
                        [sys.executable, script, *arguments],
                        stdout=launch_log,
                        stderr=subprocess.STDOUT,
                        env=environment,
                        cwd=log_dir,
                    )
                )
        threading.Thread(target=self._accept, name="slice-channel", daemon=True).start()

    def _accept(self):
        for _ in range(self.nranks):
            connection = self.listener.accept()
            kind, rank, *details = connection.recv()
            self._record(rank, kind, details)
            with self.lock:
                self.connections[rank] = connection
            threading.Thread(
                target=self._read, args=(rank, connection), name=f"slice-reports-{rank}", daemon=True
            ).start()

    def _read(self, rank, connection):
        while True:
            try:
                kind, *details = connection.recv()
            except (EOFError, OSError):
                return
            self._record(rank, kind, details)

    def _record(self, rank, kind, details):
        with self.lock:
            self.reports[rank][kind].append(details[0] if len(details) == 1 else details)

    def all_ready(self) -> bool:
        with self.lock:
            return len(self.connections) == self.nranks

    def wait_until_ready(self) -> None:
        """Wait for every rank's "ready" (its cache ready, right before its send loop); one that never says so did not
        start (an error, not a hang)."""
        try:
            _wait_for(self.all_ready, "every messager rank reporting its cache ready", STARTUP_TIMEOUT_S, self.died)
        except Stuck as stuck:
            raise RuntimeError(str(stuck)) from None

    def died(self) -> str:
        """Why the run cannot go on: the ranks that exited (every rank runs until the engine ends it)."""
        dead = {rank: process.poll() for rank, process in enumerate(self.processes) if process.poll() is not None}
        return f"messager ranks exited: {dead}" if dead else ""

    def emit(self, layer: int, tasks: list, owners: list, blocks: dict) -> None:
        """One kv signal to every rank: ``tasks`` ``(slot, chunk offset, chunk length)``, with ground truth (the
        request each task was computed for, the blocks of the routed ones)."""
        for rank in range(self.nranks):
            self.connections[rank].send(("signal", layer, tasks, owners, blocks))

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            process.wait()
        self.listener.close()


class Worker:
    """The model runner: each :meth:`step` computes one chunk (up to :data:`CHUNK_TOKENS`) of every admitted request
    still in prefill and emits one kv signal per layer listing them all, as the release's kv-signal writer lists
    every batch index with ``seq_lens_encoder > 0`` (orphans included)."""

    def __init__(self, resource_manager, ranks: MessagerRanks):
        self.resource_manager = resource_manager
        self.ranks = ranks
        self.computed = {}  # request id -> tokens computed

    def in_prefill(self) -> list:
        return [
            request
            for request in list(self.resource_manager.running)
            if self.computed.get(request.request_id, 0) < request.need_prefill_tokens
        ]

    def step(self) -> list:
        """Compute one step; the requests whose prefill it completed."""
        requests = self.in_prefill()
        chunks = []
        for request in requests:
            offset = self.computed.get(request.request_id, 0)
            chunks.append((request.idx, offset, min(CHUNK_TOKENS, request.need_prefill_tokens - offset)))
        owners = [request.request_id for request in requests]
        blocks = {request.request_id: list(request.block_tables) for request in requests if request.disaggregate_info}
        for layer in range(NUM_LAYERS):
            self.ranks.emit(layer, chunks, owners, blocks)
        for request, (_, offset, length) in zip(requests, chunks):
            self.computed[request.request_id] = offset + length
        return [request for request in requests if self.computed[request.request_id] == request.need_prefill_tokens]


class TokenProcessor(threading.Thread):
    """The token processor's part of a routed request: it polls ``get_finished_req`` and frees each reported request
    (``finish_requests``), as release/2.6's ``_recycle_resources`` does: a routed request's slot is freed only after
    its transfer was reported finished through the mailbox."""

    def __init__(self, engine):
        super().__init__(name="slice-token-processor", daemon=True)
        self.engine = engine
        self.reported = []

    def run(self):
        while not self.engine.stop.is_set():
            for request_id, status in self.engine.engine_queue.get_finished_req():
                self.reported.append([request_id, status])
                self.engine.resource_manager.finish_requests([request_id])
            time.sleep(0.001)


def run_with_messagers(modules: dict, nranks: int, scenario: dict, socket_dir: str, messager: dict) -> dict:
    """Play ``scenario["waves"]`` through the release's engine with real messager ranks (``messager``: ``{"script",
    "log_dir", "deadline_s"}``). Each wave is admitted, then (unless ``scenario["compute_after"]`` says False for it)
    the worker steps until every admitted request is computed; a request without ``disaggregate_info`` (an orphan)
    finishes once computed, a routed one when the token processor has its transfer reported. ``scenario
    ["interleaving"]``: per rank, the order its threads must see events in. The run ends "finished" when every routed
    request was reported and freed, "hang" when that did not happen within ``deadline_s`` of every rank reporting its
    cache ready, "error" when a rank died or a step failed."""
    waves = scenario["waves"]
    compute_after = scenario.get("compute_after", [True] * len(waves))
    envs = importlib.import_module("fastdeploy").envs
    if envs.FD_ENGINE_TASK_QUEUE_WITH_SHM:
        raise ValueError("real messager ranks reach the engine over TCP here: set FD_ENGINE_TASK_QUEUE_WITH_SHM=0")
    engine = start_engine(modules, nranks, ("127.0.0.1", 0))
    routed = {spec["id"]: spec["prompt"] for wave in waves for spec in wave if spec["routed"]}
    queue = (modules["queue"], engine.server.address[1])
    ranks = MessagerRanks(
        messager["script"], nranks, queue, socket_dir, messager["log_dir"], routed, scenario.get("interleaving", [])
    )
    worker, token_processor = Worker(engine.resource_manager, ranks), TokenProcessor(engine)
    slots, outcome, error, elapsed_s = {}, "error", None, None
    try:
        ranks.wait_until_ready()
        ready_at = time.monotonic()
        deadline = ready_at + float(messager["deadline_s"])

        def wait(condition, what):
            _wait_for(condition, what, max(0.0, deadline - time.monotonic()), ranks.died)

        token_processor.start()
        start_prepare_threads(engine)
        for wave, compute in zip(waves, compute_after):
            requests = admit(engine, wave, max(0.0, deadline - time.monotonic()), ranks.died)
            slots.update({request.request_id: request.idx for request in requests})
            while compute and worker.in_prefill():
                orphans = [request.request_id for request in worker.step() if not request.disaggregate_info]
                if orphans:  # computed, nothing to transfer: the token processor finishes them at once
                    engine.resource_manager.finish_requests(orphans)
        wait(
            lambda: set(routed) <= {request_id for request_id, _ in token_processor.reported},
            f"routed requests {sorted(routed)} reported finished by get_finished_req",
        )
        wait(
            lambda: not set(routed) & set(engine.resource_manager.requests),
            f"routed requests {sorted(routed)} freed by finish_requests",
        )
        outcome = "finished"
        elapsed_s = round(time.monotonic() - ready_at, 2)
    except Stuck as stuck:
        outcome, error = "hang", str(stuck)
    except Exception as failure:
        error = repr(failure)
    finally:
        stop_engine(engine)
        ranks.stop()
    return {
        "outcome": outcome,
        "error": error,
        "decisions": _decisions(),
        "slots": slots,
        "elapsed_s": elapsed_s,
        "reported": token_processor.reported,
        "ranks": {str(rank): reports for rank, reports in ranks.reports.items()},
    }


def main() -> int:
    """``python -c 'from fastdeploy._preflight import slice_engine; slice_engine.main()' SPEC_JSON RESULT_PATH``: the
    spec is ``{"modules": {...}, "nranks": N, "waves": [...]}`` for :class:`MailboxReader` ranks, ``{"modules",
    "nranks", "scenario": {...}, "messager": {...}}`` for real messager ranks (:func:`run_with_messagers`); the
    result is written to RESULT_PATH as JSON (stdout belongs to the release's loggers)."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    spec, result_path = json.loads(sys.argv[1]), sys.argv[2]
    with tempfile.TemporaryDirectory(prefix="fd-pd-fix-slice-") as socket_dir:
        if spec.get("messager"):
            result = run_with_messagers(
                spec["modules"], spec["nranks"], spec["scenario"], socket_dir, spec["messager"]
            )
        else:
            result = run(spec["modules"], spec["nranks"], spec["waves"], socket_dir)
    with open(result_path, "w", encoding="utf-8") as out:
        json.dump(_jsonable(result), out)
    return 0
