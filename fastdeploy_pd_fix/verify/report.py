"""The driver over every workload family and rank count, and what it reports: the table and the counterexamples."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from fastdeploy_pd_fix.engine_history.streams import LifecycleWorkload, request_text, task_text, with_notices
from fastdeploy_pd_fix.policy.release import ORDERED, UPSTREAM
from fastdeploy_pd_fix.verify.barriers import describe_barriers
from fastdeploy_pd_fix.verify.checks import (
    FAILURE_CLASSES,
    KIND_ORDER,
    NOTICES_OFF_LIMIT,
    WORSE_THAN_UPSTREAM,
    ConfigResult,
    Counterexample,
    check_config,
    cross_rank_divergences,
)
from fastdeploy_pd_fix.verify.explorer import RankExploration, replay
from fastdeploy_pd_fix.verify.lifecycle import lifecycle_families
from fastdeploy_pd_fix.verify.lifecycle_rank import LifecycleRank, explore_lifecycle_rank
from fastdeploy_pd_fix.verify.models import VERIFY_MODES
from fastdeploy_pd_fix.verify.race_rank import RaceRank, explore_rank
from fastdeploy_pd_fix.verify.workloads import FIFO, SLOT_MODELS, build_workloads, describe_merge, switches

#: Whether the lifecycle families are explored with the engine's notices (engine-side patch on; ordered mode only,
#: the only mode the engine emits them for), without them (patch absent or standing aside), or both ways.
NOTICES_ON, NOTICES_OFF, NOTICES_BOTH = "on", "off", "both"
NOTICE_SETTINGS = (NOTICES_ON, NOTICES_OFF, NOTICES_BOTH)


@dataclass
class FamilyRow:
    family: str
    nranks: int
    configs: int = 0
    interleavings: int = 0
    states: int = 0
    outcomes: int = 0
    #: Without notices (every classic family; a lifecycle family unless explored with notices only).
    violations: int = 0
    limitations: int = 0
    seconds: float = 0.0
    lifecycle: bool = False
    without_notices: bool = True
    #: A lifecycle family's violations and limits with the engine's notices (None: not explored with them).
    notice_violations: Optional[int] = None
    notice_limitations: Optional[int] = None
    #: The comparison mode's violations and limits on the same configurations (None: not compared).
    compared_violations: Optional[int] = None
    compared_limitations: Optional[int] = None


@dataclass
class Report:
    mode: str
    slot_model: str
    rows: List[FamilyRow]
    counterexamples: List[Counterexample]  # smallest per (kind, shape, family kind), in discovery order
    configs: int
    interleavings: int
    violations: int  # with and without notices
    limitations: int
    seconds: float
    strict: bool
    compare: Optional[str] = None
    notices: str = NOTICES_OFF
    notice_violations: int = 0  # of ``violations``, those with notices
    notice_limitations: int = 0

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


def _explore_one(workload, mode: str, slot_model: str) -> RankExploration:
    if isinstance(workload, LifecycleWorkload):
        return explore_lifecycle_rank(workload, mode)
    return explore_rank(workload, mode, slot_model)


def _configs(workload, mode, exploration, rank_counts, slot_model) -> Dict[int, ConfigResult]:
    """Check one workload's outcomes for every rank count; lifecycle findings in undecidable workloads are limits."""
    divergences = cross_rank_divergences(exploration.outcomes)  # the same for any number of ranks
    results = {}
    reason = workload.limit_reason() if isinstance(workload, LifecycleWorkload) else None
    if mode == ORDERED and not workload.announced:
        reason = NOTICES_OFF_LIMIT
    for nranks in rank_counts:
        result = check_config(
            workload, mode, exploration.outcomes, exploration.interleavings, nranks, divergences, slot_model
        )
        for counterexample in result.counterexamples:
            counterexample.limit_reason = reason
        results[nranks] = result
    return results


