"""Our own model of the FastDeploy engine pieces the engine-side patch touches, written from the facts listed in
``fastdeploy_pd_fix/plugin/engine/patch.py`` (not from FastDeploy's code): the names and the behaviour the patch relies
on, nothing more.

* :class:`EngineRequest`: ``request_id``, ``prompt_token_ids``, ``disaggregate_info`` (None: computed without
  transfer), ``idx`` (the slot), ``num_computed_tokens``, ``prefill_start_index`` / ``prefill_end_index``.
* :class:`ResourceManagerV1`: ``requests``, ``running``, ``to_be_aborted_req_id_set``, ``stop_flags``, ``lock``,
  ``config.scheduler_config.splitwise_role``; preallocation on the lowest free slot (with an optional prefix-cache
  hit), chunk scheduling, the abort trigger (progress reset to 0), ``recycle_abort_task`` (frees the slot of a
  request whose abort was triggered), ``add_request_in_p``.
* :class:`SplitwiseConnector`: built with the mailbox and the resource manager, puts P-parts for the tasks that have
  ``disaggregate_info``.
* :class:`OneBatchMailbox`: the cache-info mailbox with ``num_clients`` readers. A put waits until every reader has
  read the previous batch, then replaces it; a reader gets each batch once.
* :func:`admit`: the #7724 admission on a prefill instance (preallocate, P-part unless the request has no
  ``disaggregate_info``, ``add_request_in_p``).
* :func:`fastdeploy_files`: the two classes as source files at FastDeploy's paths (make-patch's engine side).
"""

import inspect
import sys
import threading
from types import SimpleNamespace

from fastdeploy_pd_fix.target import CONNECTOR_MODULE, RESOURCE_MANAGER_MODULE


class EngineRequest:
    def __init__(self, request_id: str, prompt_tokens: int, transfer: bool = True):
        self.request_id = request_id
        self.prompt_token_ids = list(range(prompt_tokens))
        self.disaggregate_info = {"role": "prefill"} if transfer else None
        self.idx = None
        self.need_prefill_tokens = prompt_tokens
        self.num_computed_tokens = 0
        self.prefill_start_index = 0
        self.prefill_end_index = 0


class ResourceManagerV1:
    def __init__(self, max_num_seqs: int = 4, splitwise_role: str = "prefill"):
        self.config = SimpleNamespace(scheduler_config=SimpleNamespace(splitwise_role=splitwise_role))
        self.lock = threading.Lock()
        self.requests = {}
        self.running = []
        self.to_be_aborted_req_id_set = set()
        self.stop_flags = [True] * max_num_seqs
        self.tasks_list = [None] * max_num_seqs

    def preallocate_resource_in_p(self, request: EngineRequest, matched_tokens: int = 0) -> None:
        """The lowest free slot; a prefix-cache hit counts as computed before any chunk is scheduled."""
        with self.lock:
            request.need_prefill_tokens = len(request.prompt_token_ids)
            request.num_computed_tokens = matched_tokens
            request.idx = self.stop_flags.index(True)
            self.stop_flags[request.idx] = False
            self.tasks_list[request.idx] = request
            self.requests[request.request_id] = request

    def schedule_chunk(self, request_id: str, tokens: int):
        """Hand the next ``tokens`` prompt tokens to a forward step: ``(slot, offset, length)`` of the chunk."""
        with self.lock:
            request = self.requests[request_id]
            request.prefill_start_index = request.num_computed_tokens
            request.prefill_end_index = request.num_computed_tokens + tokens
            request.num_computed_tokens += tokens
            return request.idx, request.prefill_start_index, tokens

    def trigger_abort(self, request_id: str) -> None:
        """The abort handed to the worker: progress reset, the request waits for ``recycle_abort_task``."""
        with self.lock:
            request = self.requests[request_id]
            request.num_computed_tokens = 0
            self.to_be_aborted_req_id_set.add(request_id)
            if request in self.running:
                self.running.remove(request)

    def recycle_abort_task(self, request_id):
        with self.lock:
            if request_id in self.to_be_aborted_req_id_set and request_id in self.requests:
                request = self.requests.pop(request_id)
                self.tasks_list[request.idx] = None
                self.stop_flags[request.idx] = True
                self.to_be_aborted_req_id_set.discard(request_id)

    def add_request_in_p(self, requests):
        with self.lock:
            self.running.extend(requests)


class SplitwiseConnector:
    def __init__(self, cfg, worker_queue, resource_manager):
        self.cfg = cfg
        self.engine_worker_queue = worker_queue
        self.resource_manager = resource_manager

    def send_cache_info_to_messager(self, tasks, current_id):
        cache_info = [
            {
                "request_id": task.request_id,
                "src_block_ids": [],
                "current_id": task.idx,
                "need_prefill_tokens": task.need_prefill_tokens,
            }
            for task in tasks
            if task.disaggregate_info is not None
        ]
        self.engine_worker_queue.put_cache_info(cache_info)


class OneBatchMailbox:
    """The cache-info mailbox. ``batches`` keeps every batch put, in order; ``blocked_puts`` counts the puts waiting
    for a reader (tests wait for it with :meth:`wait_for_blocked_put`)."""

    def __init__(self, num_clients: int):
        self._condition = threading.Condition()
        self._batch = []
        self._read = [True] * num_clients  # nothing to read yet: the first put does not wait
        self.blocked_puts = 0
        self.batches = []

    def put_cache_info(self, cache_info) -> None:
        with self._condition:
            if not all(self._read):
                self.blocked_puts += 1
                self._condition.notify_all()
                self._condition.wait_for(lambda: all(self._read))
                self.blocked_puts -= 1
            self._batch = list(cache_info)
            self._read = [False] * len(self._read)
            self.batches.append(list(cache_info))
            self._condition.notify_all()

    def get_cache_info(self, client_id: int, timeout: float) -> list:
        """Reader ``client_id``'s next batch, waiting up to ``timeout`` seconds for one; [] when none came."""
        with self._condition:
            if not self._condition.wait_for(lambda: not self._read[client_id], timeout):
                return []
            self._read[client_id] = True
            self._condition.notify_all()
            return list(self._batch)

    def wait_for_blocked_put(self, timeout: float) -> bool:
        with self._condition:
            return self._condition.wait_for(lambda: self.blocked_puts > 0, timeout)


def admit(resource_manager, connector, request: EngineRequest, matched_tokens: int = 0) -> None:
    resource_manager.preallocate_resource_in_p(request, matched_tokens)
    if request.disaggregate_info is not None:
        connector.send_cache_info_to_messager([request], 0)
    resource_manager.add_request_in_p([request])


def fastdeploy_files() -> dict:
    """FastDeploy path -> source text of ``ResourceManagerV1`` and ``SplitwiseConnector``, each in a module of its own
    with the imports it needs and one ``from fastdeploy...`` import (for where make-patch puts its own)."""
    module = sys.modules[__name__]
    resource_manager = (
        "from __future__ import annotations\n\nimport threading\nfrom types import SimpleNamespace\n\n"
        "from fastdeploy.utils import llm_logger\n\n\n" + inspect.getsource(module.ResourceManagerV1)
    )
    connector = "import json\n\n\n" + inspect.getsource(module.SplitwiseConnector)
    return {
        RESOURCE_MANAGER_MODULE.replace(".", "/") + ".py": resource_manager,
        CONNECTOR_MODULE.replace(".", "/") + ".py": connector,
    }
