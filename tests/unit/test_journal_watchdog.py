"""Batch journal, queue observation, watchdog and fault-injection parsing, in process."""

import logging
import queue
import threading
import time
from types import SimpleNamespace

import pytest
from support.messager import StepMessager

from fastdeploy_pd_fix.adapters.messager_log import BatchJournal, CountSummary, next_sequence_hash
from fastdeploy_pd_fix.adapters.messager_step import make_step
from fastdeploy_pd_fix.config import Injection, parse_injection, watchdog_deadline
from fastdeploy_pd_fix.plugin import LOG_PREFIX
from fastdeploy_pd_fix.plugin.messager.inject import injected_delay
from fastdeploy_pd_fix.plugin.messager.observe import QueueObserver, Watchdog
from fastdeploy_pd_fix.plugin.messager.runtime import MessagerRuntime
from fastdeploy_pd_fix.policy.release import Released, policy_after_first_read


def observed_queue(log=lambda line: None, batch_queue=None):
    """A queue observed as in observe mode: puts journaled, gets tracked."""
    return QueueObserver(queue.Queue() if batch_queue is None else batch_queue, BatchJournal(log, LOG_PREFIX), True)


def test_journal_logs_queued_batches_with_a_rolling_hash_and_tracks_the_held_batch():
    lines, batch_queue = [], queue.Queue()
    observer = observed_queue(lines.append, batch_queue)
    batch_queue.put([(0, 4), (1, 4)])
    batch_queue.put([(0, 8)])
    expected_first = next_sequence_hash("", [(0, 4), (1, 4)])
    assert lines[0] == f"fastdeploy_pd_fix: queued batch #1 [(0, 4), (1, 4)] seq_hash={expected_first}"
    assert lines[1].endswith(f"seq_hash={next_sequence_hash(expected_first, [(0, 8)])}")
    assert observer.held_for() == (None, 0.0)
    assert batch_queue.get() == [(0, 4), (1, 4)]
    held, seconds = observer.held_for()
    assert held == [(0, 4), (1, 4)] and seconds >= 0
    batch_queue.get()
    assert observer.held_for()[0] == [(0, 8)]


def test_watchdog_reports_a_held_batch_once_with_state_and_stacks():
    observer = observed_queue()
    observer.journal.record([(0, 4)])
    reports = []
    watchdog = Watchdog(0.5, observer, lambda: "waiting layer-0 signals: []", reports.append)
    assert watchdog.stall() is None
    observer.held_batch, observer.held_since = [(0, 4)], time.monotonic() - 2.0  # the send thread is stuck
    stall = watchdog.stall()
    assert "held batch [(0, 4)] for 2." in stall
    report = watchdog.report(stall)
    assert "WATCHDOG: stalled longer than 0.5s" in report and "#1 [(0, 4)] seq_hash=" in report
    assert "waiting layer-0 signals" in report and "thread stacks:" in report and "File " in report


def test_watchdog_thread_reports_head_of_line_wait_once():
    observer = observed_queue()
    reported = threading.Event()
    reports = []

    def log(text):
        reports.append(text)
        reported.set()

    watchdog = Watchdog(0.05, observer, lambda: "state", log)
    watchdog.head_waiting_since = time.monotonic() - 1.0  # the oldest signal has been waiting for a second
    watchdog.start()
    assert reported.wait(10), "watchdog did not report a stalled head-of-line signal"
    watchdog.stop.set()
    watchdog.thread.join(10)
    assert len(reports) == 1 and "oldest layer-0 signal has waited" in reports[0]


def test_a_signal_upstream_parks_after_a_hand_over_is_no_head_of_line_wait():
    """Ordered keeps the oldest signal at the head of the log; upstream's pending buffer blocks nothing (rule 10: an
    orphan's signal stays there for ever without notices), so the watchdog must not count it as a stall."""
    step = make_step(StepMessager(), "ordered", logging.getLogger("test"), "")
    step.policy.add_signal([(3, 0, 4)])
    holder = SimpleNamespace(step=step, watchdog=Watchdog(0.5, observed_queue(), lambda: "", lambda text: None))
    MessagerRuntime.note_release(holder, Released())
    assert holder.watchdog.head_waiting_since is not None
    step.policy, _ = policy_after_first_read(step.policy, False, {})
    assert step.policy.has_waiting()
    MessagerRuntime.note_release(holder, Released())
    assert holder.watchdog.head_waiting_since is None


