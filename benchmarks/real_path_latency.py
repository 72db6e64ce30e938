"""Latency of the layer-0 release on the real path: release/2.6's own engine and ``cache_messager.py``, ordered vs off.

The engine slice (:mod:`fastdeploy_pd_fix.tools.engine_slice`) runs the release's engine files and its
``cache_messager.py`` rank processes, unmodified, on the CPU. Here it plays :data:`WORKLOAD` with natural timing (no
forced interleaving): waves of a few routed requests, chunked and not, each admitted once the transfers of the waves
before ended (when waves overlap, the release as is deadlocks now and then: its own race). Per rank, the latency of
a task is the time from the kv-signal op returning its layer-0 signal to a batch holding it being put into
``cache_prefilled_engine_ids_queue`` (by whichever thread puts it). Runs of the release as is (``FD_PD_FIX=0``) and
of ``ordered`` alternate in one invocation; the output gives per mode the median and p90 of every task's latency on
every rank and the ratio ordered/off, and a JSON summary last.

    python -m benchmarks.real_path_latency [--source DIR] [--runs 3] [--nranks 2]

``--source``: a FastDeploy package directory (``.../fastdeploy``) or a checkout holding one, of release/2.6 (prepare
threads, ``cache_messager.py``); by default one is laid out from ``../shared/upstream`` beside the repository (the
real release files, test data) in a temporary folder. Each run costs some 5 s (the rank processes import paddle).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

from benchmarks.head_of_line import percentile
from fastdeploy_pd_fix import config
from fastdeploy_pd_fix.tools import engine_slice, slice_scenarios

#: The modes compared, in the order their runs alternate.
MODES = (config.OFF, config.ORDERED)
#: Prompt lengths of the routed requests, one list per wave (the worker computes 512 tokens per step).
WAVES = [[60, 700, 100], [1100, 60], [300, 900, 30], [1600, 200, 60]]
#: The workload: one episode per scenario, each the waves above under fresh request ids; every wave is admitted once
#: the transfers of the one before ended (a wave's requests share one P-part and their first chunks one signal). An
#: episode in which nothing happens for 5 s hangs (the episodes after it in its run are not played); its latencies
#: up to then count.
WORKLOAD = {
    f"latency-{episode}": {
        "waves": [
            [  # every slot free: each wave is admitted once the one before ended
                slice_scenarios.routed_request(f"lat-{episode}-{wave}-{index}", index, prompt)
                for index, prompt in enumerate(row)
            ]
            for wave, row in enumerate(WAVES)
        ],
        "after_transfers": [False] + [True] * (len(WAVES) - 1),
        "deadline_s": 5.0,
    }
    for episode in range(3)
}


def package_dir(source: Optional[Path], work: Path) -> Optional[Path]:
    """The FastDeploy package directory to run: ``source`` (or its ``fastdeploy``), else a release/2.6 tree laid out
    from ``../shared/upstream`` under ``work``; None when neither exists."""
    if source is not None:
        return source / "fastdeploy" if (source / "fastdeploy").is_dir() else source
    from tests.support.upstream_files import UPSTREAM, engine_files, release_tree

    if not (UPSTREAM / "README.md").is_file() or not engine_files():
        return None
    return release_tree(work / "release")


def latencies_ms(result: dict) -> List[float]:
    """Every task's latency (ms) on every rank of every episode of one run."""
    return [
        seconds * 1000.0
        for episode in result["episodes"].values()
        for reports in episode.get("ranks", {}).values()
        for _, waited in reports["queued"]
        for seconds in waited
        if seconds is not None
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, help="FastDeploy package dir or checkout (release/2.6)")
    parser.add_argument("--runs", type=int, default=3, help="runs per mode, alternating (default 3)")
    parser.add_argument("--nranks", type=int, default=slice_scenarios.NRANKS, help="messager ranks (default 2)")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.nranks < 1:
        parser.error("--runs and --nranks must be at least 1")
    workload = {name: {**scenario, "nranks": args.nranks} for name, scenario in WORKLOAD.items()}
    with tempfile.TemporaryDirectory(prefix="fd-pd-fix-latency-") as temporary:
        work = Path(temporary)
        package = package_dir(args.source, work)
        if package is None:
            print(f"no release files: give --source DIR, or put them in {Path('../shared/upstream').resolve()}")
            return 2
        files, why = engine_slice.find_engine_files(package)
        if files is None or files.messager is None:
            print(f"cannot run the engine slice on {package}: {why or 'no cache_messager.py beside it'}")
            return 2
        engine_slice.slice_tree(files, work)
        samples: Dict[str, List[float]] = {mode: [] for mode in MODES}
        outcomes: Dict[str, Dict[str, int]] = {mode: {} for mode in MODES}
        for run in range(args.runs):
            for mode in MODES:
                result = engine_slice.run_with_messagers(
                    files, work, mode, list(workload), name=f"latency-{run}", scenarios=workload
                )
                problems = [
                    f"{name}: {problem}"
                    for name, episode in result["episodes"].items()
                    for problem in engine_slice.judge_messagers(episode, name, workload)
                ]
                print(f"run {run + 1}/{args.runs} {mode}: {result['run_s']} s, problems: {problems or 'none'}")
                samples[mode].extend(latencies_ms(result))
                for episode in result["episodes"].values():
                    outcomes[mode][episode["outcome"]] = outcomes[mode].get(episode["outcome"], 0) + 1
    summary = {"runs": args.runs, "nranks": args.nranks, "source": str(package)}
    print("layer-0 signal returned by the op -> its batch put into cache_prefilled_engine_ids_queue (ms, every rank):")
    for mode in MODES:
        values = samples[mode]
        if not values:
            print(f"  {mode:8s} no samples")
            return 1
        median, p90 = statistics.median(values), percentile(values, 90)
        summary[mode] = {
            "tasks": len(values),
            "median_ms": round(median, 3),
            "p90_ms": round(p90, 3),
            "episodes": outcomes[mode],
        }
        played = ", ".join(f"{count} {outcome}" for outcome, count in sorted(outcomes[mode].items()))
        print(f"  {mode:8s} tasks {len(values):4d}  median {median:8.3f}  p90 {p90:8.3f}  episodes: {played}")
    for statistic in ("median_ms", "p90_ms"):
        ratio = summary[config.ORDERED][statistic] / max(summary[config.OFF][statistic], 1e-9)
        summary[f"ratio_{statistic[:-3]}"] = round(ratio, 3)
    print(f"  ratio ordered/off: median {summary['ratio_median']:.2f}, p90 {summary['ratio_p90']:.2f}")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
