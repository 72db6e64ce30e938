"""The engine process of an engine slice (imported in a slice tree as ``fastdeploy._preflight.slice_engine``).

The release's own engine files run here unmodified: ``ResourceManagerV1``, ``SplitwiseConnector``, the prepare
threads (``_prepare_request_v1`` -> ``_fetch_loop`` -> ``_fetch_request_prefill``) and ``EngineWorkerQueue``: a real
server, and one real client per messager rank. The plugin's engine patch is applied by its start-up hook, through the
same import path as in a deployment. What stands in, our own code:

* :class:`ResourceManager`: the base class of ``ResourceManagerV1`` (slots, a GPU block pool, ``available_batch``);
* :func:`engine_config`: the engine config, only the fields these files read (a missing one raises);
* :class:`Scheduler`: hands each scripted wave of requests to whichever prepare thread asks first;
* zmq (:func:`zmq_standin`): the connector's asks reach the :class:`DecodePeer`, the decode instance, which answers
  each with a ``cache_sync`` message through the connector's own ``_process_message`` on its ``io_executor`` (the
  zmq receiver's path): at once, after another request's admission, or late and twice (a repeated D-part);
* a request's metrics, where a scenario makes the prepare thread fail right after the P-part
  (:func:`fail_after_p_part`);
* the messager ranks, either :class:`MailboxReader` threads (what a cache messager's registration loop does with the
  mailbox: ``get_cache_info``, then ``cache_info_barrier`` after every non-empty read, recording every item in
  order; :func:`run`), or the release's own ``cache_messager.py`` run unmodified as a script in one process per rank
  (:class:`MessagerRanks`, :func:`run_with_messagers`): real clients of the mailbox (served where the release's
  messager looks for it, a Unix socket in ``/dev/shm``), kv signals from the :class:`Worker` through a channel per
  rank (:mod:`.slice_rank`), the preflight tap reporting their reads, batches, sends and ground truth back; several
  scenarios play one after another in one run (:func:`play_episode`), each rank told on its channel where an
  episode starts;
* :class:`Worker`: the model runner, stepping admitted requests and emitting one kv signal per layer per step;
* the token processor: with :class:`MailboxReader` ranks a request is finished (``finish_requests``) when the scenario
  says it has run; with real ranks an orphan once computed, a routed request once ``get_finished_req`` reported its
  transfer (:class:`TokenProcessor`).

It writes one JSON object: the plugin's decisions, each request's slot, and each rank's stream (readers) or, per
episode, reports (real ranks). The host side (:mod:`fastdeploy_pd_fix.tools.engine_slice`) judges it.
"""

import ast
import copy
import importlib
import json
import logging
import os
import pickle
import queue
import socket
import subprocess
import sys
import tempfile
import threading
import time
import types
from multiprocessing.connection import Listener
from pathlib import Path
from types import SimpleNamespace

from fastdeploy._preflight.slice_rank import CHANNEL_AUTHKEY, ENV_SLICE

#: Slots of the instance, and GPU blocks (of 64 tokens) in its pool.
MAX_NUM_SEQS = 8
BLOCK_SIZE = 64
NUM_GPU_BLOCKS = 256
#: What :func:`admit` waits for after handing a wave to the scheduler.
ADMITTED, ALLOCATED = "admitted", "allocated"
#: The metric the release's prefill prepare thread sets right after the P-part (``send_cache_info_to_messager``) and
#: before ``add_request_in_p`` (release/2.6 ``common_engine_prepare_mixin`` 246-254): :func:`fail_after_p_part`.
AFTER_P_PART_METRIC = "add_req_to_resource_manager_time"
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
REPORT_KINDS = ("ready", "read", "queued", "batch", "send", "finished")
#: Where the release's messager looks for the mailbox when ``FD_ENGINE_TASK_QUEUE_WITH_SHM`` is on (the default):
#: its ``engine_worker_queue_port`` names the socket. Over TCP every manager proxy the ranks create costs ~40 ms
#: (delayed acknowledgements), some 4 s per rank at start-up; over this Unix socket, a few ms.
SHM_MAILBOX = "/dev/shm/fd_task_queue_{port}.sock"
#: :func:`play_episode`: compute until every admitted request is computed.
CHUNKS_UNBOUNDED = 1 << 30
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


