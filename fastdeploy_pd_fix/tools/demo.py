"""``fastdeploy-pd-fix demo``: the race scenarios on the FastDeploy stand-in, without and with the plugin.

Each run starts real rank processes that execute the stand-in's ``fastdeploy/cache_manager/cache_messager.py`` as a
script (as FastDeploy does), with barriers served by a ``multiprocessing`` manager, and forces one interleaving of
the two streams per rank. The plugin is the installed one: its ``.pth`` hook patches the script's class. Each run
sets every ``FD_PD_FIX*`` variable of its ranks itself: the caller's are ignored, and named in the report.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from typing import Dict, List

from fastdeploy_pd_fix import config
from fastdeploy_pd_fix.standin.harness import cleanup_on_signals, ignored_variables_line, plugin_variables, run_many

#: The demo's columns, a mode of :data:`config.RUN_MODES` each -> what the column shows.
COLUMNS = {
    config.OFF: "FastDeploy as released (stand-in of a #7872 release, before #8034)",
    config.UPSTREAM: "plugin reproducing upstream PR #8034",
    config.ORDERED: "plugin, rank-invariant release (default)",
}
SCENARIO_NAMES = ("s0", "s1", "s2", "s3")
PATCHED_MARK = "fastdeploy_pd_fix"


def _patched(result) -> bool:
    return all("patched" in log and PATCHED_MARK in log for log in result.logs.values())


def run_all(deadline_s: float = 3.0) -> Dict[str, Dict[str, object]]:
    """Run every scenario in every mode; return mode -> scenario -> ScenarioResult."""
    from fastdeploy_pd_fix.standin.scenarios import SCENARIOS

    jobs = [(mode, name) for mode in COLUMNS for name in SCENARIO_NAMES]
    done = []  # progress on stderr, one line per run as it ends (stdout keeps the table, or the JSON)

    def progress(index: int, result) -> None:
        done.append(index)
        mode, name = jobs[index]
        print(f"[{len(done)}/{len(jobs)}] {name} {mode}: {result.outcome}", file=sys.stderr, flush=True)

    print(f"demo: {len(jobs)} runs of real rank processes, up to 4 at a time...", file=sys.stderr, flush=True)
    results = run_many(
        [dict(scenario=SCENARIOS[name], mode=mode, deadline_s=deadline_s) for mode, name in jobs], on_result=progress
    )
    table: Dict[str, Dict[str, object]] = {mode: {} for mode in COLUMNS}
    for (mode, name), result in zip(jobs, results):
        table[mode][name] = result
    return table


def _format_batches(batches: List) -> str:
    return " ".join("[" + ",".join(f"{slot}:{n}" for slot, n in batch) + "]" for batch in batches) or "-"


def _problems(table) -> List[str]:
    problems = []
    for mode, results in table.items():
        for name, result in results.items():
            if result.outcome == "error":
                problems.append(f"{mode}/{name}: a rank failed: {result.error}\n{result.summary()}")
            elif mode != config.OFF and not _patched(result):
                problems.append(f"{mode}/{name}: the plugin did not patch the stand-in (is it installed here?)")
    return problems


def run_demo(json_output: bool = False, deadline_s: float = 3.0) -> int:
    """The demo command; SIGINT, SIGTERM or SIGHUP stop it (exit 128 + the signal's number), see
    :func:`~fastdeploy_pd_fix.standin.harness.cleanup_on_signals`."""
    with cleanup_on_signals("fastdeploy-pd-fix demo"):
        return _demo(json_output, deadline_s)


def _demo(json_output: bool, deadline_s: float) -> int:
    if importlib.util.find_spec("paddle") is None:
        print(
            "the demo's stand-in runs real paddle tensors: on a machine without Paddle, pip install "
            "'fastdeploy-pd-fix[demo,cpu]' (the cpu extra brings the CPU build; never into a FastDeploy environment), "
            "or run it where paddlepaddle-gpu is installed",
            file=sys.stderr,
        )
        return 2
    ignored = plugin_variables()
    table = run_all(deadline_s)
    problems = _problems(table)
    if json_output:
        # The modes are the object's keys; "environment_ignored" is added beside them only when there is one.
        print(
            json.dumps(
                {
                    **({"environment_ignored": ignored} if ignored else {}),
                    **{
                        mode: {
                            name: {
                                "outcome": result.outcome,
                                "batches": {str(rank): batches for rank, batches in result.batches.items()},
                                "elapsed_s": round(result.elapsed_s, 2),
                            }
                            for name, result in results.items()
                        }
                        for mode, results in table.items()
                    },
                }
            )
        )
    else:
        if ignored:
            print(ignored_variables_line(ignored))
        width = 26
        print("scenario | " + " | ".join(mode.ljust(width) for mode in COLUMNS))
        print("-" * 9 + "+" + "+".join("-" * (width + 2) for _ in COLUMNS))
        for name in SCENARIO_NAMES:
            cells = [
                f"{table[mode][name].outcome} ({table[mode][name].elapsed_s:.1f}s)".ljust(width) for mode in COLUMNS
            ]
            print(f"{name.ljust(8)} | " + " | ".join(cells))
        print("\nbatch sequences per rank (slot:prefilled_token_num):")
        for mode in COLUMNS:
            print(f"  {mode}: {COLUMNS[mode]}")
            for name in SCENARIO_NAMES:
                result = table[mode][name]
                ranks = "   ".join(f"rank{rank} {_format_batches(b)}" for rank, b in sorted(result.batches.items()))
                print(f"    {name} {result.outcome:8} {ranks}")
    for problem in problems:
        print(f"ERROR: {problem}", file=sys.stderr)
    ordered_ok = all(result.outcome == "finished" for result in table[config.ORDERED].values())
    return 0 if ordered_ok and not problems else 1
