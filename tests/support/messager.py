"""The attributes of ``CacheMessagerV1`` that ``core.messager_step.MessagerStep`` reads and writes, no more."""

import queue
import threading


class StepMessager:
    def __init__(self, num_slots: int = 8):
        self.engine_cache_task_thread_lock = threading.Lock()
        self.engine_cache_tasks = [dict() for _ in range(num_slots)]
        self.idx_cache_task_dict = {}
        self.cache_prefilled_engine_ids_queue = queue.Queue()
