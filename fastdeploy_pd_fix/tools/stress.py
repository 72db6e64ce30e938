"""Randomized stress on real rank processes: ``python benchmarks/stress.py [options]``.

For each seed, a random workload (2-4 requests, 1-3 chunks each, several requests per kv signal, occasional reuse
of a slot after its previous request's final chunk; every request registers, in reads of 1-2 requests) and a random
merge of the signal and registration streams per rank are run on the FastDeploy stand-in
(:mod:`fastdeploy_pd_fix.standin.harness`): real rank processes, manager-served barriers, each rank's interleaving
forced by the harness's handshakes. Everything a run does follows from its seed (``--seed S --runs 1`` reruns seed
S) or from its scenario JSON (``--replay FILE``).

    python benchmarks/stress.py [--runs N] [--seed S] [--mode off|ordered|upstream|observe]
                                [--release 7872|8034|pre7872] [--with-7724] [--nranks 2|3] [--parallel P]
                                [--deadline S] [--json-out FILE]
    python benchmarks/stress.py --replay FILE [--runs N] [--mode ...]

The engine's slot lifecycle is drawn in too (``--no-lifecycle`` leaves it out), from a random stream of its own so
that a seed's base workload stays the same: a request with several chunks is aborted after some of them (its slot
then goes to the next request at once, unannounced; it stays registered and need not finish), and a request's D-part
is repeated in the read that registers it. Both are cases the two streams decide (no request aborted before its
first signal, no prefix-cached start at an aborted end, no request that never registers): ``ordered`` must run them
clean. Each scenario carries its ground truth (``owners``), and the stand-in's send thread checks every batch.

Per run it reports the outcome (finished / hang / error) and, per rank, against the signal stream:

* lost: a signal task neither queued nor expected to be dropped (no task of these workloads should be dropped);
* duplicated: a task queued more often than the signals carry it;
* divergent: the queued batch sequences differ between ranks;
* unexpected (``ordered`` only): a rank's sequence is not exactly one batch per kv signal, in signal order, which
  is what ``ordered`` must produce when every request registers and every request's chunks strictly increase up to
  its ``need_prefill_tokens``;
* violations: ground-truth violations the ranks' send threads reported (a task read that is not the batch's
  request's, or blocks sent before their chunk was computed).

"Queued" is the plugin's batch journal (``queued batch #N`` lines of each rank's cache messager log), so a hang
still shows what each rank put into its queue; with ``--mode off`` (no plugin, no journal) it is the batches the
send loop took. The last stdout line is a JSON summary ``{"mode", "runs", "hangs", "errors", "lost", "duplicated",
"divergent", "unexpected", "violations", "seconds"}``; the exit status is 0 iff all of these counts are 0.

Slot reuse follows the engine model of the explorer (:mod:`fastdeploy_pd_fix.verify.workloads`): a slot goes to its
next request only after every rank has sent the previous one (the engine recycles it after ``get_finished_req``). So,
on every rank, the read registering the next request comes after the previous request's final chunk signal and after
every registration that signal's release needs, and the next request's first signal comes after those
registrations; the stand-in then delivers that read only once the rank has finished the previous request (a
handshake, see ``fastdeploy/pd_fix_standin/script.py``), since the messager keys registered tasks by slot.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

from fastdeploy_pd_fix.adapters.messager_log import QUEUED_LINE
from fastdeploy_pd_fix.arguments import positive_seconds
from fastdeploy_pd_fix.config import OFF, ORDERED, RUN_MODES, environment_for
from fastdeploy_pd_fix.standin.fastdeploy.pd_fix_standin.contract import is_notice_entry
from fastdeploy_pd_fix.standin.harness import run_many
from fastdeploy_pd_fix.standin.scenarios import RELEASES, validate_scenario
from fastdeploy_pd_fix.tools.stress_workload import generate_scenario

RANK_LOG_END = "\n----- stdout/stderr of rank"  # the harness appends the launch log after the messager's log
SUMMARY_COUNTS = ("hangs", "errors", "lost", "duplicated", "divergent", "unexpected", "violations")


# ---- what a run should produce, and what it did ----


def expected_batches(scenario: dict) -> List[List[List[int]]]:
    """One batch per kv signal, in signal order: ``[slot, chunk_token_offset + current_chunk_len]`` per task of a
    request that registers (an orphan's tasks need no transfer; a signal of orphans only releases no batch)."""
    orphans = set(scenario.get("orphans", ()))
    owners = scenario.get("owners") or [[None] * len(signal) for signal in scenario["signals"]]
    batches = [
        [[slot, offset + length] for (slot, offset, length), owner in zip(signal, tasks) if owner not in orphans]
        for signal, tasks in zip(scenario["signals"], owners)
    ]
    return [batch for batch in batches if batch]


def first_registrations(scenario: dict) -> List[dict]:
    """Each request's registration entry (repeated D-parts and engine notices left out)."""
    return [
        request
        for read in scenario["registrations"]
        for request in read
        if request.get("parts") != "decode" and not is_notice_entry(request)
    ]


def reuses_slot(scenario: dict) -> bool:
    slots = [request["slot"] for request in first_registrations(scenario)]
    return len(slots) != len(set(slots))


def workload_class(scenario: dict) -> str:
    requests = len(first_registrations(scenario))
    chunked = sum(len(signal) for signal in scenario["signals"]) > requests  # more chunks than requests
    repeats = any(request.get("parts") == "decode" for read in scenario["registrations"] for request in read)
    return (
        f"{requests}req"
        + ("-chunked" if chunked else "")
        + ("-reuse" if reuses_slot(scenario) else "")
        + ("-abort" if scenario.get("aborted") else "")
        + ("-orphan" if scenario.get("orphans") else "")
        + ("-repeat" if repeats else "")
    )


def journal_batches(log: str) -> Optional[List[List[List[int]]]]:
    """The batches a rank queued, from the plugin's journal lines; None when the log has none."""
    messager_log = log.split(RANK_LOG_END, 1)[0]
    batches = [
        [[int(slot), int(number)] for slot, number in ast.literal_eval(match["batch"])]
        for match in QUEUED_LINE.finditer(messager_log)
    ]
    return batches or None


@dataclass
class RunReport:
    """What one run did against what its scenario expects."""

    seed: Optional[int]
    workload: str
    outcome: str
    lost: int
    duplicated: int
    divergent: bool
    unexpected: bool
    error: str
    violations: int
    startup_s: float
    elapsed_s: float
    queued: Dict[int, list]

    @property
    def failed(self) -> bool:
        return self.outcome != "finished" or bool(
            self.lost or self.duplicated or self.divergent or self.unexpected or self.violations
        )

    def line(self) -> str:
        seed = "-" if self.seed is None else str(self.seed)
        return (
            f"{seed:>8}  {self.workload:<32}{self.outcome:<10}{self.lost:>5}{self.duplicated:>5}"
            f"{'yes' if self.divergent else 'no':>5}{'yes' if self.unexpected else 'no':>6}{self.violations:>5}"
            f"{self.startup_s:>9.2f}{self.elapsed_s:>9.2f}"
        )


RUN_HEADER = "{:>8}  {:<32}{:<10}{:>5}{:>5}{:>5}{:>6}{:>5}{:>9}{:>9}".format(
    "seed", "workload", "outcome", "lost", "dup", "div", "unexp", "gt", "start s", "run s"
)


def evaluate(scenario: dict, result, mode: str) -> RunReport:
    """Compare one :class:`~fastdeploy_pd_fix.standin.run_result.ScenarioResult` with its scenario."""
    expected = expected_batches(scenario)
    expected_tasks = Counter(tuple(task) for batch in expected for task in batch)
    outcome, error = result.outcome, result.error
    queued: Dict[int, list] = {}
    lost = duplicated = 0
    for rank, log in sorted(result.logs.items()):
        if mode != OFF and f"(mode={mode}" not in log:
            outcome, error = "error", error or f"rank {rank}: the plugin did not patch the messager in mode {mode}"
        journal = journal_batches(log) if mode != OFF else None
        queued[rank] = journal if journal is not None else result.batches.get(rank, [])
        tasks = Counter(tuple(task) for batch in queued[rank] for task in batch)
        lost += sum((expected_tasks - tasks).values())
        duplicated += sum((tasks - expected_tasks).values())
    sequences = list(queued.values())
    divergent = any(sequence != sequences[0] for sequence in sequences)
    unexpected = mode == ORDERED and any(
        result.batches.get(rank) != expected or sequence != expected for rank, sequence in queued.items()
    )
    return RunReport(
        seed=scenario.get("seed"),
        workload=workload_class(scenario),
        outcome=outcome,
        lost=lost,
        duplicated=duplicated,
        divergent=divergent,
        unexpected=unexpected,
        error=error,
        violations=result.ground_truth_violations(),
        startup_s=result.startup_s,
        elapsed_s=result.elapsed_s,
        queued=queued,
    )


# ---- running ----


def run_kwargs(scenario: dict, args) -> dict:
    """Arguments of :func:`run_scenario` for one scenario."""
    return dict(
        scenario=scenario,
        release=args.release,
        with_7724=args.with_7724,
        env=environment_for(args.mode),
        nranks=args.nranks,
        deadline_s=args.deadline,
    )


def load_replay(path: str, nranks: int) -> dict:
    """A scenario from a file: the scenario itself, or any JSON object holding it under ``"scenario"``."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    scenario = data.get("scenario", data)
    validate_scenario(scenario)
    if len(scenario["schedules"]) > nranks:
        raise ValueError(f"{path}: {len(scenario['schedules'])} schedules for {nranks} ranks (use --nranks)")
    return scenario


def print_failure(report: RunReport, scenario: dict, args) -> None:
    """Everything needed to understand and rerun a failing run."""
    print(f"FAIL seed={report.seed} {report.workload}: {report.outcome} {report.error}".rstrip())
    print(f"  expected (one batch per signal): {expected_batches(scenario)}")
    schedules = scenario["schedules"]
    for rank, sequence in report.queued.items():
        schedule = " ".join(schedules[min(rank, len(schedules) - 1)])
        print(f"  rank {rank} queued {sequence}; schedule {schedule}")
    rerun = f"--seed {report.seed} --runs 1" if report.seed is not None else "--replay FILE"
    variant = f"--release {args.release}" + (" --with-7724" if args.with_7724 else "")
    print(f"  rerun: python benchmarks/stress.py {rerun} --mode {args.mode} {variant} --nranks {args.nranks}")
    print(f"  scenario JSON (save it for --replay FILE): {json.dumps(scenario, separators=(',', ':'))}")


def summary_table(reports: List[RunReport]) -> str:
    rows: Dict[str, Counter] = {}
    for report in reports:
        for key in (report.workload, "total"):
            row = rows.setdefault(key, Counter())
            row["runs"] += 1
            row[report.outcome] += 1
            row["lost"] += report.lost
            row["duplicated"] += report.duplicated
            row["divergent"] += report.divergent
            row["unexpected"] += report.unexpected
            row["violations"] += report.violations
    columns = ("runs", "finished", "hang", "error", "lost", "duplicated", "divergent", "unexpected", "violations")
    lines = [f"{'workload':<32}" + "".join(f"{column:>11}" for column in columns), "-" * (32 + 11 * len(columns))]
    for key in sorted(set(rows) - {"total"}) + ["total"]:
        if key == "total":
            lines.append("-" * (32 + 11 * len(columns)))
        lines.append(f"{key:<32}" + "".join(f"{rows[key][column]:>11}" for column in columns))
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python benchmarks/stress.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, help="number of runs (default 20; 1 with --replay)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the first run; run i uses seed + i")
    parser.add_argument("--mode", choices=RUN_MODES, default=ORDERED, help="plugin mode of the ranks (off: no plugin)")
    parser.add_argument("--release", choices=RELEASES, default="8034", help="stand-in release variant")
    parser.add_argument("--with-7724", action="store_true", help="the stand-in variant with #7724")
    parser.add_argument("--nranks", type=int, choices=(2, 3), default=2)
    parser.add_argument("--parallel", type=int, default=4, help="runs at a time (run_many)")
    parser.add_argument(
        "--deadline", type=positive_seconds, default=3.0, help="seconds after every rank is ready: hang"
    )
    parser.add_argument("--no-lifecycle", action="store_true", help="no aborts or repeated D-parts in the workloads")
    parser.add_argument("--replay", metavar="FILE", help="run this scenario JSON instead of generated ones")
    parser.add_argument("--json-out", metavar="FILE", help="write every run's report and the failing scenarios")
    parser.add_argument("-q", "--quiet", action="store_true", help="print failures only, not every run")
    args = parser.parse_args(argv)
    if args.runs is None:
        args.runs = 1 if args.replay else 20
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    if args.replay:
        replayed = load_replay(args.replay, args.nranks)
        scenarios = [replayed] * args.runs
    else:
        scenarios = [
            generate_scenario(args.seed + index, args.nranks, lifecycle=not args.no_lifecycle)
            for index in range(args.runs)
        ]
    print(
        f"stress: mode={args.mode} release={args.release} with_7724={args.with_7724} nranks={args.nranks} "
        f"runs={args.runs} "
        + (f"replay={args.replay}" if args.replay else f"seeds {args.seed}..{args.seed + args.runs - 1}")
    )
    print(RUN_HEADER)
    reports: List[RunReport] = []
    failures = []
    chunk = max(1, args.parallel) * 8
    for first in range(0, len(scenarios), chunk):
        part = scenarios[first : first + chunk]
        results = run_many([run_kwargs(scenario, args) for scenario in part], parallel=args.parallel)
        for scenario, result in zip(part, results):
            report = evaluate(scenario, result, args.mode)
            reports.append(report)
            if not args.quiet:
                print(report.line())
            if report.failed:
                failures.append((report, scenario))
                print_failure(report, scenario, args)
        sys.stdout.flush()
        print(f"[{len(reports)}/{len(scenarios)}] {time.monotonic() - started:.0f}s", file=sys.stderr, flush=True)
    seconds = time.monotonic() - started
    print()
    print(summary_table(reports))
    startup = [report.startup_s for report in reports]
    print(
        f"{len(reports)} runs in {seconds:.1f}s; rank start-up mean {sum(startup) / len(startup):.2f}s "
        f"max {max(startup):.2f}s; failing seeds: {[report.seed for report, _ in failures][:50] or 'none'}"
    )
    summary = {
        "mode": args.mode,
        "runs": len(reports),
        "hangs": sum(report.outcome == "hang" for report in reports),
        "errors": sum(report.outcome == "error" for report in reports),
        "lost": sum(report.lost for report in reports),
        "duplicated": sum(report.duplicated for report in reports),
        "divergent": sum(report.divergent for report in reports),
        "unexpected": sum(report.unexpected for report in reports),
        "violations": sum(report.violations for report in reports),
        "seconds": round(seconds, 1),
    }
    if args.json_out:
        document = {
            "arguments": vars(args),
            "summary": summary,
            "runs": [
                {key: value for key, value in vars(report).items() if key != "queued"} | {"failed": report.failed}
                for report in reports
            ],
            "failures": [
                {"seed": report.seed, "outcome": report.outcome, "queued": report.queued, "scenario": scenario}
                for report, scenario in failures
            ],
        }
        Path(args.json_out).write_text(json.dumps(document, indent=1), encoding="utf-8")
    print(json.dumps(summary))
    return 1 if any(summary[key] for key in SUMMARY_COUNTS) else 0


if __name__ == "__main__":
    sys.exit(main())
