"""Stand-in of FastDeploy's prefill-side cache messager, run like upstream runs it: as a script.

    python <root>/fastdeploy/cache_manager/cache_messager.py --rank R --mp_num N --splitwise_role prefill ...

so that ``CacheMessagerV1`` lives in ``__main__``. Written from the protocol facts (docs/protocol.md), not from
upstream code. The three loops, their locks, barriers and engine-facing calls follow the facts; the RDMA/IPC
transfer itself is not modelled: the send loop records each batch it takes (``$FD_STANDIN_OUT/rank{R}.jsonl``),
has the task it read for each slot checked against the scenario's ground truth, and exits the process with code 0
once every request of the scenario that the engine does not abort has finished.

The release variant is chosen at import time (:mod:`fastdeploy.pd_fix_standin.variant`). Methods that differ between
releases are defined once per variant in the class body, so that each variant's source has the shape of that
release; behaviour they share lives in helpers.
"""

import argparse
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from queue import Queue

import paddle
from fastdeploy import envs
from fastdeploy.inter_communicator.engine_worker_queue import EngineWorkerQueue
from fastdeploy.model_executor.ops.gpu import get_output_kv_signal
from fastdeploy.pd_fix_standin import script as standin_script
from fastdeploy.pd_fix_standin.variant import KV_SIGNAL_OP_ARGS, PARALLEL_SEND, RELEASE, WITH_7724
from fastdeploy.utils import get_logger

logger = get_logger("cache_messager", "cache_messager.log")

MAX_ENGINE_SLOTS = 512
KV_SIGNAL_LENGTH = MAX_ENGINE_SLOTS * 3 + 2
REGISTRATION_POLL_S = 0.001


def parse_args():
    parser = argparse.ArgumentParser("cache messager (FastDeploy stand-in)")
    parser.add_argument("--splitwise_role", type=str, default="mixed")
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--device_id", type=int, default=0)
    parser.add_argument("--num_layers", type=int, default=1)
    parser.add_argument("--mp_num", type=int, default=1)
    parser.add_argument("--cache_dtype", type=str, default="bfloat16")
    # [num_blocks, kv_num_heads, block_size, head_dim]
    parser.add_argument("--key_cache_shape", type=str, default="64,1,64,8")
    parser.add_argument("--value_cache_shape", type=str, default="")
    parser.add_argument("--pod_ip", type=str, default="127.0.0.1")
    parser.add_argument("--default_dtype", type=str, default="bfloat16")
    parser.add_argument("--cache_queue_port", type=int, default=0)
    parser.add_argument("--engine_worker_queue_port", type=int, required=True)
    parser.add_argument("--protocol", type=str, default="ipc")
    parser.add_argument("--local_data_parallel_id", type=int, default=0)
    parser.add_argument("--ipc_suffix", type=str, default="")
    parser.add_argument("--rdma_port", type=str, default="0")
    parser.add_argument("--speculative_config", type=json.loads, default="{}")
    return parser.parse_args()


class CacheMessager:
    """The messager of the pre-v1 scheduler. It has neither ``consume_signals`` nor ``_add_cache_task_thread``;
    its transfer path is not modelled, so a scenario run with it never finishes."""

    def __init__(self, splitwise_role, **transfer_settings):
        self.splitwise_role = splitwise_role

    def prefill_layerwise_send_cache_thread(self):
        logger.info("CacheMessager (pre-v1): transfer path not modelled by the stand-in, idling")
        threading.Event().wait()


