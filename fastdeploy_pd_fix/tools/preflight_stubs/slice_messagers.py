"""The real messager ranks of an engine slice (in a slice tree: ``fastdeploy._preflight.slice_messagers``).

The release's own ``cache_messager.py`` runs unmodified as a script in one process per rank (:class:`MessagerRanks`,
:func:`run_with_messagers`) on the mailbox of the slice's prefill instance (:mod:`.slice_prefill`): real clients of
it (served where the release's messager looks for it, a Unix socket in ``/dev/shm``), kv signals from the
:class:`Worker` through a channel per rank (:mod:`.slice_rank`), the preflight tap reporting their reads, batches,
sends and ground truth back. Several scenarios play one after another in one run (:func:`play_episode`), each rank
told on its channel where an episode starts. The token processor (:class:`TokenProcessor`) finishes an orphan once
computed, a routed request once ``get_finished_req`` reported its transfer.
"""

import ast
import importlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Listener
from pathlib import Path

from fastdeploy._preflight.slice_prefill import (
    ADMITTED,
    ALLOCATED,
    Stuck,
    admit,
    decisions,
    free_slots,
    request_ids,
    start_engine,
    start_prepare_threads,
    stop_engine,
    wait_until,
)
from fastdeploy._preflight.slice_rank import CHANNEL_AUTHKEY, ENV_SLICE

#: Layers of the model (one kv signal per layer per step), and how long the ranks may take to start (they import
#: paddle).
NUM_LAYERS = 2
STARTUP_TIMEOUT_S = 90.0
#: What a rank reports on its channel (:mod:`.slice_rank`).
REPORT_KINDS = ("ready", "read", "queued", "batch", "send", "finished")
#: Where the release's messager looks for the mailbox when ``FD_ENGINE_TASK_QUEUE_WITH_SHM`` is on (the default):
#: its ``engine_worker_queue_port`` names the socket. Over TCP every manager proxy the ranks create costs ~40 ms
#: (delayed acknowledgements), some 4 s per rank at start-up; over this Unix socket, a few ms.
SHM_MAILBOX = "/dev/shm/fd_task_queue_{port}.sock"
#: :func:`play_episode`: compute until every admitted request is computed.
CHUNKS_UNBOUNDED = 1 << 30


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
            wait_until(self.all_ready, "every messager rank reporting its cache ready", STARTUP_TIMEOUT_S, self.died)
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
    """The model runner: each :meth:`step` computes one chunk (up to ``chunk_tokens``) of every admitted request
    still in prefill and emits one kv signal per layer listing them all by slot, as the release's kv-signal writer
    lists every batch index with ``seq_lens_encoder > 0`` (orphans included)."""

    def __init__(self, resource_manager, ranks: MessagerRanks, chunk_tokens: int):
        self.resource_manager = resource_manager
        self.ranks = ranks
        self.chunk_tokens = chunk_tokens
        self.chunk_ends = {}  # request id -> the end of each chunk computed, in order

    def computed(self, request) -> int:
        """How many of ``request``'s tokens were computed: the end of its last chunk."""
        return self.chunk_ends.get(request.request_id, [0])[-1]

    def in_prefill(self) -> list:
        return sorted(
            (
                request
                for request in list(self.resource_manager.running)
                if self.computed(request) < request.need_prefill_tokens
            ),
            key=lambda request: request.idx,
        )

    def step(self) -> list:
        """Compute one step; the requests whose prefill it completed."""
        requests = self.in_prefill()
        chunks = []
        for request in requests:
            offset = self.computed(request)
            chunks.append((request.idx, offset, min(self.chunk_tokens, request.need_prefill_tokens - offset)))
        owners = [request.request_id for request in requests]
        blocks = {request.request_id: list(request.block_tables) for request in requests if request.disaggregate_info}
        for layer in range(NUM_LAYERS):
            self.ranks.emit(layer, chunks, owners, blocks)
        for request, (_, offset, length) in zip(requests, chunks):
            self.chunk_ends.setdefault(request.request_id, []).append(offset + length)
        return [request for request in requests if self.computed(request) == request.need_prefill_tokens]


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
    slots, free_at_start, outcome, error = {}, free_slots(engine), "error", None
    awaiting = set()  # allocated a slot, not waited for their admission yet

    def progress():
        """Anything the ranks, the token processor or the decode instance did."""
        return ranks.report_count(), len(token_processor.reported), len(engine.peer.answers)

    def wait(condition, what):
        wait_until(condition, what, quiet_s, ranks.died, progress)

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
                wait(lambda: awaiting <= request_ids(engine.resource_manager.running), f"{sorted(awaiting)} admitted")
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
        "free_slots": free_at_start,
        "chunk_ends": {spec["id"]: worker.chunk_ends[spec["id"]] for spec in specs if spec["id"] in worker.chunk_ends},
        "elapsed_s": round(time.monotonic() - started, 2),
        "reported": token_processor.since(reported_mark),
        "ranks": ranks.since(mark),
    }


def run_with_messagers(modules: dict, nranks: int, episodes: list, socket_dir: str, messager: dict) -> dict:
    """Play ``episodes`` (scenarios) one after another through one release engine with real messager ranks
    (``messager``: ``{"script", "log_dir", "interleaving", "chunk_tokens"}``, the interleaving per rank over the whole
    run, signal events named ``sig:<episode>:<n>``; the worker's tokens per step). In a scenario each wave of ``waves``
    is handed to the scheduler (once the transfers of the waves before ended where ``after_transfers`` says so) and
    waited for (``wait_for``, per wave: ``"admitted"``, default, or ``"allocated"``), then the worker steps
    (``compute_after``, per wave: True until every admitted request is computed, default; False none; a number, that
    many steps); an orphan (no ``disaggregate_info``) finishes once computed (``"holds"``: once the transfers of the
    waves before it ended), a routed request when the token processor has its transfer reported. The episode ends
    "finished" when every routed request was reported, freed and reported finished by every rank, "hang" when a wait
    for it saw nothing happen (no report of a rank, the token processor or the decode instance) for ``deadline_s``,
    "error" when a rank died or a step failed; the episodes after one that did not finish are not played."""
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
    worker = Worker(engine.resource_manager, ranks, messager["chunk_tokens"])
    token_processor = TokenProcessor(engine)
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
        "decisions": decisions(),
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