def _never_worse(result: ConfigResult, compared: ConfigResult) -> Optional[Counterexample]:
    """Invariant 7: a class of failure (liveness, or safety) that the compared (upstream) mode never shows on this
    configuration must not appear in the explored mode either."""
    worse = []
    for name, kinds in FAILURE_CLASSES.items():
        ours = [c for c in result.counterexamples if c.kind in kinds]
        if ours and not any(c.kind in kinds for c in compared.counterexamples):
            worse.append((name, ours[0]))
    if not worse:
        return None
    name, example = worse[0]
    details = [
        f"{' and '.join(n for n, _ in worse)} failure where {UPSTREAM} has none: {example.kind}: "
        + (example.details[0] if example.details else "")
    ]
    return Counterexample(
        example.mode,
        WORSE_THAN_UPSTREAM,
        None,
        example.workload,
        example.nranks,
        example.rank_outcomes,
        example.barrier_run,
        details,
        example.bad_joint_interleavings,
        example.joint_interleavings,
        example.slot_model,
        example.reason if example.limitation else None,  # worse only by a known limit: that limit
    )


def _variants(workload, mode: str, notices: str) -> list:
    """The workloads one configuration is explored as: a lifecycle one without notices and/or with them."""
    if not isinstance(workload, LifecycleWorkload) or mode != ORDERED:
        return [workload]
    return ([] if notices == NOTICES_ON else [workload]) + ([] if notices == NOTICES_OFF else [with_notices(workload)])


def explore(
    mode: str = ORDERED,
    quick: bool = False,
    rank_counts: Sequence[int] = (2, 3),
    strict: bool = False,
    families: Optional[List[Tuple[str, list]]] = None,
    progress: bool = True,
    slot_model: str = FIFO,
    compare: Optional[str] = None,
    lifecycle: bool = True,
    notices: str = NOTICES_BOTH,
) -> Report:
    """Explore every configured workload under ``mode``; return the table rows and the minimal counterexamples.

    ``families`` defaults to the classic families (:func:`.workloads.build_workloads`) followed, with ``lifecycle``,
    by the slot-lifecycle ones (:func:`.lifecycle.lifecycle_families`). In ordered mode, ``notices`` says whether a
    lifecycle workload is explored with the engine's notices
    (:func:`~fastdeploy_pd_fix.engine_history.streams.with_notices`, fenced), without them, or both ways; with
    notices nothing is a limit. With ``compare`` (a mode), every workload is explored under that mode too, without
    notices (upstream ignores them, and the engine emits them for ordered mode only): its counts
    are reported beside, and when it is ``upstream`` a finding class it never shows where ``mode`` does (with or
    without notices) is counted as ``worse-than-upstream`` (invariant 7)."""
    for name in (mode, compare or mode):
        if name not in VERIFY_MODES:
            raise ValueError(f"unknown mode {name!r}; expected one of {', '.join(VERIFY_MODES)}")
    if slot_model not in SLOT_MODELS:
        raise ValueError(f"unknown slot model {slot_model!r}; expected one of {', '.join(SLOT_MODELS)}")
    if notices not in NOTICE_SETTINGS:
        raise ValueError(f"unknown notices setting {notices!r}; expected one of {', '.join(NOTICE_SETTINGS)}")
    if families is None:
        families = build_workloads(quick) + (lifecycle_families(quick) if lifecycle else [])
    total = sum(len(workloads) for _, workloads in families)
    indicator = Progress(mode, total) if progress else None
    started = time.monotonic()
    rows: List[FamilyRow] = []
    smallest: Dict[tuple, Counterexample] = {}
    done = 0
    for family, workloads in families:
        is_lifecycle = bool(workloads) and isinstance(workloads[0], LifecycleWorkload)
        with_notice_counts = is_lifecycle and mode == ORDERED and notices != NOTICES_OFF
        family_rows = {
            nranks: FamilyRow(
                family,
                nranks,
                lifecycle=is_lifecycle,
                without_notices=not with_notice_counts or notices == NOTICES_BOTH,
                notice_violations=0 if with_notice_counts else None,
                notice_limitations=0 if with_notice_counts else None,
            )
            for nranks in rank_counts
        }
        if compare:
            for row in family_rows.values():
                row.compared_violations = row.compared_limitations = 0
        family_started = time.monotonic()
        for workload in workloads:
            if compare:
                compared = _configs(
                    workload, compare, _explore_one(workload, compare, slot_model), rank_counts, slot_model
                )
                for nranks, result in compared.items():
                    row = family_rows[nranks]
                    for counterexample in result.counterexamples:
                        if counterexample.limitation and not strict:
                            row.compared_limitations += 1
                        else:
                            row.compared_violations += 1
            for number, variant in enumerate(_variants(workload, mode, notices)):
                exploration = _explore_one(variant, mode, slot_model)
                results = _configs(variant, mode, exploration, rank_counts, slot_model)
                noticed = has_notices(variant)
                for nranks, result in results.items():
                    row = family_rows[nranks]
                    row.configs += number == 0  # one configuration, explored with and without notices
                    row.interleavings += result.joint_interleavings
                    row.states += exploration.states
                    row.outcomes += len(exploration.outcomes)
                    found = list(result.counterexamples)
                    worse = _never_worse(result, compared[nranks]) if compare == UPSTREAM != mode else None
                    found += [worse] if worse else []
                    for counterexample in found:
                        limit = counterexample.limitation and not strict
                        if noticed:
                            row.notice_limitations += limit
                            row.notice_violations += not limit
                        else:
                            row.limitations += limit
                            row.violations += not limit
                        # a kind of violation is shown apart from the same kind as a limit, never hidden behind it
                        key = (counterexample.kind, counterexample.shape, is_lifecycle, noticed, limit)
                        if key not in smallest or _smaller(counterexample, smallest[key]):
                            smallest[key] = counterexample
            done += 1
            if indicator:
                indicator.update(done, family)
        elapsed = time.monotonic() - family_started
        for nranks in rank_counts:
            family_rows[nranks].seconds = elapsed
            rows.append(family_rows[nranks])
    notice_violations = sum(row.notice_violations or 0 for row in rows)
    notice_limitations = sum(row.notice_limitations or 0 for row in rows)
    return Report(
        mode=mode,
        slot_model=slot_model,
        rows=rows,
        counterexamples=sorted(smallest.values(), key=_counterexample_order),
        configs=sum(row.configs for row in rows),
        interleavings=sum(row.interleavings for row in rows),
        violations=sum(row.violations for row in rows) + notice_violations,
        limitations=sum(row.limitations for row in rows) + notice_limitations,
        seconds=time.monotonic() - started,
        strict=strict,
        compare=compare,
        notices=notices if mode == ORDERED else NOTICES_OFF,
        notice_violations=notice_violations,
        notice_limitations=notice_limitations,
    )


