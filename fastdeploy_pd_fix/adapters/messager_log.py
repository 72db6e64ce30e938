"""What one messager logs over weeks of running, each kind of line bounded.

* :class:`BatchJournal`: every queued batch is logged as a :data:`QUEUED_LINE`, ``queued batch #N [...]
  seq_hash=H``, a rolling fingerprint equal on every rank until their sequences diverge (``fastdeploy-pd-fix
  diagnose`` reads it; the watchdog reports the recent ones).
* :class:`CountSummary`: counters of what one process's plugin did, in one line a minute at most.
* :class:`ErrorBackoff`: the pause after each failure of an endless loop, and a bounded report of a repeating error.

Standard library only (``make-patch`` copies this package into FastDeploy).
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections import deque
from typing import Callable, Dict

#: Pause after an unexpected error in the consume loop; doubled after each further error in a row, up to
#: ERROR_BACKOFF_MAX_S, and back to the start once a buffer is handled: a persistent fault costs one attempt a second.
ERROR_BACKOFF_S = 0.01
ERROR_BACKOFF_MAX_S = 1.0
#: Once the pause is at its maximum, an error repeated in a row gets one line every this many repeats (about one a
#: minute) instead of one per attempt: weeks of a persistent fault must not fill the disk.
ERROR_SUMMARY_EVERY = 60
#: The least time between two summary lines of one process (:class:`CountSummary`).
SUMMARY_EVERY_S = 60.0
#: How many queued batches the journal keeps for reports.
RECENT_BATCHES = 32
#: One journal line; ``diagnose`` finds it after any prefix (logger format, ``fastdeploy_pd_fix:``).
QUEUED_LINE = re.compile(r"queued batch #(?P<number>\d+) (?P<batch>\[.*?\]) seq_hash=(?P<hash>[0-9a-f]+)")


def next_sequence_hash(previous: str, batch) -> str:
    """Rolling fingerprint of a batch sequence (8 hex digits)."""
    return hashlib.blake2b(f"{previous}{[tuple(task) for task in batch]}".encode(), digest_size=4).hexdigest()


class BatchJournal:
    """Numbers and fingerprints the batches one messager queues, and logs each as a :data:`QUEUED_LINE`."""

    def __init__(self, log: Callable[[str], None], prefix: str = ""):
        self.log = log
        self.prefix = prefix
        self.lock = threading.Lock()
        self.recent: deque = deque(maxlen=RECENT_BATCHES)
        self.queued = 0
        self.sequence_hash = ""

    def record(self, batch) -> None:
        with self.lock:
            self.queued += 1
            self.sequence_hash = next_sequence_hash(self.sequence_hash, batch)
            self.recent.append((self.queued, list(batch), self.sequence_hash))
            line = f"{self.prefix}queued batch #{self.queued} {list(batch)} seq_hash={self.sequence_hash}"
        self.log(line)


class CountSummary:
    """Counters of what one process's plugin did, logged as one line when they changed, at most once per
    :data:`SUMMARY_EVERY_S`, from whichever thread counts next: over weeks the log shows the plugin at work (or at
    fault) without a line per event. ``clock`` is injectable for tests."""

    def __init__(self, log: Callable[[str], None], prefix: str, clock: Callable[[], float] = time.monotonic):
        self.log, self.prefix, self.clock = log, prefix, clock
        self.lock = threading.Lock()
        self.counts: Dict[str, int] = {}
        self._logged: Dict[str, int] = {}
        self._logged_at = clock()

    def add(self, name: str, count: int = 1) -> None:
        if count <= 0:
            return
        with self.lock:
            self.counts[name] = self.counts.get(name, 0) + count
            if self.counts == self._logged or self.clock() - self._logged_at < SUMMARY_EVERY_S:
                return
            self._logged, self._logged_at = dict(self.counts), self.clock()
            line = f"{self.prefix}summary: " + ", ".join(f"{name} {value}" for name, value in self.counts.items())
        self.log(line)


class ErrorBackoff:
    """The pause after each failed attempt of an endless loop, and the lines that report the failures.

    An error is the same as the one before when its type and message are. The first of a run of the same error is
    logged with its traceback; each repeat gets a one-line count while the pause still grows (a few lines in the
    first second: a short burst stays visible error by error), then one line every :data:`ERROR_SUMMARY_EVERY`
    repeats. When the run ends (a success or another error) with repeats not logged one by one, a line counts them."""

    def __init__(self, logger, what: str):
        self.logger = logger
        self.what = what
        self.pause = 0.0  # 0: the last attempt succeeded
        self.error = ""  # "Type: message" of the run of errors going on
        self.count = 0  # attempts in a row that failed with self.error
        self.reported = 0  # self.count when its last line was logged

    def failed(self, error: Exception) -> float:
        """Log ``error`` (called in its ``except`` block, for the traceback) and return the pause before the next
        attempt."""
        previous = self.pause
        self.pause = min(ERROR_BACKOFF_MAX_S, 2 * previous or ERROR_BACKOFF_S)
        described = f"{type(error).__name__}: {error}"
        if described != self.error:
            self._end_run()
            self.error, self.count, self.reported = described, 1, 1
            self.logger.exception(f"{self.what}; continuing, next attempt in {self.pause:g}s")
            return self.pause
        self.count += 1
        growing = previous < ERROR_BACKOFF_MAX_S
        if growing or self.count % ERROR_SUMMARY_EVERY == 0:
            self.reported = self.count
            reached = growing and self.pause >= ERROR_BACKOFF_MAX_S
            then = f"; from now on one line every {ERROR_SUMMARY_EVERY} repeats" if reached else ""
            self.logger.error(
                f"{self.what} again, {self.count} in a row (next attempt in {self.pause:g}s{then}): {described}"
            )
        return self.pause

    def succeeded(self) -> None:
        self._end_run()
        self.pause, self.error, self.count, self.reported = 0.0, "", 0, 0

    def _end_run(self) -> None:
        if self.count > self.reported:
            self.logger.error(f"{self.what}: {self.error} ended after {self.count} in a row")
