"""The driver over every workload family and rank count, and what it reports: the table and the counterexamples."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from fastdeploy_pd_fix.core.release import ORDERED
from fastdeploy_pd_fix.verify.barriers import describe_barriers
from fastdeploy_pd_fix.verify.checks import KIND_ORDER, Counterexample, check_config, cross_rank_divergences
from fastdeploy_pd_fix.verify.models import VERIFY_MODES
from fastdeploy_pd_fix.verify.search import explore_rank, replay
from fastdeploy_pd_fix.verify.workloads import FIFO, SLOT_MODELS, Workload, build_workloads, describe_merge, switches


@dataclass
class FamilyRow:
    family: str
    nranks: int
    configs: int = 0
    interleavings: int = 0
    states: int = 0
    outcomes: int = 0
    violations: int = 0
    limitations: int = 0
    seconds: float = 0.0


@dataclass
class Report:
    mode: str
    slot_model: str
    rows: List[FamilyRow]
    counterexamples: List[Counterexample]  # smallest per (kind, shape), in discovery order
    configs: int
    interleavings: int
    violations: int
    limitations: int
    seconds: float
    strict: bool

    def summary(self) -> dict:
        return {
            "mode": self.mode,
            "configs": self.configs,
            "interleavings": self.interleavings,
            "violations": self.violations,
        }


class Progress:
    """A one-line progress indicator on stderr (redrawn in place on a terminal, sparse lines otherwise)."""

    def __init__(self, mode: str, total: int, stream=None):
        self.mode = mode
        self.total = total
        self.stream = stream or sys.stderr
        self.started = time.monotonic()
        self.last = 0.0
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def update(self, done: int, family: str) -> None:
        now = time.monotonic()
        interval = 0.2 if self.tty else 5.0
        if done < self.total and now - self.last < interval:
            return
        self.last = now
        line = f"verify {self.mode}: {done}/{self.total} configs ({family}), {now - self.started:.1f} s"
        self.stream.write(("\r" + line) if self.tty else (line + "\n"))
        if self.tty and done == self.total:
            self.stream.write("\n")
        self.stream.flush()


def explore(
    mode: str = ORDERED,
    quick: bool = False,
    rank_counts: Sequence[int] = (2, 3),
    strict: bool = False,
    families: Optional[List[Tuple[str, List[Workload]]]] = None,
    progress: bool = True,
    slot_model: str = FIFO,
) -> Report:
    """Explore every configured workload under ``mode``; return the table rows and the minimal counterexamples."""
    if mode not in VERIFY_MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(VERIFY_MODES)}")
    if slot_model not in SLOT_MODELS:
        raise ValueError(f"unknown slot model {slot_model!r}; expected one of {', '.join(SLOT_MODELS)}")
    families = build_workloads(quick) if families is None else families
    total = sum(len(workloads) for _, workloads in families)
    indicator = Progress(mode, total) if progress else None
    started = time.monotonic()
    rows: List[FamilyRow] = []
    smallest: Dict[Tuple[str, Optional[str]], Counterexample] = {}
    done = 0
    for family, workloads in families:
        family_rows = {nranks: FamilyRow(family, nranks) for nranks in rank_counts}
        family_started = time.monotonic()
        for workload in workloads:
            exploration = explore_rank(workload, mode, slot_model)
            divergences = cross_rank_divergences(exploration.outcomes)  # the same for any number of ranks
            for nranks in rank_counts:
                result = check_config(
                    workload, mode, exploration.outcomes, exploration.merges, nranks, divergences, slot_model
                )
                row = family_rows[nranks]
                row.configs += 1
                row.interleavings += result.joint_interleavings
                row.states += exploration.states
                row.outcomes += len(exploration.outcomes)
                for counterexample in result.counterexamples:
                    if counterexample.limitation and not strict:
                        row.limitations += 1
                    else:
                        row.violations += 1
                    key = (counterexample.kind, counterexample.shape)
                    if key not in smallest or _smaller(counterexample, smallest[key]):
                        smallest[key] = counterexample
            done += 1
            if indicator:
                indicator.update(done, family)
        elapsed = time.monotonic() - family_started
        for nranks in rank_counts:
            family_rows[nranks].seconds = elapsed
            rows.append(family_rows[nranks])
    return Report(
        mode=mode,
        slot_model=slot_model,
        rows=rows,
        counterexamples=sorted(smallest.values(), key=_counterexample_order),
        configs=sum(row.configs for row in rows),
        interleavings=sum(row.interleavings for row in rows),
        violations=sum(row.violations for row in rows),
        limitations=sum(row.limitations for row in rows),
        seconds=time.monotonic() - started,
        strict=strict,
    )


def _smaller(a: Counterexample, b: Counterexample) -> bool:
    def size(c: Counterexample):
        return (c.workload.size_key()[:3], c.nranks, sum(switches(o.witness) for o in c.rank_outcomes))

    return size(a) < size(b)


def _counterexample_order(c: Counterexample):
    return (KIND_ORDER.index(c.kind), c.scenario or "~", c.shape or "", c.workload.size_key()[:3], c.nranks)


def render_table(report: Report) -> str:
    header = ("family", "ranks", "configs", "interleavings", "states", "outcomes", "violations", "limits", "family s")
    rows = [header]
    for row in report.rows:
        rows.append(
            (
                row.family,
                str(row.nranks),
                str(row.configs),
                str(row.interleavings),
                str(row.states),
                str(row.outcomes),
                str(row.violations),
                str(row.limitations),
                f"{row.seconds:.2f}",
            )
        )
    rows.append(
        (
            "total",
            "",
            str(report.configs),
            str(report.interleavings),
            str(sum(r.states for r in report.rows)),
            str(sum(r.outcomes for r in report.rows)),
            str(report.violations),
            str(report.limitations),
            f"{report.seconds:.2f}",
        )
    )
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    lines = []
    for number, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells))
        if number == 0 or number == len(rows) - 2:
            lines.append("  ".join("-" * width for width in widths))
    return "\n".join(lines)


def counterexample_json(counterexample: Counterexample) -> dict:
    """A counterexample with every rank's merge replayed event by event."""
    c = counterexample
    ranks = []
    for rank, outcome in enumerate(c.rank_outcomes):
        ranks.append(
            {
                "rank": rank,
                "schedule": outcome.witness,
                "events": replay(c.workload, c.mode, outcome.witness, c.slot_model),
                "batches": [[list(task) for task in batch] for batch in outcome.batches],
                "drops": [list(task) for task in outcome.drops],
                "waits": [wait.describe() for wait in outcome.waits],
                "findings": sorted(f"{kind}: {detail}" for kind, detail in outcome.findings),
            }
        )
    return {
        "mode": c.mode,
        "slot_model": c.slot_model,
        "kind": c.kind,
        "limitation": c.limitation,
        "shape": c.shape,
        "scenario": c.scenario,
        "config": c.workload.to_json(),
        "config_text": c.workload.describe(),
        "nranks": c.nranks,
        "ranks": ranks,
        "barriers": c.barrier_run.to_json() if c.barrier_run else None,
        "details": c.details,
        "bad_joint_interleavings": c.bad_joint_interleavings,
        "joint_interleavings": c.joint_interleavings,
    }


