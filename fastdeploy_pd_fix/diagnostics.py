"""What operators get when a PD deployment hangs: batch journal, watchdog, fault injection, ``diagnose``.

* :class:`BatchJournal` observes ``cache_prefilled_engine_ids_queue`` (its ``put``/``get`` are wrapped on the
  instance, so a send thread already blocked in ``get`` keeps working) and logs every queued batch with a rolling
  fingerprint of the sequence, ``seq_hash``, that is equal on every rank until the ranks diverge.
* :class:`Watchdog` (``FD_PD_FIX_WATCHDOG_S``, off unless set) logs once, loudly, when the send thread has held a
  batch (at a barrier or sending) or the oldest layer-0 signal has waited longer than the deadline: the recent
  batch sequence, waiting signals, registered tasks and every thread's stack. It only observes.
* :func:`parse_injection` reads ``FD_PD_FIX_INJECT`` (tests and the GPU e2e run force either side of the race).
* :func:`diagnose` reads all ranks' cache messager logs and reports the first divergence.
"""

from __future__ import annotations

import faulthandler
import hashlib
import os
import re
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

ENV_WATCHDOG = "FD_PD_FIX_WATCHDOG_S"
ENV_INJECT = "FD_PD_FIX_INJECT"
RECENT_BATCHES = 32
MAX_INJECTED_DELAY_MS = 3_600_000
QUEUED_LINE = re.compile(r"queued batch #(?P<number>\d+) (?P<batch>\[.*?\]) seq_hash=(?P<hash>[0-9a-f]+)")
RANK_LOG = re.compile(r"cache_messager_rank(?P<rank>\d+)\.log$")


def next_sequence_hash(previous: str, batch) -> str:
    """Rolling fingerprint of a batch sequence (8 hex digits)."""
    return hashlib.blake2b(f"{previous}{[tuple(task) for task in batch]}".encode(), digest_size=4).hexdigest()


class BatchJournal:
    """Observes one messager's batch queue: what was queued, in which order, and what the send thread holds."""

    def __init__(self, batch_queue, log: Callable[[str], None]):
        self.log = log
        self.lock = threading.Lock()
        self.recent: deque = deque(maxlen=RECENT_BATCHES)
        self.queued = 0
        self.sequence_hash = ""
        self.held_batch = None
        self.held_since: Optional[float] = None
        original_put, original_get = batch_queue.put, batch_queue.get

        def put(batch, *args, **kwargs):
            self.record_queued(batch)
            return original_put(batch, *args, **kwargs)

        def get(*args, **kwargs):
            with self.lock:
                self.held_batch, self.held_since = None, None  # back at the queue: nothing held
            batch = original_get(*args, **kwargs)
            with self.lock:
                self.held_batch, self.held_since = batch, time.monotonic()
            return batch

        batch_queue.put, batch_queue.get = put, get

    def record_queued(self, batch) -> None:
        with self.lock:
            self.queued += 1
            self.sequence_hash = next_sequence_hash(self.sequence_hash, batch)
            self.recent.append((self.queued, list(batch), self.sequence_hash))
            line = f"fastdeploy_pd_fix: queued batch #{self.queued} {list(batch)} seq_hash={self.sequence_hash}"
        self.log(line)

    def held_for(self) -> Tuple[Optional[list], float]:
        with self.lock:
            if self.held_since is None:
                return None, 0.0
            return self.held_batch, time.monotonic() - self.held_since


class Watchdog:
    """Logs a full report once per stall; never touches what is released."""

    def __init__(self, deadline_s: float, journal: BatchJournal, describe_state: Callable[[], str], log):
        self.deadline_s = deadline_s
        self.journal = journal
        self.describe_state = describe_state
        self.log = log
        self.head_waiting_since: Optional[float] = None
        self.reported = False
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, name="fd_pd_fix_watchdog", daemon=True)

    def start(self) -> "Watchdog":
        self.thread.start()
        return self

    def note_release_step(self, progressed: bool, waiting: bool) -> None:
        """Called by the adapters after each release step: did the oldest signal move, does one still wait?

        The clock measures how long the *current* oldest signal has waited, so it restarts whenever something
        was released or dropped: under steady load some signal is nearly always waiting, and that is no stall.
        """
        if not waiting:
            self.head_waiting_since = None
        elif progressed or self.head_waiting_since is None:
            self.head_waiting_since = time.monotonic()

    def stall(self) -> Optional[str]:
        batch, held_s = self.journal.held_for()
        if batch is not None and held_s > self.deadline_s:
            return f"the send thread has held batch {batch} for {held_s:.1f}s (barrier wait or transfer)"
        since = self.head_waiting_since
        if since is not None and time.monotonic() - since > self.deadline_s:
            return f"the oldest layer-0 signal has waited {time.monotonic() - since:.1f}s for its registration"
        return None

    def run(self) -> None:
        while not self.stop.wait(min(1.0, self.deadline_s / 4)):
            try:
                stall = self.stall()
                if stall is None:
                    self.reported = False
                elif not self.reported:
                    self.reported = True
                    self.log(self.report(stall))
            except Exception as error:  # the watchdog must never take anything down with it
                self.log(f"fastdeploy_pd_fix WATCHDOG: failed to report: {error!r}")

    def report(self, stall: str) -> str:
        with self.journal.lock:
            recent = [
                f"  #{number} {batch} seq_hash={sequence_hash}" for number, batch, sequence_hash in self.journal.recent
            ]
        with tempfile.TemporaryFile("w+") as stacks:
            faulthandler.dump_traceback(file=stacks, all_threads=True)
            stacks.seek(0)
            stack_text = stacks.read()
        return "\n".join(
            [
                f"fastdeploy_pd_fix WATCHDOG: stalled longer than {self.deadline_s}s: {stall}",
                f"recent batches (last {len(recent)} of {self.journal.queued}):",
                *recent,
                self.describe_state(),
                "thread stacks:",
                stack_text,
            ]
        )