class CacheMessagerV1:
    """The v1 messager: ``consume_signals`` turns kv signals into batches, ``_add_cache_task_thread`` registers
    transfer tasks, ``prefill_layerwise_send_cache_thread`` sends batch after batch in lockstep with the other
    ranks (barriers)."""

    # ---- construction: the pending layer-0 buffer exists from #7872 on ----

    if RELEASE == "pre7872":

        def __init__(self, *args, **kwargs):
            self._init_transfer_state(*args, **kwargs)
            self._start_prefill_threads()

    else:

        def __init__(self, *args, **kwargs):
            self._init_transfer_state(*args, **kwargs)
            # #7872: a layer-0 signal that beats its task's registration waits here (engine slot -> token num,
            # latest signal kept) until the registration thread recovers it.
            self.pending_layer0_signals = {}
            self._start_prefill_threads()

    def _init_transfer_state(
        self,
        splitwise_role,
        transfer_protocol,
        pod_ip,
        engine_worker_queue_port,
        local_data_parallel_id,
        gpu_cache_kvs,
        rank,
        nranks,
        num_layers,
        gpu_id,
        block_size,
        rdma_port,
    ):
        self.splitwise_role = splitwise_role
        self.transfer_protocol = transfer_protocol
        self.gpu_cache_kvs = gpu_cache_kvs
        self.rank = rank
        self.nranks = nranks
        self.rank_id = rank + local_data_parallel_id * nranks
        self.num_layers = num_layers
        self.gpu_id = gpu_id
        self.block_size = block_size
        self.rdma_port = rdma_port
        self.engine_worker_queue = EngineWorkerQueue(
            address=(pod_ip, engine_worker_queue_port),
            is_server=False,
            num_client=nranks,
            client_id=rank,
            local_data_parallel_id=local_data_parallel_id,
        )
        self.engine_cache_task_thread_lock = threading.Lock()
        self.engine_cache_tasks = [dict() for _ in range(MAX_ENGINE_SLOTS)]
        self.idx_cache_task_dict = {}
        self.cache_prefilled_engine_ids_queue = Queue()
        self.cache_info = {}

    def _start_prefill_threads(self):
        """Last step of ``__init__``: only the prefill role consumes signals and registers tasks."""
        if self.splitwise_role != "prefill":
            return
        consume_signals_thread = threading.Thread(target=self.consume_signals, daemon=True)
        consume_signals_thread.start()
        add_cache_task_thread = threading.Thread(target=self._add_cache_task_thread, daemon=True)
        add_cache_task_thread.start()

    # ---- consume_signals: the two kv-signal op signatures ----

    if KV_SIGNAL_OP_ARGS == 4:

        def consume_signals(self):
            paddle.device.set_device("cpu")
            kv_signal_data = paddle.full([KV_SIGNAL_LENGTH], -1, dtype="int32")
            while True:
                try:
                    get_output_kv_signal(kv_signal_data, self.rank_id, self.gpu_id, 1)  # blocking read
                    self._handle_kv_signal(kv_signal_data)
                except Exception as error:
                    logger.exception(f"consume_signals: {error!r}")

    else:

        def consume_signals(self):
            paddle.device.set_device("cpu")
            kv_signal_data = paddle.full([KV_SIGNAL_LENGTH], -1, dtype="int32")
            while True:
                try:
                    get_output_kv_signal(kv_signal_data, self.rank_id, 0)  # non-blocking read
                    self._handle_kv_signal(kv_signal_data)
                except Exception as error:
                    logger.exception(f"consume_signals: {error!r}")

    def _handle_kv_signal(self, kv_signal_data):
        """Record the progress of each task of the signal; a layer-0 signal starts transfers."""
        signal = kv_signal_data.numpy()
        # Indexing yields numpy scalars (a paddle tensor would yield 0-d tensors): convert explicitly.
        tasks_count = int(signal[0])
        if tasks_count == -1:
            return
        layer_id = int(signal[1])
        if not 0 < tasks_count <= MAX_ENGINE_SLOTS or layer_id < 0:
            logger.error(f"malformed kv signal dropped: tasks_count={tasks_count} layer_id={layer_id}")
            return
        layer0_tasks = []
        for position in range(tasks_count):
            engine_idx, chunk_token_offset, current_chunk_len = (
                int(value) for value in signal[2 + 3 * position : 5 + 3 * position]
            )
            if not 0 <= engine_idx < MAX_ENGINE_SLOTS or chunk_token_offset < 0 or current_chunk_len < 0:
                logger.error(
                    f"malformed kv signal task dropped: {engine_idx} {chunk_token_offset} {current_chunk_len}"
                )
                continue
            prefilled_token_num = chunk_token_offset + current_chunk_len
            with self.engine_cache_task_thread_lock:
                self.engine_cache_tasks[engine_idx]["prefilled_layer_idx"] = layer_id
                self.engine_cache_tasks[engine_idx]["prefilled_token_num"] = prefilled_token_num
            layer0_tasks.append((engine_idx, prefilled_token_num))
        if layer_id == 0 and layer0_tasks:
            self._put_layer0_batches(layer0_tasks)

    # ---- how layer-0 signals become batches: the part the releases changed ----

    if RELEASE == "pre7872":

        def _put_layer0_batches(self, layer0_tasks):
            """Before #7872: the registered tasks of a signal form one batch; tasks not registered yet are lost."""
            batch = []
            for engine_idx, prefilled_token_num in layer0_tasks:
                if engine_idx in self.idx_cache_task_dict:
                    batch.append((engine_idx, prefilled_token_num))
                else:
                    logger.warning(f"layer0 signal for unregistered engine_idx={engine_idx} dropped")
            if batch:
                self.cache_prefilled_engine_ids_queue.put(batch)

    elif RELEASE == "7872":

        def _put_layer0_batches(self, layer0_tasks):
            """#7872: the registered tasks of a signal form one batch; the others wait in the pending buffer."""
            batch = []
            with self.engine_cache_task_thread_lock:
                for engine_idx, prefilled_token_num in layer0_tasks:
                    if engine_idx in self.idx_cache_task_dict:
                        batch.append((engine_idx, prefilled_token_num))
                    else:
                        self.pending_layer0_signals[engine_idx] = prefilled_token_num
                        logger.info(f"layer0 signal buffered: engine_idx={engine_idx} n={prefilled_token_num}")
                if batch:
                    self.cache_prefilled_engine_ids_queue.put(batch)

    else:

        def _put_layer0_batches(self, layer0_tasks):
            """#8034: every task goes through the pending buffer; the registered ones are recovered right away,
            one single-request batch each."""
            with self.engine_cache_task_thread_lock:
                for engine_idx, prefilled_token_num in layer0_tasks:
                    self.pending_layer0_signals[engine_idx] = prefilled_token_num
            for engine_idx, _ in layer0_tasks:
                self._recover_pending_layer0_signal(engine_idx)

    if RELEASE != "pre7872":

        def _recover_pending_layer0_signal(self, engine_idx):
            """Put the pending signal of a registered slot as a single-request batch (once: popped under lock)."""
            task = self.idx_cache_task_dict.get(engine_idx)
            if task is None:
                return
            with self.engine_cache_task_thread_lock:
                if engine_idx not in self.pending_layer0_signals:
                    return
                prefilled_token_num = self.pending_layer0_signals.pop(engine_idx)
                if prefilled_token_num > task["need_prefill_tokens"]:
                    logger.warning(
                        f"pending layer0 signal dropped: engine_idx={engine_idx} n={prefilled_token_num} "
                        f"> need_prefill_tokens={task['need_prefill_tokens']}"
                    )
                    return
                self.cache_prefilled_engine_ids_queue.put([(engine_idx, prefilled_token_num)])
                logger.info(f"layer0 signal recovered: engine_idx={engine_idx} n={prefilled_token_num}")

        def _on_cache_task_registered(self, engine_idx):
            self._recover_pending_layer0_signal(engine_idx)

    else:

        def _on_cache_task_registered(self, engine_idx):
            """Before #7872 nothing waits for a registration: early layer-0 signals were dropped."""

    # ---- registration: #7724 removed the finish_add_cache_task report and barrier ----

    if WITH_7724:

        def _add_cache_task_thread(self):
            while True:
                try:
                    cache_info = self.engine_worker_queue.get_cache_info()
                    if not cache_info:
                        time.sleep(REGISTRATION_POLL_S)
                        continue
                    self.engine_worker_queue.cache_info_barrier.wait()
                    for current_id, task in self._complete_cache_tasks(cache_info):
                        self.idx_cache_task_dict[current_id] = task
                        self._on_cache_task_registered(current_id)
                except Exception as error:
                    logger.exception(f"_add_cache_task_thread: {error!r}")

    else:

        def _add_cache_task_thread(self):
            while True:
                try:
                    cache_info = self.engine_worker_queue.get_cache_info()
                    if not cache_info:
                        time.sleep(REGISTRATION_POLL_S)
                        continue
                    self.engine_worker_queue.cache_info_barrier.wait()
                    finished_add_cache_task_req_ids = []
                    for current_id, task in self._complete_cache_tasks(cache_info):
                        self.idx_cache_task_dict[current_id] = task
                        self._on_cache_task_registered(current_id)
                        finished_add_cache_task_req_ids.append(task["request_id"])
                    self.engine_worker_queue.put_finished_add_cache_task_req(finished_add_cache_task_req_ids)
                    self.engine_worker_queue.finish_add_cache_task_barrier.wait()
                except Exception as error:
                    logger.exception(f"_add_cache_task_thread: {error!r}")

    def _complete_cache_tasks(self, cache_info):
        """Merge the two halves of each request's info; yield ``(current_id, task)`` for each completed one."""
        completed = []
        for info in cache_info:
            request_id = info.get("request_id")
            if request_id is None:
                logger.error(f"cache info without request_id dropped: {info}")
                continue
            if request_id not in self.cache_info:
                self.cache_info[request_id] = dict(info)
                continue
            task = {**self.cache_info[request_id], **info}
            missing = [
                key
                for key in ("src_block_ids", "current_id", "need_prefill_tokens", "dest_block_ids")
                if key not in task
            ]
            current_id = task.get("current_id")
            if missing or not isinstance(current_id, int) or not 0 <= current_id < MAX_ENGINE_SLOTS:
                logger.error(f"cache info of {request_id} dropped: missing {missing}, current_id={current_id!r}")
                self.cache_info.pop(request_id, None)
                continue
            # Blocks the decode side already holds are not sent: pad their destination ids with -1.
            decode_cached_blocks = int(task.get("decode_cached_tokens", 0)) // self.block_size
            task["dest_block_ids"] = [-1] * decode_cached_blocks + list(task["dest_block_ids"])[decode_cached_blocks:]
            task["sended_layer_id"] = -1
            task["sended_block_num"] = decode_cached_blocks
            task["status"] = "init"
            self.cache_info[request_id] = task
            completed.append((current_id, task))
        return completed

    # ---- send loop: #7724 waits for the registration instead of asserting it ----

    def prefill_layerwise_send_cache_thread(self):
        send_pool = ThreadPoolExecutor(max_workers=4) if PARALLEL_SEND else None
        while True:
            standin_script.wait_to_take()
            batch_engine_signals = self.cache_prefilled_engine_ids_queue.get()
            standin_script.record_batch(batch_engine_signals)
            self.engine_worker_queue.begin_send_cache_barrier.wait()
            standin_script.wait_to_send()
            # The (not modelled) transfer sends the blocks of the task each slot holds now, once per batch; the
            # parallel send reads each slot's task in a worker thread.
            if send_pool is None:
                tasks = [self._cache_task_to_send(engine_idx) for engine_idx, _ in batch_engine_signals]
            else:
                tasks = list(send_pool.map(self._cache_task_to_send, [idx for idx, _ in batch_engine_signals]))
            standin_script.check_sent_tasks(batch_engine_signals, tasks)
            self._finish_sent_tasks(batch_engine_signals, tasks)
            standin_script.batch_sent()
            if standin_script.all_requests_finished():
                standin_script.exit_process()

    if WITH_7724:

        def _cache_task_to_send(self, engine_idx):
            return self._maybe_wait_for_cache_task(engine_idx)

        def _maybe_wait_for_cache_task(self, engine_idx):
            """#7724: registration may lag the layer-0 signal; wait for it instead of asserting."""
            while engine_idx not in self.idx_cache_task_dict:
                time.sleep(REGISTRATION_POLL_S)
            return self.idx_cache_task_dict[engine_idx]

    else:

        def _cache_task_to_send(self, engine_idx):
            assert engine_idx in self.idx_cache_task_dict, f"engine_idx {engine_idx} has no cache task"
            return self.idx_cache_task_dict[engine_idx]

    def _finish_sent_tasks(self, batch_engine_signals, tasks):
        """After the (not modelled) layer-by-layer send: report each request whose transfer is complete."""
        for (engine_idx, prefilled_token_num), task in zip(batch_engine_signals, tasks):
            task["sended_layer_id"] = self.num_layers - 1
            task["sended_block_num"] = -(-prefilled_token_num // self.block_size)
            if prefilled_token_num < task["need_prefill_tokens"]:
                continue  # a chunk of a longer prefill: the final chunk's batch finishes the request
            task["status"] = "finished"
            self.engine_worker_queue.finish_send_cache_barrier.wait()
            self.engine_worker_queue.put_finished_req([[task["request_id"], task["status"]]])
            logger.info(f"finished request {task['request_id']} (engine_idx={engine_idx})")
            self._clean_finished_task(engine_idx, task["request_id"])
            # The engine may reuse the slot from here on (the stand-in's gate for its next registration).
            standin_script.record_finished(task["request_id"])

    if RELEASE == "pre7872":

        def _clean_finished_task(self, engine_idx, request_id):
            del self.idx_cache_task_dict[engine_idx]
            self.cache_info.pop(request_id, None)

    else:

        def _clean_finished_task(self, engine_idx, request_id):
            del self.idx_cache_task_dict[engine_idx]
            self.cache_info.pop(request_id, None)
            with self.engine_cache_task_thread_lock:
                self.pending_layer0_signals.pop(engine_idx, None)


def main():
    args = parse_args()
    rank_id = args.rank + args.local_data_parallel_id * args.mp_num
    global logger
    logger = get_logger("cache_messager", f"cache_messager_rank{rank_id}.log")
    logger.info(
        f"stand-in cache messager: rank={args.rank} rank_id={rank_id} role={args.splitwise_role} "
        f"release={RELEASE} with_7724={WITH_7724} op_args={KV_SIGNAL_OP_ARGS}"
    )
    block_size = int(args.key_cache_shape.split(",")[2])
    messager_class = CacheMessagerV1 if envs.ENABLE_V1_KVCACHE_SCHEDULER else CacheMessager
    cache_messager = messager_class(
        splitwise_role=args.splitwise_role,
        transfer_protocol=args.protocol,
        pod_ip=args.pod_ip,
        engine_worker_queue_port=args.engine_worker_queue_port,
        local_data_parallel_id=args.local_data_parallel_id,
        gpu_cache_kvs={},
        rank=args.rank,
        nranks=args.mp_num,
        num_layers=args.num_layers,
        gpu_id=args.device_id,
        block_size=block_size,
        rdma_port=args.rdma_port,
    )
    # Upstream sets cache_ready_signal here; the engine sends requests only after that, so events start now.
    standin_script.activate(
        rank=args.rank,
        block_size=block_size,
        send_queue=getattr(cache_messager, "cache_prefilled_engine_ids_queue", None),
    )
    if args.splitwise_role == "mixed":
        threading.Event().wait()
    cache_messager.prefill_layerwise_send_cache_thread()


if __name__ == "__main__":
    main()
