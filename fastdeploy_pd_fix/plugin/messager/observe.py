"""What the plugin watches on a messager: the batch its send thread holds, and a watchdog for stalls.

* :class:`QueueObserver` wraps ``get`` of one messager's ``cache_prefilled_engine_ids_queue`` on the instance (so
  a send thread already blocked in ``get`` keeps working) to know which batch the send thread holds and since
  when. In observe mode it also wraps ``put``, so that the running release's own batches are journaled through
  :class:`~fastdeploy_pd_fix.adapters.messager_log.BatchJournal`; in the other modes the
  :class:`~fastdeploy_pd_fix.adapters.messager_step.MessagerStep` journals each batch it queues, and ``put`` stays as
  it is: every batch is journaled exactly once. There the step's ``attach`` wraps ``get`` once more (to show the
  send thread its batch's own tasks); the two wrappers return the same batch object, in either order.
* :class:`Watchdog` (``FD_PD_FIX_WATCHDOG_S``, off unless set) logs once, loudly, when the send thread has held a
  batch (at a barrier or sending) or the oldest layer-0 signal has waited longer than the deadline: the recent
  batch sequence, the release state, and every thread's stack. It only observes.
"""

from __future__ import annotations

import faulthandler
import tempfile
import threading
import time
from typing import Callable, Optional, Tuple

from fastdeploy_pd_fix.adapters.messager_log import BatchJournal


class QueueObserver:
    """The batch the send thread holds (taken from the queue, not yet back for the next one) and the journal."""

    def __init__(self, batch_queue, journal: BatchJournal, journal_puts: bool):
        self.journal = journal
        self.lock = threading.Lock()
        self.held_batch = None
        self.held_since: Optional[float] = None
        original_get = batch_queue.get

        def get(*args, **kwargs):
            with self.lock:
                self.held_batch, self.held_since = None, None  # back at the queue: nothing held
            batch = original_get(*args, **kwargs)
            with self.lock:
                self.held_batch, self.held_since = batch, time.monotonic()
            return batch

        batch_queue.get = get
        if journal_puts:
            original_put = batch_queue.put

            def put(batch, *args, **kwargs):
                journal.record(batch)
                return original_put(batch, *args, **kwargs)

            batch_queue.put = put

    def held_for(self) -> Tuple[Optional[list], float]:
        with self.lock:
            if self.held_since is None:
                return None, 0.0
            return self.held_batch, time.monotonic() - self.held_since


class Watchdog:
    """Logs a full report once per stall; never touches what is released."""

    def __init__(self, deadline_s: float, observer: QueueObserver, describe_state: Callable[[], str], log):
        self.deadline_s = deadline_s
        self.observer = observer
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
        """Called after each release step: did the oldest signal move, does one still wait?

        The clock measures how long the *current* oldest signal has waited, so it restarts whenever something
        was released or dropped: under steady load some signal is nearly always waiting, and that is no stall.
        """
        if not waiting:
            self.head_waiting_since = None
        elif progressed or self.head_waiting_since is None:
            self.head_waiting_since = time.monotonic()

    def stall(self) -> Optional[str]:
        batch, held_s = self.observer.held_for()
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
        journal = self.observer.journal
        with journal.lock:
            recent = [
                f"  #{number} {batch} seq_hash={sequence_hash}" for number, batch, sequence_hash in journal.recent
            ]
            queued = journal.queued
        with tempfile.TemporaryFile("w+") as stacks:
            faulthandler.dump_traceback(file=stacks, all_threads=True)
            stacks.seek(0)
            stack_text = stacks.read()
        return "\n".join(
            [
                f"fastdeploy_pd_fix WATCHDOG: stalled longer than {self.deadline_s}s: {stall}",
                f"recent batches (last {len(recent)} of {queued}):",
                *recent,
                self.describe_state(),
                "thread stacks:",
                stack_text,
            ]
        )