def render_counterexample(counterexample: Counterexample) -> str:
    """A counterexample as text: the workload, every rank's merge replayed, and the barrier rounds."""
    c = counterexample
    tag = f"[{c.scenario}] " if c.scenario else ""
    shape = f" ({c.shape})" if c.shape else ""
    limitation = " [known limitation]" if c.limitation else ""
    lines = [
        f"counterexample {tag}{c.kind}{shape}{limitation}: mode {c.mode}, family {c.workload.family}, "
        f"{c.nranks} ranks ({c.bad_joint_interleavings} of {c.joint_interleavings} joint interleavings)",
        "  requests:      " + "  ".join(request.describe() for request in c.workload.requests),
        "  signals:       "
        + "  ".join(
            f"#{i} [" + ",".join(f"({s},{n}){o}" for (s, n), o in zip(signal, origins)) + "]"
            for i, (signal, origins) in enumerate(zip(c.workload.signals, c.workload.origins))
        ),
        "  registrations: "
        + (
            "  ".join(
                f"#{i} {r.request_id}@{r.slot} need {r.need_prefill_tokens}"
                for i, r in enumerate(c.workload.registrations)
            )
            or "-"
        ),
    ]
    for detail in c.details:
        lines.append(f"  {detail}")
    for rank, outcome in enumerate(c.rank_outcomes):
        lines.append(f"  rank {rank}: merge {describe_merge(outcome.witness)}")
        for step in replay(c.workload, c.mode, outcome.witness, c.slot_model):
            if step["event"] == "signal":
                event = f"signal #{step['index']} {_tasks_text(step['tasks'])}"
            else:
                event = f"register {step['request_id']}@{step['slot']} need {step['need_prefill_tokens']}"
            out = [f"batch {_tasks_text(batch)}" for batch in step["released"]]
            out += [f"drop ({s},{n}): {reason}" for s, n, reason in step["dropped"]]
            lines.append(f"    {step['step']:>2}: {event:<34} -> {', '.join(out) or '-'}")
        lines.append("    batches: " + (" ".join(_tasks_text(batch) for batch in outcome.batches) or "-"))
        lines.append("    waits:   " + (", ".join(wait.describe() for wait in outcome.waits) or "-"))
    if c.barrier_run is not None:
        lines.extend(f"  {line}" for line in describe_barriers(c.barrier_run))
    return "\n".join(lines)


def _tasks_text(tasks) -> str:
    return "[" + ",".join(f"({slot},{number})" for slot, number in tasks) + "]"
