"""What a run of the stand-in harness (:mod:`fastdeploy_pd_fix.standin.harness`) showed: its
:class:`ScenarioResult`, read off the files its processes left once they are gone (each rank's progress file, its
logs, the engine's record of the ranks' reports), and the table its command prints.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from fastdeploy_pd_fix import config
from fastdeploy_pd_fix.standin.scenarios import SCENARIOS

NOT_RUN = "not run"  # the outcome of a run an interrupt stopped, or cancelled before it started


@dataclass
class ScenarioResult:
    """What one run did. ``batches[rank]`` is the sequence of batches the rank's send loop took, each a list of
    ``[slot, prefilled_token_num]``; ``finished[rank]`` the request ids it finished, in order; ``violations[rank]``
    the ground-truth violations its send loop reported (a task read that is not the batch's request's, or blocks
    sent before their chunk was computed; see ``fastdeploy/pd_fix_standin/ground_truth.py``), in order."""

    outcome: str  # "finished" | "hang" | "error" | NOT_RUN
    batches: Dict[int, List[List[List[int]]]]
    finished: Dict[int, List[str]]
    logs: Dict[int, str]
    elapsed_s: float  # from "every rank ready" to the end of the run (0 when they never got ready)
    returncodes: Dict[int, Optional[int]]  # None: did not exit by itself (killed by the harness)
    scenario: str = ""
    variant: Dict[str, object] = field(default_factory=dict)
    error: str = ""  # why the outcome is "error"
    startup_s: float = 0.0  # from the first launch to "every rank ready"
    engine_log: str = ""  # the engine process's own output and the ranks' reports it recorded
    workdir: Optional[str] = None  # kept only when the caller gave a workdir
    violations: Dict[int, List[str]] = field(default_factory=dict)

    def same_batches_on_all_ranks(self) -> bool:
        sequences = list(self.batches.values())
        return all(sequence == sequences[0] for sequence in sequences)

    def ground_truth_violations(self) -> int:
        """How many ground-truth violations the ranks reported, all ranks together."""
        return sum(len(found) for found in self.violations.values())

    def summary(self) -> str:
        return (
            f"{self.scenario} {self.variant}: {self.outcome} in {self.elapsed_s:.2f}s "
            f"batches={self.batches} finished={self.finished} returncodes={self.returncodes}"
            + (f" error={self.error}" if self.error else "")
            + (f" violations={self.violations}" if self.ground_truth_violations() else "")
        )


def not_started(scenario: str) -> ScenarioResult:
    """The result of a run of ``scenario`` (its name) that an interrupt cancelled before it started."""
    return ScenarioResult(
        outcome=NOT_RUN,
        batches={},
        finished={},
        logs={},
        elapsed_s=0.0,
        returncodes={},
        scenario=scenario,
        error="not started: interrupted",
    )


def read_progress(out_dir: Path, rank: int) -> List[dict]:
    """Events of a rank's progress file; a half-written last line is ignored."""
    events = []
    try:
        lines = (out_dir / f"rank{rank}.jsonl").read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return events
    for line in lines:
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return ""


def read_result(
    log_dir: Path, out_dir: Path, engine_record: Path, nranks: int, outcome: str, error: str, **facts
) -> ScenarioResult:
    """The result of a run whose processes are gone: ``outcome`` and ``error`` as they ended (a "finished" run in
    which a rank did not report every request done is an error), what each rank's progress file and logs and the
    engine's log and ``engine_record`` hold, and ``facts``, the other fields of :class:`ScenarioResult`, as given."""
    progress = {rank: read_progress(out_dir, rank) for rank in range(nranks)}
    batches = {
        rank: [event["batch"] for event in events if event["event"] == "batch"] for rank, events in progress.items()
    }
    finished = {
        rank: [event["request_id"] for event in events if event["event"] == "finished"]
        for rank, events in progress.items()
    }
    violations = {
        rank: [event["violation"] for event in events if event["event"] == "violation"]
        for rank, events in progress.items()
    }
    if outcome == "finished":
        not_done = [rank for rank, events in progress.items() if not any(e["event"] == "done" for e in events)]
        if not_done:
            outcome, error = "error", f"ranks {not_done} exited 0 without finishing every request"
    logs = {
        rank: read_text(log_dir / f"cache_messager_rank{rank}.log")
        + f"\n----- stdout/stderr of rank {rank} -----\n"
        + read_text(log_dir / f"launch_cache_messager_{rank}.log")
        for rank in range(nranks)
    }
    engine_log = read_text(log_dir / "engine_server.log") + read_text(engine_record)
    return ScenarioResult(
        outcome=outcome,
        batches=batches,
        finished=finished,
        logs=logs,
        error=error,
        engine_log=engine_log,
        violations=violations,
        **facts,
    )


def expected_outcome(name: str, release: str, mode: Optional[str]) -> Optional[str]:
    """The documented outcome of a named scenario: per release without the plugin (s0-s3), per mode on the default
    #7872 variant (lifecycle scenarios); None when none is documented."""
    scenario = SCENARIOS.get(name, {})
    if "expected" in scenario:
        return scenario["expected"].get(mode or config.OFF, [None])[0] if release == "7872" else None
    return scenario.get("expected_without_fix", {}).get(release)


def print_table(results: List[ScenarioResult], mode: Optional[str] = None) -> None:
    """The outcome table of ``python -m fastdeploy_pd_fix.standin.harness``: a line per run."""
    print(f"{'scenario':<9}{'release':<9}{'7724':<6}{'op':<4}{'outcome':<10}{'expected':<10}{'gt':<4}batches per rank")
    for result in results:
        expected = expected_outcome(result.scenario, result.variant["release"], mode)
        print(
            f"{result.scenario:<9}{result.variant['release']:<9}{int(result.variant['with_7724']):<6}"
            f"{result.variant['op_args']:<4}{result.outcome:<10}{str(expected):<10}"
            f"{result.ground_truth_violations():<4}{result.batches}"
        )
