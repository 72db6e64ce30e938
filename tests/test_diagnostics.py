"""Batch journal, watchdog, fault-injection parsing and ``diagnose``, in process."""

import queue
import threading
import time

import pytest

from fastdeploy_pd_fix.cli import main as cli_main
from fastdeploy_pd_fix.diagnostics import (
    BatchJournal,
    Injection,
    Watchdog,
    diagnose,
    first_divergence,
    injected_delay,
    next_sequence_hash,
    parse_injection,
    watchdog_deadline,
)


def test_journal_logs_queued_batches_with_a_rolling_hash_and_tracks_the_held_batch():
    lines, batch_queue = [], queue.Queue()
    journal = BatchJournal(batch_queue, lines.append)
    batch_queue.put([(0, 4), (1, 4)])
    batch_queue.put([(0, 8)])
    expected_first = next_sequence_hash("", [(0, 4), (1, 4)])
    assert lines[0] == f"fastdeploy_pd_fix: queued batch #1 [(0, 4), (1, 4)] seq_hash={expected_first}"
    assert lines[1].endswith(f"seq_hash={next_sequence_hash(expected_first, [(0, 8)])}")
    assert journal.held_for() == (None, 0.0)
    assert batch_queue.get() == [(0, 4), (1, 4)]
    held, seconds = journal.held_for()
    assert held == [(0, 4), (1, 4)] and seconds >= 0
    batch_queue.get()
    assert journal.held_for()[0] == [(0, 8)]


def test_sequence_hash_depends_on_order():
    a, b = [(0, 4)], [(1, 4)]
    assert next_sequence_hash(next_sequence_hash("", a), b) != next_sequence_hash(next_sequence_hash("", b), a)


def test_watchdog_reports_a_held_batch_once_with_state_and_stacks():
    journal = BatchJournal(queue.Queue(), lambda line: None)
    journal.record_queued([(0, 4)])
    reports = []
    watchdog = Watchdog(0.5, journal, lambda: "waiting layer-0 signals: []", reports.append)
    assert watchdog.stall() is None
    journal.held_batch, journal.held_since = [(0, 4)], time.monotonic() - 2.0  # the send thread is stuck
    stall = watchdog.stall()
    assert "held batch [(0, 4)] for 2." in stall
    report = watchdog.report(stall)
    assert "WATCHDOG: stalled longer than 0.5s" in report and "#1 [(0, 4)] seq_hash=" in report
    assert "waiting layer-0 signals" in report and "thread stacks:" in report and "File " in report


def test_watchdog_thread_reports_head_of_line_wait_once():
    journal = BatchJournal(queue.Queue(), lambda line: None)
    reported = threading.Event()
    reports = []

    def log(text):
        reports.append(text)
        reported.set()

    watchdog = Watchdog(0.05, journal, lambda: "state", log)
    watchdog.head_waiting_since = time.monotonic() - 1.0  # the oldest signal has been waiting for a second
    watchdog.start()
    assert reported.wait(10), "watchdog did not report a stalled head-of-line signal"
    watchdog.stop.set()
    watchdog.thread.join(10)
    assert len(reports) == 1 and "oldest layer-0 signal has waited" in reports[0]


def test_watchdog_head_clock_restarts_when_the_head_moves(monkeypatch):
    clock = iter([10.0, 20.0, 30.0])
    monkeypatch.setattr("fastdeploy_pd_fix.diagnostics.time.monotonic", lambda: next(clock))
    watchdog = Watchdog(1.0, BatchJournal(queue.Queue(), lambda line: None), lambda: "", lambda text: None)
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


def write_rank_log(directory, rank, batches):
    digest, lines = "", ["2026-11-25 INFO something else"]
    for number, batch in enumerate(batches, 1):
        digest = next_sequence_hash(digest, batch)
        lines.append(f"2026-11-25 INFO fastdeploy_pd_fix: queued batch #{number} {batch} seq_hash={digest}")
    (directory / f"cache_messager_rank{rank}.log").write_text("\n".join(lines) + "\n")


def test_diagnose_finds_first_divergence(tmp_path, capsys):
    write_rank_log(tmp_path, 0, [[(0, 4), (1, 4)]])
    write_rank_log(tmp_path, 1, [[(0, 4)], [(1, 4)]])
    code, report = diagnose(tmp_path)
    assert code == 1 and "first divergence at batch #1" in report
    assert "rank 0: [(0, 4), (1, 4)]" in report and "rank 1: [(0, 4)]" in report
    assert cli_main(["diagnose", str(tmp_path)]) == 1 and "first divergence" in capsys.readouterr().out


def test_diagnose_none_when_sequences_agree_even_if_one_rank_is_behind(tmp_path):
    write_rank_log(tmp_path, 0, [[(0, 4)], [(1, 4)]])
    write_rank_log(tmp_path, 1, [[(0, 4)]])
    code, report = diagnose(tmp_path)
    assert code == 0 and report.startswith("none") and "rank 0: 2 batches, rank 1: 1 batches" in report


@pytest.mark.parametrize("ranks", [(), (0,)])
def test_diagnose_without_comparable_logs(tmp_path, ranks):
    for rank in ranks:
        write_rank_log(tmp_path, rank, [[(0, 4)]])
    assert diagnose(tmp_path)[0] == 2


def test_first_divergence_of_empty_input():
    assert first_divergence({}) is None
