"""Stand-in of the engine <-> cache messager queue: a ``multiprocessing`` manager living in the engine process.

The engine side (``is_server=True``, run by the harness's engine process) holds the cross-rank barriers as real
``threading.Barrier(nranks)`` objects without timeout, and records what each rank reports. Each cache messager
rank connects as a client and reaches the barriers through proxies. The registration stream
(``get_cache_info``) is scripted inside the rank process (see :mod:`fastdeploy.pd_fix_standin.script`), because the
order in which a rank's threads see it is what the scenarios control.
"""

import json
import threading
from multiprocessing.managers import BarrierProxy, BaseManager

from fastdeploy.pd_fix_standin import script as standin_script
from fastdeploy.pd_fix_standin.variant import WITH_7724

STANDIN_AUTHKEY = b"fastdeploy-standin"
BARRIER_NAMES = (
    "cache_info_barrier",
    "finish_add_cache_task_barrier",
    "begin_send_cache_barrier",
    "finish_send_cache_barrier",
)


class ScriptedCacheInfoBarrier:
    """The rank's proxy of the engine's ``cache_info_barrier``; tells the scripted streams when a wait returned (a
    ``reg<N>@barrier`` read is acknowledged then)."""

    def __init__(self, barrier):
        self._barrier = barrier

    def wait(self, *args, **kwargs):
        arrival = self._barrier.wait(*args, **kwargs)
        standin_script.cache_info_barrier_passed()
        return arrival

    def __getattr__(self, name):  # parties, abort, reset, ...: the proxy's own
        return getattr(self._barrier, name)


class EngineRecords:
    """Engine-side record of the per-rank reports, optionally appended to a JSON-lines file."""

    def __init__(self, record_path=None):
        self._lock = threading.Lock()
        self._record_path = record_path

    def put_finished_req(self, rank, finished_reqs):
        self._record("finished_req", rank, finished_reqs)

    def put_finished_add_cache_task_req(self, rank, request_ids):
        self._record("finished_add_cache_task_req", rank, request_ids)

    def _record(self, kind, rank, items):
        if not self._record_path:
            return
        with self._lock, open(self._record_path, "a", encoding="utf-8") as record_file:
            record_file.write(json.dumps({"event": kind, "rank": rank, "items": items}) + "\n")


class EngineWorkerQueue:
    """Server (engine process) or client (cache messager rank) of the engine's manager."""

    def __init__(
        self,
        address=("127.0.0.1", 0),
        authkey=STANDIN_AUTHKEY,
        is_server=False,
        num_client=1,
        client_id=-1,
        local_data_parallel_id=0,
        record_path=None,
    ):
        self.is_server = is_server
        self.num_client = num_client
        self.client_id = client_id
        self.local_data_parallel_id = local_data_parallel_id

        # A class per instance: BaseManager keeps its registry on the class.
        class QueueManager(BaseManager):
            pass

        if is_server:
            barriers = {name: threading.Barrier(num_client) for name in BARRIER_NAMES}
            records = EngineRecords(record_path)
            for name, barrier in barriers.items():
                QueueManager.register(f"get_{name}", callable=lambda barrier=barrier: barrier, proxytype=BarrierProxy)
            QueueManager.register("get_engine_records", callable=lambda: records)
            self.manager = QueueManager(address=tuple(address), authkey=authkey)
            self.server = self.manager.get_server()
            self.address = self.server.address
            return

        for name in BARRIER_NAMES:
            QueueManager.register(f"get_{name}", proxytype=BarrierProxy)
        QueueManager.register("get_engine_records")
        self.manager = QueueManager(address=tuple(address), authkey=authkey)
        self.manager.connect()
        self.address = tuple(address)
        self.engine_records = self.manager.get_engine_records()
        self.cache_info_barrier = ScriptedCacheInfoBarrier(self.manager.get_cache_info_barrier())
        if not WITH_7724:
            # #7724 removed the finish_add_cache_task barrier and report.
            self.finish_add_cache_task_barrier = self.manager.get_finish_add_cache_task_barrier()
        self.begin_send_cache_barrier = self.manager.get_begin_send_cache_barrier()
        self.finish_send_cache_barrier = self.manager.get_finish_send_cache_barrier()

    def serve_forever(self):
        """Engine side: serve the ranks until the process is killed."""
        self.server.serve_forever()

    def get_cache_info(self):
        """The next scripted registration read of this rank (non-blocking; ``[]`` when none is due)."""
        return standin_script.next_cache_infos()

    def put_finished_req(self, finished_reqs):
        """Report ``[[request_id, status], ...]`` to the engine, which records it per rank."""
        self.engine_records.put_finished_req(self.client_id, finished_reqs)

    if not WITH_7724:

        def put_finished_add_cache_task_req(self, request_ids):
            """Pre-#7724: report the request ids whose cache task was registered in this read."""
            self.engine_records.put_finished_add_cache_task_req(self.client_id, request_ids)