#: A request spec's ``"decode"`` that makes the decode instance answer the request's first ask only once the request
#: was freed, after the prefill timed out on it, asked again and got the answer to its second ask at once: the late
#: answer is a repeated D-part the release's own connector puts (release/2.6 ``PREFILL_CONTINUOUS_REQUEST_DECODE_
#: RESOURCES``, on by default: the prepare thread asks again after ``FD_PREFILL_WAIT_DECODE_RESOURCE_SECONDS``).
LATE_REPEAT = "late-repeat"
#: Asks the connector sent a decode instance (request ids), in order, from :class:`ZmqSocket` to :class:`DecodePeer`.
_asks = queue.Queue()


class ZmqSocket:
    """A zmq socket of the connector: a ``prefill`` message it sends (the connector asking a decode instance for a
    request's cache) reaches the :class:`DecodePeer`; nothing else goes anywhere."""

    closed = False

    def setsockopt(self, *args):
        pass

    def connect(self, address):
        pass

    def bind(self, address):
        pass

    def close(self, *args):
        self.closed = True

    def send_multipart(self, frames):
        message = pickle.loads(frames[0], buffers=frames[1:])
        if message["type"] == "prefill":
            for task in message["payload"]:
                _asks.put(task["request_id"])


class ZmqContext:
    def socket(self, kind):
        return ZmqSocket()


class ZmqPoller:
    """The connector's receiver is not started in the slice (the decode peer calls ``_process_message`` itself)."""

    def register(self, *args):
        pass

    def poll(self, timeout=None):
        return []


