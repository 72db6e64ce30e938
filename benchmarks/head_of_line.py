"""Head-of-line cost of ordering, in virtual time: how much later ``ordered`` releases a task than ``upstream``.

A discrete event simulation, no sleeps: the workload's timestamped signals and registrations (seeded lognormal
registration delays) drive :class:`~fastdeploy_pd_fix.policy.release.OrderedRelease` and
:class:`~fastdeploy_pd_fix.policy.release.UpstreamRelease` event by event, and every released batch is stamped with the
time of the event that released it.

- Wait of a batch: its release time minus its signal's arrival (upstream: the signal of its task).
- Extra wait of a task: the release time of its signal in ``ordered`` minus the release time of the task in
  ``upstream`` (when upstream collapses a chunk into a later one, the chunk counts as released with it). Never
  negative: ``upstream`` releases a task as soon as its own request is registered, ``ordered`` never earlier.
- Blocking task: the request whose registration released the task's signal in ``ordered`` (its own request, another
  request of the same signal, or one of an older signal); its own registration delay is the blocking delay (0 when
  the signal was released on arrival). A task is delayed (extra wait > 0) only by another request: when its own
  registration released the signal, upstream could not have released it earlier either.
- The goal: p99 extra wait <= p99 blocking delay. Per task the extra wait can never exceed the blocking delay,
  because the blocking request was scheduled no later than the task's signal arrived.
- Caveat: the send thread serves its queue in order in both modes; this measures when batches enter the queue, not
  when their transfer starts, so it is an upper bound on what ordering adds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Dict, List, Sequence, Tuple

from benchmarks.workload import SlotOwners, TimedHistory, WorkloadSpec, drive_release, make_workload
from fastdeploy_pd_fix.policy.release import ORDERED, UPSTREAM
from fastdeploy_pd_fix.verify.workloads import REGISTRATION_EVENT


@dataclass(frozen=True)
class HolConfig:
    workload: WorkloadSpec = field(default_factory=lambda: WorkloadSpec(16, 1000, seed=1))
    delay_medians_ms: Sequence[float] = (10.0, 2.0, 40.0)  # the first one is the headline


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def upstream_release_times(workload: TimedHistory) -> Tuple[Dict[Tuple[str, int], float], List[float]]:
    """Release time of every (request, chunk end) in upstream mode, and the wait of every upstream batch."""
    signal_time = {
        (owner, prefilled_token_num): signal.time_ms
        for signal in workload.signals
        for (_, _, prefilled_token_num), owner in zip(signal.tasks, signal.owners)
    }
    owners = SlotOwners(workload.requests)
    released: Dict[Tuple[str, int], float] = {}
    waits = []
    for batch in drive_release(UPSTREAM, workload).batches:
        for task in batch.batch:
            owner, _ = owners.take(task)
            for chunk_end in owner.occupancy.ends:  # a collapsed batch also carries the chunks before it
                if chunk_end <= task[1]:
                    released.setdefault((owner.occupancy.request_id, chunk_end), batch.time_ms)
            waits.append(batch.time_ms - signal_time[(owner.occupancy.request_id, task[1])])
    return released, waits


def simulate(workload: TimedHistory) -> Dict:
    """Per-batch waits of both modes, per-task extra wait of ``ordered`` and the blocking delay behind it."""
    ordered = drive_release(ORDERED, workload)
    if [batch.batch for batch in ordered.batches] != [signal.batch for signal in workload.signals]:
        raise AssertionError("ordered mode must release every signal of a well-formed workload, in order")
    upstream_released, upstream_waits = upstream_release_times(workload)
    ordered_waits, extra, blocking = [], [], []
    for signal, batch in zip(workload.signals, ordered.batches):
        ordered_waits.append(batch.time_ms - signal.time_ms)
        trigger = batch.trigger
        blocker = trigger.request if trigger.kind == REGISTRATION_EVENT else None
        for (_, _, prefilled_token_num), owner in zip(signal.tasks, signal.owners):
            extra.append(batch.time_ms - upstream_released[(owner, prefilled_token_num)])
            blocking.append(blocker.registration_delay_ms if blocker else 0.0)
    violations = sum(1 for extra_ms, delay_ms in zip(extra, blocking) if extra_ms > delay_ms + 1e-9)
    delayed = [delay for extra_ms, delay in zip(extra, blocking) if extra_ms > 0]
    return {
        "signals": len(workload.signals),
        "tasks": len(extra),
        "ordered_wait_ms": _quantiles(ordered_waits),
        "upstream_wait_ms": _quantiles(upstream_waits),
        "extra_wait_ms": _quantiles(extra) | {"max": max(extra), "mean": sum(extra) / len(extra)},
        "blocking_delay_ms": _quantiles(blocking),
        "blocking_delay_of_delayed_tasks_ms": _quantiles(delayed),
        "registration_delay_ms": _quantiles([request.registration_delay_ms for request in workload.requests]),
        "delayed_fraction": len(delayed) / len(extra),
        "pairwise_violations": violations,
        "goal_met": percentile(extra, 99) <= percentile(blocking, 99),
        "samples": {"extra_ms": extra, "blocking_delay_ms": blocking},
    }


def _quantiles(values: Sequence[float]) -> Dict[str, float]:
    if not values:
        return {"p50": None, "p99": None}
    return {"p50": percentile(values, 50), "p99": percentile(values, 99)}


def run(config: HolConfig) -> Dict:
    """Simulate the workload once per registration delay median; the first median is the headline."""
    runs = []
    for median_ms in config.delay_medians_ms:
        spec = replace(config.workload, delay_median_ms=median_ms)
        result = simulate(make_workload(spec))
        result["spec"] = {
            "requests_per_step": spec.requests_per_step,
            "steps": spec.steps,
            "seed": spec.seed,
            "step_ms": spec.step_ms,
            "signal_offset_ms": spec.signal_offset_ms,
            "delay_median_ms": spec.delay_median_ms,
            "delay_sigma": spec.delay_sigma,
        }
        runs.append(result)
    return {"runs": runs}


def table(results: Dict) -> str:
    spec = results["runs"][0]["spec"]
    lines = [
        f"Head-of-line cost of ordering (virtual time; {spec['requests_per_step']} requests/step, {spec['steps']} "
        f"steps of {spec['step_ms']:g} ms, registration delay lognormal sigma {spec['delay_sigma']:g}), ms",
        f"{'delay p50':>9} {'tasks':>7} {'ordered wait':>14} {'upstream wait':>14} {'extra wait':>14} "
        f"{'blocking delay':>15} {'all delays':>11} {'delayed':>8} {'goal':>5}",
        f"{'':>9} {'':>7} {'p50/p99':>14} {'p50/p99':>14} {'p50/p99':>14} {'p50/p99':>15} {'p99':>11}",
    ]
    for run_result in results["runs"]:
        cells = [
            f"{run_result[key]['p50']:.1f}/{run_result[key]['p99']:.1f}"
            for key in ("ordered_wait_ms", "upstream_wait_ms", "extra_wait_ms", "blocking_delay_ms")
        ]
        lines.append(
            f"{run_result['spec']['delay_median_ms']:>9g} {run_result['tasks']:>7} {cells[0]:>14} {cells[1]:>14} "
            f"{cells[2]:>14} {cells[3]:>15} {run_result['registration_delay_ms']['p99']:>11.1f} "
            f"{run_result['delayed_fraction']:>8.1%} {'met' if run_result['goal_met'] else 'NOT':>5}"
        )
    return "\n".join(lines)
