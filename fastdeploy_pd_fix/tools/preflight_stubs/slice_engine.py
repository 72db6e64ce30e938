"""The engine process of an engine slice (imported in a slice tree as ``fastdeploy._preflight.slice_engine``).

The release's own engine files run here unmodified, on a prefill instance whose every other part stands in
(:mod:`.slice_prefill`: the resource manager's base class, the config, the scheduler, zmq and the decode instance).
The plugin's engine patch is applied by its start-up hook, through the same import path as in a deployment. The
messager ranks are either :class:`MailboxReader` threads (what a cache messager's registration loop does with the
mailbox: ``get_cache_info``, then ``cache_info_barrier`` after every non-empty read, recording every item in order;
:func:`run`; a request is finished, ``finish_requests``, when the scenario says it has run), or the release's own
``cache_messager.py`` run unmodified as a script in one process per rank (:mod:`.slice_messagers`).

It writes one JSON object: the plugin's decisions, each request's slot, and each rank's stream (readers) or, per
episode, reports (real ranks). The host side (:mod:`fastdeploy_pd_fix.tools.engine_slice`) judges it.
"""

import importlib
import json
import logging
import os
import sys
import tempfile
import threading
import time

from fastdeploy._preflight.slice_messagers import run_with_messagers
from fastdeploy._preflight.slice_prefill import (
    STEP_TIMEOUT_S,
    Stuck,
    admit,
    decisions,
    free_slots,
    start_engine,
    start_prepare_threads,
    stop_engine,
)

#: The item that ends every rank's read loop (put last, after the scenario's own puts).
END_OF_STREAM = {"request_id": "fd-pd-fix-slice:end"}


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
    slots, free_at_start = {}, free_slots(engine)
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
        "decisions": decisions(),
        "slots": slots,
        "free_slots": free_at_start,
        "ranks": [_jsonable(reader.items) for reader in readers],
        "rank_errors": [reader.error for reader in readers],
    }


def _jsonable(item):
    return json.loads(json.dumps(item, default=repr))


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