def _zmq_option(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return 0  # a socket kind or option: the stand-in socket ignores them


def zmq_standin() -> types.ModuleType:
    """The ``zmq`` the release's connector imports in the slice (real zmq or not): :class:`ZmqSocket` and friends."""
    module = types.ModuleType("zmq", "the engine slice's zmq: asks reach the decode peer")
    module.Context, module.Socket, module.Poller = ZmqContext, ZmqSocket, ZmqPoller
    module.Again = type("Again", (Exception,), {})
    module.__getattr__ = _zmq_option
    return module


class DecodePeer(threading.Thread):
    """The decode instance: answers every ask the connector sent it (:class:`ZmqSocket`) with the ``cache_sync``
    message the decode side sends (as many block ids as the request has on the prefill side), delivered the way the
    connector's receiver delivers frames (its own ``_process_message`` on its ``io_executor``). At once, unless the
    request's spec says otherwise (:meth:`plan`): ``"answer_after": <request id>``, only once that request was admitted
    (``add_request_in_p``); ``"decode": LATE_REPEAT``, see :data:`LATE_REPEAT`."""

    def __init__(self, connector, resource_manager, stop: threading.Event):
        super().__init__(name="slice-decode-peer", daemon=True)
        self.connector = connector
        self.resource_manager = resource_manager
        self.stop = stop
        self.lock = threading.Lock()
        self.plans = {}  # request id -> its spec
        self.asks = {}  # request id -> how many times the connector asked
        self.held = []  # [request id, block count, (condition, request id)]: answers not sent yet
        self.admitted = set()  # requests seen in the resource manager's running list
        self.answers = []  # the io_executor futures of the answers sent

    def plan(self, spec: dict) -> None:
        with self.lock:
            self.plans[spec["id"]] = spec

    def idle(self) -> bool:
        """Every ask answered and every answer processed by the connector (its D-part put)."""
        with self.lock:
            return not self.held and all(answer.done() for answer in self.answers)

    def run(self):
        while not self.stop.is_set():
            with self.lock:
                self.admitted.update(request.request_id for request in list(self.resource_manager.running))
                while not _asks.empty():
                    self._asked(_asks.get())
                due = [held for held in self.held if self._met(held[2])]
                self.held = [held for held in self.held if held not in due]
                for request_id, count, _ in due:
                    self._answer(request_id, count)
            time.sleep(0.001)

    def _asked(self, request_id):
        asks = self.asks[request_id] = self.asks.get(request_id, 0) + 1
        spec = self.plans.get(request_id, {})
        count = len(self.resource_manager.requests[request_id].block_tables)
        if spec.get("decode") == LATE_REPEAT and asks == 1:
            self.held.append([request_id, count, ("freed", request_id)])
        elif spec.get("answer_after"):
            self.held.append([request_id, count, ("admitted", spec["answer_after"])])
        else:
            self._answer(request_id, count)

    def _met(self, condition) -> bool:
        kind, request_id = condition
        freed = request_id not in self.resource_manager.requests
        return request_id in self.admitted and (kind == "admitted" or freed)

    def _answer(self, request_id, count):
        first = DECODE_BLOCK_BASE * (len(self.answers) + 1)
        payload = [{"request_id": request_id, "dest_block_ids": list(range(first, first + count))}]
        frames = [b"decode", pickle.dumps({"type": "cache_sync", "payload": payload}, protocol=5)]
        self.answers.append(self.connector.io_executor.submit(self.connector._process_message, frames))


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


def _wait_for(
    condition, what: str, timeout_s: float = STEP_TIMEOUT_S, failure=lambda: "", progress=lambda: None
) -> None:
    """Wait until ``condition()``; :class:`Stuck` once ``timeout_s`` passed since the wait began or ``progress()``
    last changed (a slow machine is not a hang), RuntimeError as soon as ``failure()`` says why the wait cannot end
    (a rank process died). Polls: detection only, nothing is ordered by it."""
    seen, deadline = progress(), time.monotonic() + timeout_s
    while not condition():
        why = failure()
        if why:
            raise RuntimeError(f"{why} while waiting for {what}")
        now = progress()
        if now != seen:
            seen, deadline = now, time.monotonic() + timeout_s
        elif time.monotonic() > deadline:
            raise Stuck(f"slice stuck: {what}, nothing happened for {timeout_s:.1f} s")
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
    sys.modules["zmq"] = zmq_standin()  # before the connector's module imports it
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
    peer = DecodePeer(connector, resource_manager, stop)
    peer.start()
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
        peer=peer,
        stop=stop,
        nranks=nranks,
    )


def start_prepare_threads(engine) -> None:
    threading.Thread(target=engine.engine._prepare_request_v1, name="slice-prepare", daemon=True).start()


def stop_engine(engine) -> None:
    """Stop the slice's threads and the prepare threads, and shut the mailbox's manager down (the release's own
    ``cleanup``: at exit its finalizer takes a second or more)."""
    engine.stop.set()
    engine.engine.running = False
    engine.server.cleanup()


def fail_after_p_part(request, raised: threading.Event) -> None:
    """Make the release's prepare path raise right after ``request``'s P-part: its metrics become a stand-in, of a
    subclass of the release's metrics class, that raises when :data:`AFTER_P_PART_METRIC` is set (``raised`` is set
    then)."""
    request_id = request.request_id

    def __setattr__(metrics, name, value):
        if name == AFTER_P_PART_METRIC:
            raised.set()
            raise RuntimeError(f"slice: the prepare thread fails right after the P-part of {request_id}")
        object.__setattr__(metrics, name, value)

    failing = copy.copy(request.metrics)
    stand_in = {"__setattr__": __setattr__, "__slots__": ()}  # the same layout, slots or not
    failing.__class__ = type("FailingAfterPPart", (type(request.metrics),), stand_in)
    request.metrics = failing