def test_watchdog_head_clock_restarts_when_the_head_moves(monkeypatch):
    clock = iter([10.0, 20.0, 30.0])
    monkeypatch.setattr("fastdeploy_pd_fix.plugin.messager.observe.time.monotonic", lambda: next(clock))
    watchdog = Watchdog(1.0, observed_queue(), lambda: "", lambda text: None)
    watchdog.note_release_step(progressed=False, waiting=True)
    assert watchdog.head_waiting_since == 10.0
    watchdog.note_release_step(progressed=False, waiting=True)  # same head still waiting: the clock keeps running
    assert watchdog.head_waiting_since == 10.0
    watchdog.note_release_step(progressed=True, waiting=True)  # a release moved the head: a new wait starts
    assert watchdog.head_waiting_since == 20.0
    watchdog.note_release_step(progressed=True, waiting=False)
    assert watchdog.head_waiting_since is None


def test_watchdog_deadline_env(monkeypatch):
    monkeypatch.setenv("FD_PD_FIX_WATCHDOG_S", "2.5")
    assert watchdog_deadline() == 2.5
    for value in ("", "0", "-1", "soon"):
        monkeypatch.setenv("FD_PD_FIX_WATCHDOG_S", value)
        assert watchdog_deadline() is None


def test_parse_injection_accepts_items_and_reports_bad_ones():
    injections, problems = parse_injection("registration:rank=1:delay_ms=500, signal:rank=0:delay_ms=20,bogus:rank=1")
    assert injections == [Injection("registration", 1, 0.5), Injection("signal", 0, 0.02)]
    assert len(problems) == 1 and "bogus" in problems[0]
    assert parse_injection("registration:rank=x:delay_ms=1")[1]
    assert injected_delay(injections, "registration", 1) == 0.5 and injected_delay(injections, "signal", 1) == 0


class RecordingLogger:
    def __init__(self, lines):
        self.lines = lines

    def info(self, message):
        self.lines.append(message)

    warning = error = exception = info


@pytest.mark.parametrize("observer_first", [True, False], ids=["observer-then-attach", "attach-then-observer"])
def test_observer_and_attached_step_wrap_get_together(observer_first):
    # Release modes: the step journals what it queues (the observer journals no put), the observer tracks the held
    # batch for the watchdog, attach's wrapper shows the send thread its batch's own task; either wrapping order.
    lines, messager = [], StepMessager()
    step = make_step(messager, "ordered", RecordingLogger(lines), LOG_PREFIX)
    observer = None
    if observer_first:
        observer = QueueObserver(messager.cache_prefilled_engine_ids_queue, step.journal, journal_puts=False)
    step.attach()
    if not observer_first:
        observer = QueueObserver(messager.cache_prefilled_engine_ids_queue, step.journal, journal_puts=False)
    messager.idx_cache_task_dict[2] = {"request_id": "A", "need_prefill_tokens": 4}
    step.handle_buffer([1, 0, 2, 0, 4])
    messager.idx_cache_task_dict[2] = {"request_id": "B", "need_prefill_tokens": 4}  # A aborted, B on its slot
    batch = messager.cache_prefilled_engine_ids_queue.get()
    assert batch == [(2, 4)] and observer.held_for()[0] is batch
    assert messager.idx_cache_task_dict[2]["request_id"] == "A"
    assert len([line for line in lines if "queued batch #" in line]) == 1


def test_the_summary_is_one_line_a_minute_at_most_and_only_after_a_change():
    now, lines = [0.0], []
    summary = CountSummary(lines.append, "p: ", clock=lambda: now[0])
    summary.add("batches queued")  # within the first minute: counted, not logged
    now[0] = 61.0
    summary.add("batches queued", 2)
    summary.add("tasks dropped", 0)  # nothing counted: no change
    now[0] = 90.0
    summary.add("tasks dropped")  # counted; the next line may come at 121 s
    now[0] = 125.0
    summary.add("orphan notices read")
    assert lines == [
        "p: summary: batches queued 3",
        "p: summary: batches queued 3, tasks dropped 1, orphan notices read 1",
    ]
