"""The prefill instance of an engine slice (in a slice tree: ``fastdeploy._preflight.slice_prefill``).

The release's own ``ResourceManagerV1``, ``SplitwiseConnector``, prepare threads (``_prepare_request_v1`` ->
``_fetch_loop`` -> ``_fetch_request_prefill``) and ``EngineWorkerQueue`` (a real server, and the engine's own client)
run here unmodified (:func:`start_engine`) on what stands in for the rest, our own code:

* :class:`ResourceManager`: the base class of ``ResourceManagerV1`` (slots, a GPU block pool, ``available_batch``);
  the tree's name registry (:mod:`.names`) resolves the release's import of it here;
* :func:`engine_config`: the engine config, only the fields these files read (a missing one raises);
* :class:`Scheduler`: hands each scripted wave of requests to whichever prepare thread asks first;
* zmq (:func:`zmq_standin`): the connector's asks reach the :class:`DecodePeer`, the decode instance, which answers
  each with a ``cache_sync`` message through the connector's own ``_process_message`` on its ``io_executor`` (the
  zmq receiver's path): at once, after another request's admission, or late and twice (a repeated D-part);
* a request's metrics, where a scenario makes the prepare thread fail right after the P-part
  (:func:`fail_after_p_part`).

:func:`admit` hands a wave of requests to the scheduler and waits until the release admitted them; :func:`wait_until`
is every wait of the slice (:class:`Stuck` where nothing happens). The engine process (:mod:`.slice_engine`) and its
real messager ranks (:mod:`.slice_messagers`) drive it.
"""

import copy
import importlib
import logging
import pickle
import queue
import sys
import threading
import time
import types
from types import SimpleNamespace

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


class Stuck(TimeoutError):
    """A wait of the slice did not end within its deadline: the run hangs."""


def wait_until(
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
        done = engine.resource_manager.requests if until == ALLOCATED else request_ids(engine.resource_manager.running)
        return expected <= set(done) and all(event.is_set() for event in raised.values())

    what = f"requests {sorted(expected)} {until}, {sorted(raised)} failed after the P-part"
    wait_until(reached, what, timeout_s, failure, progress or (lambda: None))
    return requests


def free_slots(engine):
    """The slots the release's resource manager has free (``stop_flags`` True; its ``get_available_position`` takes
    the lowest), in order; None where the release keeps no ``stop_flags``."""
    flags = getattr(engine.resource_manager, "stop_flags", None)
    return None if flags is None else [slot for slot, free in enumerate(flags) if free is True]


def request_ids(requests) -> set:
    return {request.request_id for request in list(requests)}


def decisions() -> list:
    from fastdeploy_pd_fix.plugin.patching import RECORDS

    return [record.describe() for record in RECORDS]