def admit(
    engine, wave: list, timeout_s: float = STEP_TIMEOUT_S, failure=lambda: "", until: str = ADMITTED, progress=None
) -> list:
    """Hand one wave of requests ``{"id", "prompt", "routed"}`` to the scheduler (each spec's decode answers
    planned with the :class:`DecodePeer`); the release's requests once all of them are ``until``: ``ADMITTED`` by
    ``add_request_in_p`` (a request with ``"fails_after_p_part"``: once its prepare thread raised), or ``ALLOCATED``
    a slot by ``preallocate_resource_in_p``."""
    requests, raised = [], {}
    for spec in wave:
        request = engine.request_class(
            request_id=spec["id"],
            prompt_token_ids=list(range(spec["prompt"])),
            disaggregate_info=_disaggregate_info(engine.nranks) if spec["routed"] else None,
        )
        if spec.get("fails_after_p_part"):
            raised[spec["id"]] = threading.Event()
            fail_after_p_part(request, raised[spec["id"]])
        engine.peer.plan(spec)
        requests.append(request)
    engine.engine.scheduler.submit(requests)
    expected = {spec["id"] for spec in wave} - set(raised)

    def reached():
        done = engine.resource_manager.requests if until == ALLOCATED else _ids(engine.resource_manager.running)
        return expected <= set(done) and all(event.is_set() for event in raised.values())

    what = f"requests {sorted(expected)} {until}, {sorted(raised)} failed after the P-part"
    _wait_for(reached, what, timeout_s, failure, progress or (lambda: None))
    return requests


