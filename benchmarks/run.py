"""Run every benchmark side by side: ``python -m benchmarks.run [--quick]`` from the repository root.

Prints one table per benchmark, writes ``results.json`` and ``results.png`` (when matplotlib is installed) into
``build/benchmarks/`` (``--out-dir benchmarks`` refreshes the committed ones docs/benchmarks.md shows), and prints a
one-line JSON summary as the last line of stdout. ``--quick`` runs in seconds (the CI smoke); the full run takes a
minute or two. Ratios are measured within one run, so they are comparable; absolute times depend on the machine and
its load (recorded in ``results.json``).

1. ``parse``: our consume path (``buffer.numpy()`` + ``parse_kv_signal``) versus upstream-style per-element paddle
   indexing, 1 to 512 tasks per signal; and our per-signal cost by layer index.
2. ``barrier_rounds``: begin/finish barrier rounds of the original per-step batching, ``upstream`` and ``ordered``
   release on generated workloads, replayed by 2, 4 and 8 rank processes on manager-served barriers.
3. ``head_of_line``: how much later ``ordered`` releases a task than ``upstream``, in virtual time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

# Rank processes re-import this script as their main module: keep its imports light (no numpy, no paddle here).
from benchmarks.barrier_rounds import BarrierConfig
from benchmarks.head_of_line import HolConfig
from benchmarks.workload import WorkloadSpec

HERE = Path(__file__).resolve().parent
#: Where a run writes by default: not over the committed results in benchmarks/ (``build/`` is not tracked).
DEFAULT_OUT_DIR = HERE.parent / "build" / "benchmarks"
PARSE_GOAL_SPEEDUP_64 = 50.0
ORDERED_ROUNDS_GOAL = 1.0


def presets():
    """Sizes of each benchmark per preset: ``full``, ``quick`` (seconds) and ``tiny`` (the pytest smoke)."""
    from benchmarks.parse import ParseConfig

    return {
        "full": {
            "parse": ParseConfig(),
            "barrier_rounds": BarrierConfig(repeats=5),
            "head_of_line": HolConfig(),
        },
        "quick": {
            "parse": ParseConfig(task_counts=(1, 8, 64, 512), layers=(0, 60), repeats=5, block_seconds=0.005),
            "barrier_rounds": BarrierConfig(workloads=(WorkloadSpec(8, 10),), repeats=2),
            "head_of_line": HolConfig(workload=WorkloadSpec(16, 150, seed=1), delay_medians_ms=(10.0,)),
        },
        "tiny": {
            "parse": ParseConfig(task_counts=(1, 64), layers=(0, 60), repeats=1, block_seconds=0.001),
            "barrier_rounds": BarrierConfig(workloads=(WorkloadSpec(2, 3),), nranks=(2,), repeats=1, timeout_s=30),
            "head_of_line": HolConfig(workload=WorkloadSpec(4, 20, seed=1), delay_medians_ms=(10.0,)),
        },
    }


def run_all(preset: str):
    """Run the three benchmarks of ``preset``; return the results and the head-of-line samples (for the plot)."""
    from benchmarks import barrier_rounds, head_of_line, parse

    config = presets()[preset]
    started = time.perf_counter()
    results = {"machine": machine()}
    results["parse"] = parse.run(config["parse"])
    results["barrier_rounds"] = barrier_rounds.run(config["barrier_rounds"])
    results["head_of_line"] = head_of_line.run(config["head_of_line"])
    hol_samples = results["head_of_line"]["runs"][0]["samples"]
    for run_result in results["head_of_line"]["runs"]:
        del run_result["samples"]  # thousands of values: plotted, not stored
    results["machine"]["loadavg_end"] = _loadavg()
    results["summary"] = summarize(results, preset, time.perf_counter() - started)
    return results, hol_samples


def summarize(results, preset: str, runtime_s: float):
    """The headline numbers and goals; printed as the last stdout line."""
    from benchmarks.parse import speedup_at

    parse_speedup = speedup_at(results["parse"], 64)
    headline_rounds = results["barrier_rounds"]["workloads"][results["barrier_rounds"]["timed_workload"]]["modes"]
    hol = results["head_of_line"]["runs"][0]
    return {
        "preset": preset,
        "parse_speedup_64": round(parse_speedup, 1),
        "parse_speedup_512": round(speedup_at(results["parse"], 512), 1),
        "parse_goal_met": parse_speedup >= PARSE_GOAL_SPEEDUP_64,
        "parse_layer_cost_ratio": round(results["parse"]["by_layer"]["last_vs_first"], 3),
        "parse_layer_cost_max_vs_min": round(results["parse"]["by_layer"]["max_vs_min"], 3),
        "ordered_round_ratio": round(headline_rounds["ordered"]["ratio"], 3),
        "upstream_round_ratio": round(headline_rounds["upstream"]["ratio"], 3),
        "rounds": {mode: counts["rounds"] for mode, counts in headline_rounds.items()},
        "rounds_goal_met": all(
            workload["modes"]["ordered"]["ratio"] <= ORDERED_ROUNDS_GOAL
            for workload in results["barrier_rounds"]["workloads"]
        ),
        "send_time_ratio": {
            nranks: {mode: round(timed[mode]["time_ratio"], 2) for mode in ("upstream", "ordered")}
            for nranks, timed in results["barrier_rounds"]["timings"].items()
        },
        "hol_p50_extra_ms": round(hol["extra_wait_ms"]["p50"], 1),
        "hol_p99_extra_ms": round(hol["extra_wait_ms"]["p99"], 1),
        "hol_p99_blocking_delay_ms": round(hol["blocking_delay_ms"]["p99"], 1),
        "hol_p99_registration_delay_ms": round(hol["registration_delay_ms"]["p99"], 1),
        "hol_goal_met": hol["goal_met"],
        "runtime_s": round(runtime_s, 1),
    }


def machine():
    import paddle

    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "paddle": paddle.__version__,
        "platform": platform.platform(),
        "loadavg_start": _loadavg(),
    }


def _loadavg():
    return [round(value, 2) for value in os.getloadavg()]


def tables(results) -> str:
    from benchmarks import barrier_rounds, head_of_line, parse

    return "\n\n".join(
        [
            parse.table(results["parse"]),
            barrier_rounds.table(results["barrier_rounds"]),
            head_of_line.table(results["head_of_line"]),
        ]
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_const", const="quick", dest="preset", help="a seconds-long run")
    parser.add_argument("--preset", choices=("full", "quick", "tiny"), help="full (default), quick or tiny (tests)")
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=DEFAULT_OUT_DIR,
        help="where results.json and results.png go (default build/benchmarks)",
    )
    parser.add_argument("--no-plot", action="store_true", help="do not write results.png")
    parser.set_defaults(preset="full")
    args = parser.parse_args(argv)

    results, hol_samples = run_all(args.preset)
    print(tables(results))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    results_path = args.out_dir / "results.json"
    results_path.write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nwrote {results_path}")
    if not args.no_plot:
        from benchmarks.plot import write_plot

        plot_path = args.out_dir / "results.png"
        skipped = write_plot(results, hol_samples, plot_path)
        print(skipped or f"wrote {plot_path}")
    print(json.dumps(results["summary"]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
