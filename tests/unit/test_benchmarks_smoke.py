"""Smoke tests of ``benchmarks/``: every piece at tiny sizes, behaviour only (no timing assertions)."""

import json

import pytest

from benchmarks import barrier_rounds, head_of_line, parse, run
from benchmarks.workload import TimedHistory, TimedRequest, TimedSignal, WorkloadSpec, make_workload
from fastdeploy_pd_fix.engine_history.occupancy import prefill_request

SUMMARY_KEYS = {"parse_speedup_64", "ordered_round_ratio", "upstream_round_ratio", "hol_p99_extra_ms"}


def hand_workload(a_delay_ms):
    """A (slot 0, two chunks of 4) and B (slot 1, one chunk) share signal 0; A's final chunk is signal 1.

    B registers at 1 ms, before any signal; A at ``a_delay_ms``.
    """
    a = TimedRequest(prefill_request("A", 0, (4, 8)), 0.0, a_delay_ms)
    b = TimedRequest(prefill_request("B", 1, (4,)), 0.0, 1.0)
    signals = [TimedSignal(0, 2.0, ((0, 0, 4), (1, 0, 4)), ("A", "B")), TimedSignal(1, 12.0, ((0, 4, 8),), ("A",))]
    return TimedHistory([a, b], signals)


@pytest.mark.parametrize(
    "a_delay_ms, upstream_waits",
    [
        (1.0, "bbfbf"),  # A registered early: upstream sends one batch per task
        (25.0, "bfbf"),  # A registered after both its signals: upstream collapses its chunks into one batch
    ],
)
def test_hand_checkable_rounds(a_delay_ms, upstream_waits):
    counted = barrier_rounds.count_rounds(hand_workload(a_delay_ms))
    assert counted["waits"]["original"] == "bfbf"
    assert counted["waits"]["ordered"] == "bfbf"  # one begin per signal, one finish per request
    assert counted["waits"]["upstream"] == upstream_waits
    ordered = counted["modes"]["ordered"]
    assert ordered["rounds"] == counted["signals"] + counted["requests"] == 4
    for counts in counted["modes"].values():
        assert all(type(counts[key]) is int for key in ("batches", "finishes", "rounds"))
        assert counts["finishes"] == counted["requests"]


def test_generated_workload_ordered_rounds_are_signals_plus_requests():
    counted = barrier_rounds.count_rounds(make_workload(WorkloadSpec(4, 6, seed=3)))
    modes = counted["modes"]
    assert modes["ordered"]["rounds"] == counted["signals"] + counted["requests"] == modes["original"]["rounds"]
    assert modes["ordered"]["ratio"] == 1.0
    assert modes["upstream"]["rounds"] >= modes["ordered"]["rounds"]


def test_replay_on_real_rank_processes():
    waits = {"original": "bfbf", "upstream": "bbfbf", "ordered": "bfbf"}
    timed = barrier_rounds.replay(waits, nranks=2, repeats=1, timeout_s=30)
    assert {mode: entry["rounds"] for mode, entry in timed.items()} == {"original": 4, "upstream": 5, "ordered": 4}
    assert all(entry["send_ms"] >= 0 for entry in timed.values())


def test_head_of_line_hand_checked():
    result = head_of_line.simulate(hand_workload(25.0))
    # Signal 0 waits for A (25 ms): B's task is held 23 ms longer than upstream (released at 2 ms); A's tasks lose
    # nothing, since upstream cannot send them before A registers either.
    assert result["samples"]["extra_ms"] == [0.0, 23.0, 0.0]
    assert result["samples"]["blocking_delay_ms"] == [25.0, 25.0, 25.0]
    assert result["pairwise_violations"] == 0 and result["goal_met"] is True


def test_head_of_line_generated_extra_wait_within_blocking_delay():
    result = head_of_line.simulate(make_workload(WorkloadSpec(4, 30, seed=2)))
    assert min(result["samples"]["extra_ms"]) >= 0
    assert result["pairwise_violations"] == 0


def test_parsers_agree_on_real_paddle_buffers():
    for num_tasks in (0, 1, 7, 512):
        buffer = parse.signal_buffer(num_tasks, layer=3, seed=num_tasks)
        assert parse.parse_ours(buffer) == parse.parse_upstream_style(buffer)
        assert len(parse.parse_ours(buffer)[1]) == num_tasks


def test_run_tiny_prints_summary_last_and_writes_results(tmp_path, capsys):
    assert run.main(["--preset", "tiny", "--out-dir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(lines[-1])
    assert SUMMARY_KEYS <= set(summary)
    assert all(isinstance(summary[key], (int, float)) for key in SUMMARY_KEYS)
    assert summary["ordered_round_ratio"] == 1.0 and summary["rounds_goal_met"] is True
    assert all(type(rounds) is int for rounds in summary["rounds"].values())
    results = json.loads((tmp_path / "results.json").read_text())
    assert {"parse", "barrier_rounds", "head_of_line", "summary", "machine"} <= set(results)
    assert results["summary"] == summary
    assert (tmp_path / "results.png").exists() or any("plot skipped" in line for line in lines)