def _ids(requests) -> set:
    return {request.request_id for request in list(requests)}


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
    the batches it queued and those its send loop took, its sends with their ground-truth violations, the requests
    it finished)."""

    def __init__(
        self, script: str, nranks: int, queue: tuple, socket_dir: str, log_dir: str, routed: dict, interleaving: list
    ):
        """``queue``: the module of the mailbox class and the port it is served at (its socket is
        ``/dev/shm/fd_task_queue_<port>.sock``, as the release's messager derives it); ``routed``: request id ->
        prompt length of every routed request (the ranks' ground truth); ``interleaving``: per rank, its forced order
        of events (:class:`.slice_rank.Interleaving`; ranks beyond the list repeat its last, none: free)."""
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

    def begin_episode(self, number: int) -> dict:
        """Tell every rank, ahead of the episode's signals, that episode ``number`` starts; where each rank's reports
        stand (for :meth:`since`)."""
        for rank in range(self.nranks):
            self.connections[rank].send(("episode", number))
        with self.lock:
            return {
                rank: {kind: len(items) for kind, items in reports.items()} for rank, reports in self.reports.items()
            }

    def since(self, mark: dict) -> dict:
        """Each rank's reports since ``mark`` (:meth:`begin_episode`)."""
        with self.lock:
            return {
                str(rank): {kind: list(items[mark[rank][kind] :]) for kind, items in reports.items()}
                for rank, reports in self.reports.items()
            }

    def report_count(self) -> int:
        """How many reports came in so far (a rank that moves reports)."""
        with self.lock:
            return sum(len(items) for reports in self.reports.values() for items in reports.values())

    def finished_everywhere(self, request_ids, mark: dict) -> bool:
        """Every rank reported each of ``request_ids`` finished since ``mark`` (its reports of them are all in)."""
        return all(set(request_ids) <= set(reports["finished"]) for reports in self.since(mark).values())

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
    still in prefill and emits one kv signal per layer listing them all by slot, as the release's kv-signal writer
    lists every batch index with ``seq_lens_encoder > 0`` (orphans included)."""

    def __init__(self, resource_manager, ranks: MessagerRanks):
        self.resource_manager = resource_manager
        self.ranks = ranks
        self.computed = {}  # request id -> tokens computed

    def in_prefill(self) -> list:
        return sorted(
            (
                request
                for request in list(self.resource_manager.running)
                if self.computed.get(request.request_id, 0) < request.need_prefill_tokens
            ),
            key=lambda request: request.idx,
        )

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
        self.lock = threading.Lock()
        self.reported = []

    def run(self):
        while not self.engine.stop.is_set():
            try:
                finished = self.engine.engine_queue.get_finished_req()
            except (EOFError, OSError):  # the mailbox was shut down: the run is over
                return
            for request_id, status in finished:
                with self.lock:
                    self.reported.append([request_id, status])
                self.engine.resource_manager.finish_requests([request_id])
            time.sleep(0.001)

    def since(self, mark: int) -> list:
        with self.lock:
            return [list(item) for item in self.reported[mark:]]


def play_episode(engine, ranks: MessagerRanks, worker: Worker, token_processor: TokenProcessor, number, scenario):
    """Play one scenario (:func:`run_with_messagers`) as episode ``number``: what it showed, its ``outcome``
    "finished", "hang" (a wait saw nothing happen for ``scenario["deadline_s"]``) or "error"."""
    waves = scenario["waves"]
    compute_after = scenario.get("compute_after", [True] * len(waves))
    wait_for = scenario.get("wait_for", [ADMITTED] * len(waves))
    after_transfers = scenario.get("after_transfers", [False] * len(waves))
    specs = [spec for wave in waves for spec in wave]
    # A routed request finishes (its transfer reported); one failing after its P-part leaks its slot and registration.
    finishing = [spec["id"] for spec in specs if spec["routed"] and not spec.get("fails_after_p_part")]
    holding = {spec["id"] for spec in specs if not spec["routed"] and spec.get("holds")}
    started, quiet_s = time.monotonic(), float(scenario["deadline_s"])
    mark, reported_mark = ranks.begin_episode(number), len(token_processor.reported)
    slots, outcome, error = {}, "error", None
    awaiting = set()  # allocated a slot, not waited for their admission yet

    def progress():
        """Anything the ranks, the token processor or the decode instance did."""
        return ranks.report_count(), len(token_processor.reported), len(engine.peer.answers)

    def wait(condition, what):
        _wait_for(condition, what, quiet_s, ranks.died, progress)

    def transfers_done(request_ids):
        wait(
            lambda: set(request_ids) <= {request_id for request_id, _ in token_processor.since(reported_mark)},
            f"routed requests {sorted(request_ids)} reported finished by get_finished_req",
        )
        wait(
            lambda: not set(request_ids) & set(engine.resource_manager.requests),
            f"routed requests {sorted(request_ids)} freed by finish_requests",
        )
        wait(lambda: ranks.finished_everywhere(request_ids, mark), f"every rank's report of {sorted(request_ids)}")
        wait(engine.peer.idle, "the decode instance's answers put")
        held = sorted(holding & set(slots) & set(engine.resource_manager.requests))
        if held:  # the orphans that kept their slots until now end
            engine.resource_manager.finish_requests(held)

    try:
        for wave, compute, until, settle in zip(waves, compute_after, wait_for, after_transfers):
            if settle:  # the transfers of the earlier waves end first, and the orphans holding slots
                transfers_done([request_id for request_id in finishing if request_id in slots])
            requests = admit(engine, wave, quiet_s, ranks.died, until, progress)
            slots.update({request.request_id: request.idx for request in requests})
            if until == ALLOCATED:
                awaiting.update(spec["id"] for spec in wave if not spec.get("fails_after_p_part"))
            steps = CHUNKS_UNBOUNDED if compute is True else int(compute)
            if steps and awaiting:  # they are computed from here on
                wait(lambda: awaiting <= _ids(engine.resource_manager.running), f"{sorted(awaiting)} admitted")
                awaiting.clear()
            while steps and worker.in_prefill():
                steps -= 1
                done = [request.request_id for request in worker.step() if not request.disaggregate_info]
                orphans = [request_id for request_id in done if request_id not in holding]
                if orphans:  # computed, nothing to transfer: the token processor finishes them at once
                    engine.resource_manager.finish_requests(orphans)
        transfers_done(finishing)
        outcome = "finished"
    except Stuck as stuck:
        outcome, error = "hang", str(stuck)
    except Exception as failure:
        error = repr(failure)
    return {
        "outcome": outcome,
        "error": error,
        "slots": slots,
        "elapsed_s": round(time.monotonic() - started, 2),
        "reported": token_processor.since(reported_mark),
        "ranks": ranks.since(mark),
    }


def run_with_messagers(modules: dict, nranks: int, episodes: list, socket_dir: str, messager: dict) -> dict:
    """Play ``episodes`` (scenarios) one after another through one release engine with real messager ranks
    (``messager``: ``{"script", "log_dir", "interleaving"}``, the interleaving per rank over the whole run, signal
    events named ``sig:<episode>:<n>``). In a scenario each wave of ``waves`` is handed to the scheduler (once the
    transfers of the waves before ended where ``after_transfers`` says so) and waited for (``wait_for``, per wave:
    ``"admitted"``, default, or ``"allocated"``), then the worker steps (``compute_after``, per wave: True until every
    admitted request is computed, default; False none; a number, that many steps); an orphan (no
    ``disaggregate_info``) finishes once computed (``"holds"``: once the transfers of the waves before it ended), a
    routed request when the token processor has its transfer reported. The episode ends "finished" when every routed
    request was reported, freed and reported finished by every rank, "hang" when a wait for it saw nothing happen
    (no report of a rank, the token processor or the decode instance) for ``deadline_s``, "error" when a rank died
    or a step failed; the episodes after one that did not finish are not played."""
    envs = importlib.import_module("fastdeploy").envs
    if not envs.FD_ENGINE_TASK_QUEUE_WITH_SHM:
        raise ValueError("the slice serves real messager ranks where they look: set FD_ENGINE_TASK_QUEUE_WITH_SHM=1")
    port = _free_mailbox_port()
    engine = start_engine(modules, nranks, SHM_MAILBOX.format(port=port))
    routed = {
        spec["id"]: spec["prompt"]
        for episode in episodes
        for wave in episode["waves"]
        for spec in wave
        if spec["routed"]
    }
    ranks = MessagerRanks(
        messager["script"],
        nranks,
        (modules["queue"], port),
        socket_dir,
        messager["log_dir"],
        routed,
        messager["interleaving"],
    )
    worker, token_processor = Worker(engine.resource_manager, ranks), TokenProcessor(engine)
    played, error = [], None
    try:
        ranks.wait_until_ready()
        token_processor.start()
        start_prepare_threads(engine)
        for number, scenario in enumerate(episodes):
            played.append(play_episode(engine, ranks, worker, token_processor, number, scenario))
            if played[-1]["outcome"] != "finished":
                break
    except Exception as failure:
        error = repr(failure)
    finally:
        ranks.stop()
        stop_engine(engine)
        if os.path.exists(engine.server.address):
            os.unlink(engine.server.address)
    return {
        "error": error,
        "decisions": _decisions(),
        "ready": {str(rank): reports["ready"] for rank, reports in ranks.reports.items()},
        "episodes": played,
    }


def _free_mailbox_port() -> int:
    """A number for the mailbox's socket name that no other mailbox on this host uses (a free TCP port's number)."""
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if not os.path.exists(SHM_MAILBOX.format(port=port)):
            return port


def main() -> int:
    """``python -c 'from fastdeploy._preflight import slice_engine; slice_engine.main()' SPEC_JSON RESULT_PATH``: the
    spec is ``{"modules": {...}, "nranks": N, "waves": [...]}`` for :class:`MailboxReader` ranks, ``{"modules",
    "nranks", "episodes": [...], "messager": {...}}`` for real messager ranks (:func:`run_with_messagers`); the
    result is written to RESULT_PATH as JSON (stdout belongs to the release's loggers)."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    spec, result_path = json.loads(sys.argv[1]), sys.argv[2]
    with tempfile.TemporaryDirectory(prefix="fd-pd-fix-slice-") as socket_dir:
        if spec.get("messager"):
            result = run_with_messagers(
                spec["modules"], spec["nranks"], spec["episodes"], socket_dir, spec["messager"]
            )
        else:
            result = run(spec["modules"], spec["nranks"], spec["waves"], socket_dir)
    with open(result_path, "w", encoding="utf-8") as out:
        json.dump(_jsonable(result), out)
    return 0
