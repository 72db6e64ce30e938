"""The runs of ``fastdeploy-pd-fix preflight`` (:mod:`fastdeploy_pd_fix.tools.preflight`): every scenario in each
mode on the rank processes of a preflight tree (:mod:`fastdeploy_pd_fix.tools.preflight_tree`), through the stand-in's
harness, and the record of each run read off its result and its ranks' logs, whatever the release names them.
"""

from __future__ import annotations

import re
import shutil
import threading
from pathlib import Path
from typing import Dict, List, Optional

from fastdeploy_pd_fix.standin.harness import run_many
from fastdeploy_pd_fix.standin.run_result import NOT_RUN
from fastdeploy_pd_fix.tools import preflight_tree

#: A plugin decision line in a rank's logs (bootstrap stderr or the messager's own log).
DECISION = re.compile(r"fastdeploy_pd_fix[^\n]*?(?:: (?:patched|stood aside|already patched) |disabled by)[^\n]*")
RANK_OF_LOG = re.compile(r"(?:_|rank|device)(\d+)\.log$")
ERROR_LINE = re.compile(r"Error|exception|Traceback|GROUND TRUTH VIOLATION")


def _rank_logs(run_dir: Optional[str]) -> Dict[int, Dict[str, str]]:
    """Each rank's logs, whatever the release names them: rank -> file name -> text."""
    logs: Dict[int, Dict[str, str]] = {}
    for path in sorted(Path(run_dir, "log").glob("*.log")) if run_dir else []:
        match = RANK_OF_LOG.search(path.name)
        if match:
            logs.setdefault(int(match.group(1)), {})[path.name] = path.read_text(encoding="utf-8", errors="replace")
    return logs


def _error_lines(texts: Dict[str, str], limit: int = 10) -> List[str]:
    found: List[str] = []
    for text in texts.values():
        for line in text.splitlines():
            if ERROR_LINE.search(line) and line.strip() not in found:
                found.append(line.strip())
    return found[:limit]


def _run_record(result, logs: Dict[int, Dict[str, str]]) -> dict:
    decisions = {rank: DECISION.findall("\n".join(texts.values())) for rank, texts in logs.items()}
    return {
        "outcome": result.outcome,
        "identical": result.same_batches_on_all_ranks(),
        "batches": {str(rank): batches for rank, batches in result.batches.items()},
        "finished": {str(rank): finished for rank, finished in result.finished.items()},
        "violations": result.ground_truth_violations(),
        "elapsed_s": round(result.elapsed_s, 2),
        "startup_s": round(result.startup_s, 2),
        "error": result.error,
        "decisions": {str(rank): lines for rank, lines in decisions.items()},
        "patched": bool(logs)
        and all(any(": patched " in line for line in lines) for lines in decisions.values())
        and not any("stood aside" in line for lines in decisions.values() for line in lines),
        "errors": {str(rank): _error_lines(texts) for rank, texts in logs.items()},
        "log_tail": {
            str(rank): [f"{name}: {line}" for name, text in texts.items() for line in text.splitlines()[-6:]]
            for rank, texts in logs.items()
        },
    }


def run_good(record: dict) -> bool:
    """A run with the plugin passes: finished, identical batches on every rank, no ground-truth violation."""
    return record["outcome"] == "finished" and record["identical"] and record["violations"] == 0


def play(
    tree,
    scenarios,
    deadline_s: float,
    parallel: int,
    runs_dir: Path,
    progress,
    modes,
    keep_runs: bool = False,
    patch_non_racing: bool = False,
) -> Dict[str, dict]:
    """Run every scenario in each of ``modes`` (:data:`fastdeploy_pd_fix.config.RUN_MODES`; preflight's: the
    release's own and ordered) on the tree (``patch_non_racing``: on a release that cannot race too);
    ``progress(line)`` once per scenario as it completes.
    Each run has its folder ``runs_dir/MODE/SCENARIO-*``; ``keep_runs``: leave it there (its ``log/`` holds the
    messagers' logs, for ``fastdeploy-pd-fix diagnose``) and name it in the record's ``run_dir``; otherwise it is
    removed once read. The runs go through :func:`~fastdeploy_pd_fix.standin.harness.run_many`, so SIGINT, SIGTERM
    and SIGHUP kill every run's processes
    (the runs they stopped or cancelled are reported "not run")."""

    def rank_arguments(rank, nranks, port, num_layers):
        return preflight_tree.command_line(tree.options, rank, nranks, port, num_layers)

    def record_of(result):
        record = _run_record(result, _rank_logs(result.workdir))
        if keep_runs:
            record["run_dir"] = str(result.workdir)
        elif result.workdir:
            shutil.rmtree(result.workdir, ignore_errors=True)
        return record

    runs = [(name, mode) for name in scenarios for mode in modes]
    records: Dict[str, dict] = {name: {} for name in scenarios}
    lock = threading.Lock()
    done = []

    def on_result(index, result):  # in the run's thread, as it ends
        name, mode = runs[index]
        record = record_of(result)
        with lock:
            records[name][mode] = record
            if len(records[name]) == len(modes):
                done.append(name)
                cells = " | ".join(f"{mode} {cell(records[name][mode])}" for mode in modes)
                progress(f"[{len(done):>2}/{len(scenarios)}] {name}: {cells}")

    jobs = [
        dict(
            scenario=name,
            mode=mode,
            deadline_s=deadline_s,
            workdir=runs_dir / mode,
            standin_root=tree.root,
            rank_arguments=rank_arguments,
            patch_non_racing=patch_non_racing,
        )
        for name, mode in runs
    ]
    results = run_many(jobs, parallel=parallel, on_result=on_result)
    for (name, mode), result in zip(runs, results):
        if mode not in records[name]:  # its progress callback failed: the same error, raised here
            records[name][mode] = record_of(result)
    return records


def cell(record: dict) -> str:
    if record["outcome"] == NOT_RUN:
        return NOT_RUN
    text = f"{record['outcome']}, {'identical' if record['identical'] else 'DIFFERENT'} batches"
    if record["violations"]:
        text += f", {record['violations']} ground-truth violations"
    return text