def watchdog_deadline() -> Optional[float]:
    """``FD_PD_FIX_WATCHDOG_S`` as seconds, or None when unset or not a positive number."""
    value = os.environ.get(ENV_WATCHDOG, "").strip()
    try:
        deadline = float(value) if value else None
    except ValueError:
        return None
    return deadline if deadline and deadline > 0 else None


@dataclass(frozen=True)
class Injection:
    """Delay ``stage`` ("registration" or "signal") on tensor-parallel rank ``rank`` by ``delay_s`` per event."""

    stage: str
    rank: int
    delay_s: float


def parse_injection(value: str) -> Tuple[List[Injection], List[str]]:
    """Parse ``registration:rank=1:delay_ms=500,signal:rank=0:delay_ms=20``; returns injections and problems."""
    injections, problems = [], []
    for item in filter(None, (part.strip() for part in value.split(","))):
        stage, *fields = item.split(":")
        options = dict(field.split("=", 1) for field in fields if "=" in field)
        try:
            if stage not in ("registration", "signal"):
                raise ValueError(f"unknown stage {stage!r}")
            delay_ms = float(options["delay_ms"])
            if not 0 <= delay_ms <= MAX_INJECTED_DELAY_MS:  # also false for nan; time.sleep would raise later
                raise ValueError(f"delay_ms {options['delay_ms']!r} not in [0, {MAX_INJECTED_DELAY_MS}]")
            injections.append(Injection(stage, int(options["rank"]), delay_ms / 1000.0))
        except (KeyError, ValueError) as error:
            problems.append(f"{ENV_INJECT} item {item!r} ignored: {error!r}")
    return injections, problems


def injected_delay(injections: List[Injection], stage: str, rank) -> float:
    return sum(injection.delay_s for injection in injections if injection.stage == stage and injection.rank == rank)


@dataclass
class Divergence:
    """The first batch at which two ranks' queued sequences differ."""

    number: int
    batches: Dict[int, Optional[str]]


def read_rank_sequences(log_dir) -> Dict[int, List[Tuple[str, str]]]:
    """Per rank: the queued batches ``(batch, seq_hash)`` in order, from ``cache_messager_rank{R}.log`` files."""
    sequences: Dict[int, List[Tuple[str, str]]] = {}
    for path in sorted(Path(log_dir).rglob("cache_messager_rank*.log")):
        match = RANK_LOG.search(path.name)
        if not match:
            continue
        entries = sequences.setdefault(int(match["rank"]), [])
        for line in path.read_text(errors="replace").splitlines():
            queued = QUEUED_LINE.search(line)
            if queued:
                entries.append((queued["batch"], queued["hash"]))
    return sequences


def first_divergence(sequences: Dict[int, List[Tuple[str, str]]]) -> Optional[Divergence]:
    """The first position where ranks queued different batches (a shorter rank is not a divergence)."""
    length = min((len(entries) for entries in sequences.values()), default=0)
    for index in range(length):
        if len({entries[index][1] for entries in sequences.values()}) > 1:
            return Divergence(index + 1, {rank: entries[index][0] for rank, entries in sequences.items()})
    return None


def diagnose(log_dir) -> Tuple[int, str]:
    """Exit code and report: 0 no divergence, 1 divergence, 2 no usable logs."""
    sequences = read_rank_sequences(log_dir)
    if not sequences or not any(sequences.values()):
        return 2, f"no 'queued batch' lines in cache_messager_rank*.log under {log_dir} (is the plugin installed?)"
    counts = ", ".join(f"rank {rank}: {len(entries)} batches" for rank, entries in sorted(sequences.items()))
    if len(sequences) < 2:
        return 2, f"only one rank's log found ({counts}); nothing to compare"
    divergence = first_divergence(sequences)
    if divergence is None:
        return 0, f"none: the ranks' batch sequences agree ({counts})"
    lines = [f"first divergence at batch #{divergence.number} ({counts}):"]
    lines += [f"  rank {rank}: {batch}" for rank, batch in sorted(divergence.batches.items())]
    return 1, "\n".join(lines)