def _smaller(a: Counterexample, b: Counterexample) -> bool:
    def size(c: Counterexample):
        return (c.workload.size_key()[:3], c.nranks, sum(switches(o.witness) for o in c.rank_outcomes))

    return size(a) < size(b)


def has_notices(workload) -> bool:
    """Whether ``workload`` is a lifecycle one whose cache info carries the engine's notices."""
    return isinstance(workload, LifecycleWorkload) and workload.notices


def _counterexample_order(c: Counterexample):
    key = (KIND_ORDER.index(c.kind), c.scenario or "~", c.shape or "", has_notices(c.workload))
    return key + (c.workload.size_key()[:3], c.nranks)


def render_table(report: Report) -> str:
    """Per family and rank count; lifecycle families after a rule; a lifecycle family's counts with the engine's
    notices beside those without (``-``: not explored that way); with a comparison mode, its counts beside."""
    noticed = any(row.notice_violations is not None for row in report.rows)
    header = ["family", "ranks", "configs", "interleavings", "states", "outcomes", "violations", "limits"]
    if noticed:
        header += ["notices viol.", "notices limits"]
    if report.compare:
        header += [f"{report.compare} viol.", f"{report.compare} limits"]
    header.append("family s")
    table = [tuple(header)]
    rules = {0}
    for row in report.rows:
        if row.lifecycle and not any(earlier.lifecycle for earlier in report.rows[: report.rows.index(row)]):
            rules.add(len(table) - 1)
        cells = [row.family, str(row.nranks), str(row.configs), str(row.interleavings), str(row.states)]
        cells += [str(row.outcomes)] + _counts(row.without_notices, row.violations, row.limitations)
        if noticed:
            cells += _counts(row.notice_violations is not None, row.notice_violations, row.notice_limitations)
        if report.compare:
            cells += [str(row.compared_violations), str(row.compared_limitations)]
        table.append(tuple(cells + [f"{row.seconds:.2f}"]))
    rules.add(len(table) - 1)
    total = ["total", "", str(report.configs), str(report.interleavings), str(sum(r.states for r in report.rows))]
    total += [str(sum(r.outcomes for r in report.rows))]
    total += [str(report.violations - report.notice_violations), str(report.limitations - report.notice_limitations)]
    if noticed:
        total += [str(report.notice_violations), str(report.notice_limitations)]
    if report.compare:
        total += [str(sum(r.compared_violations for r in report.rows))]
        total += [str(sum(r.compared_limitations for r in report.rows))]
    table.append(tuple(total + [f"{report.seconds:.2f}"]))
    widths = [max(len(row[column]) for row in table) for column in range(len(header))]
    lines = []
    for number, row in enumerate(table):
        cells = [row[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells))
        if number in rules:
            lines.append("  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _counts(explored: bool, violations: Optional[int], limitations: Optional[int]) -> List[str]:
    return [str(violations), str(limitations)] if explored else ["-", "-"]


def counterexample_json(counterexample: Counterexample) -> dict:
    """A counterexample with every rank's merge replayed event by event."""
    c = counterexample
    lifecycle = isinstance(c.workload, LifecycleWorkload)
    ranks = []
    for rank, outcome in enumerate(c.rank_outcomes):
        if lifecycle:
            events = replay(LifecycleRank(c.workload, c.mode), outcome.witness)
        else:
            events = replay(RaceRank(c.workload, c.mode, c.slot_model), outcome.witness)
        ranks.append(
            {
                "rank": rank,
                "schedule": outcome.witness,
                "events": events,
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
        "limit_reason": c.reason if c.limitation else None,
        "shape": c.shape,
        "scenario": c.scenario,
        "config": c.workload.to_json(),
        "config_text": c.workload.describe(),
        "notices": has_notices(c.workload),
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
    if isinstance(c.workload, LifecycleWorkload):
        return _render_lifecycle_counterexample(c)
    tag = f"[{c.scenario}] " if c.scenario else ""
    shape = f" ({c.shape})" if c.shape else ""
    limitation = " [known limitation]" if c.limitation else ""
    lines = [
        f"counterexample {tag}{c.kind}{shape}{limitation}: mode {c.mode}, family {c.workload.family}, "
        f"{c.nranks} ranks ({c.bad_joint_interleavings} of {c.joint_interleavings} joint interleavings)",
        "  requests:      " + "  ".join(map(request_text, c.workload.requests)),
        "  signals:       "
        + "  ".join(
            f"#{i} [" + ",".join(f"{task_text(task)}{o}" for task, o in zip(signal, origins)) + "]"
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
        for step in replay(RaceRank(c.workload, c.mode, c.slot_model), outcome.witness):
            if step["event"] == "signal":
                event = f"signal #{step['index']} [{','.join(task_text(task) for task in step['tasks'])}]"
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


def _render_lifecycle_counterexample(c: Counterexample) -> str:
    shape = f" ({c.shape})" if c.shape else ""
    limitation = " [known limitation]" if c.limitation else ""
    notices = " with engine notices" if c.workload.notices else ""
    lines = [
        f"counterexample {c.kind}{shape}{limitation}: mode {c.mode}{notices}, lifecycle family {c.workload.family}, "
        f"{c.nranks} ranks ({c.bad_joint_interleavings} of {c.joint_interleavings} joint interleavings)",
        "  engine history: " + "; ".join(occupancy.describe() for occupancy in c.workload.occupancies),
        "  streams:        " + c.workload.describe().split(" | ", 1)[1],
    ]
    lines += [f"  {detail}" for detail in c.details]
    for rank, outcome in enumerate(c.rank_outcomes):
        lines.append(f"  rank {rank}: interleaving {outcome.witness} (S signal, C cache info, X take, Y finish send)")
        lines += [f"    {line}" for line in replay(LifecycleRank(c.workload, c.mode), outcome.witness)]
        lines.append("    waits:   " + (", ".join(wait.describe() for wait in outcome.waits) or "-"))
        lines += [f"    {kind}: {detail}" for kind, detail in sorted(outcome.findings)]
    if c.barrier_run is not None:
        lines.extend(f"  {line}" for line in describe_barriers(c.barrier_run))
    return "\n".join(lines)
