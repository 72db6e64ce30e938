"""Barrier rounds of the send path, counted and timed with real rank processes and manager-served barriers.

The send thread pays one ``begin_send_cache_barrier`` round per batch and, after the batch's last layer, one
``finish_send_cache_barrier`` round per request of the batch whose transfer is complete. Three batchings of the
same workload are compared:

``original``
    The engine's per-step batching with every task registered in time (the best case for the original code): one
    batch per layer-0 signal holding all of its tasks.
``upstream``
    :class:`~fastdeploy_pd_fix.policy.release.UpstreamRelease` (PR #8034) driven by the workload's two streams: one
    batch per request and signal, fewer when a late registration collapses a chunked request's pending signals.
``ordered``
    :class:`~fastdeploy_pd_fix.policy.release.OrderedRelease` driven by the same streams: one batch per signal.

Every rank replays the same sequence (the interleaving is the same on every rank here, so ``upstream`` cannot hang;
this measures cost, not safety). The barriers are ``threading.Barrier(nranks)`` objects held by a
``multiprocessing.managers.BaseManager`` server process and reached through proxies, as the engine's
``engine_worker_queue`` serves them.
"""

from __future__ import annotations

import multiprocessing
import statistics
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.managers import BarrierProxy, BaseManager
from typing import Dict, List, Sequence

from benchmarks.workload import SlotOwners, TimedHistory, WorkloadSpec, drive_release, make_workload
from fastdeploy_pd_fix.policy.release import ORDERED, UPSTREAM, Batch

ORIGINAL = "original"
MODES = (ORIGINAL, UPSTREAM, ORDERED)
BEGIN = "b"  # one begin_send_cache_barrier round
FINISH = "f"  # one finish_send_cache_barrier round


@dataclass(frozen=True)
class BarrierConfig:
    workloads: Sequence[WorkloadSpec] = field(
        default_factory=lambda: (WorkloadSpec(16, 40), WorkloadSpec(8, 50), WorkloadSpec(32, 20))
    )
    nranks: Sequence[int] = (2, 4, 8)
    repeats: int = 3
    timed_workload: int = 0  # index of the workload replayed by rank processes (all are counted)
    timeout_s: float = 120.0


def batch_sequences(workload: TimedHistory) -> Dict[str, List[Batch]]:
    """Each mode's batch sequence for ``workload``; the release modes come from the real release objects."""
    sequences = {ORIGINAL: [signal.batch for signal in workload.signals]}
    for mode in (UPSTREAM, ORDERED):
        trace = drive_release(mode, workload)
        if trace.drops:
            raise AssertionError(f"{mode} dropped tasks of a well-formed workload: {trace.drops[:3]}")
        sequences[mode] = [released.batch for released in trace.batches]
    return sequences


def wait_sequence(batches: Sequence[Batch], workload: TimedHistory) -> str:
    """The send thread's barrier waits for ``batches``: BEGIN per batch, then FINISH per request it completes."""
    owners = SlotOwners(workload.requests)
    waits = []
    for batch in batches:
        waits.append(BEGIN)
        for task in batch:
            _, final = owners.take(task)
            if final:
                waits.append(FINISH)
    return "".join(waits)


def count_rounds(workload: TimedHistory) -> Dict:
    """Batches, finishes and rounds of every mode, and each mode's rounds relative to ``original``."""
    waits = {mode: wait_sequence(batches, workload) for mode, batches in batch_sequences(workload).items()}
    modes = {
        mode: {"batches": sequence.count(BEGIN), "finishes": sequence.count(FINISH), "rounds": len(sequence)}
        for mode, sequence in waits.items()
    }
    for counts in modes.values():
        counts["ratio"] = counts["rounds"] / modes[ORIGINAL]["rounds"]
    return {"signals": len(workload.signals), "requests": len(workload.requests), "modes": modes, "waits": waits}


class BarrierManager(BaseManager):
    """Serves ``threading.Barrier`` objects to the rank processes, as the engine's manager serves its barriers."""


BarrierManager.register("Barrier", threading.Barrier, BarrierProxy)


def _rank_main(rank: int, waits: Dict[str, str], repeats: int, barriers: Dict, results, timeout_s: float) -> None:
    """One rank's send path: replay each mode's sequence of barrier waits, timing each replay."""
    timings: Dict[str, List[float]] = {mode: [] for mode in waits}
    try:
        for barrier in barriers.values():  # warm up: connect every proxy to the manager before timing
            barrier.wait(timeout_s)
        modes = list(waits)
        for repeat in range(repeats):
            for mode in modes[repeat % len(modes) :] + modes[: repeat % len(modes)]:  # rotate: no position bias
                barriers["start"].wait(timeout_s)  # all ranks start each replay together
                start = time.perf_counter()
                for wait in waits[mode]:
                    barriers[wait].wait(timeout_s)
                timings[mode].append(time.perf_counter() - start)
        results.put((rank, timings, None))
    except Exception as error:  # reported to the parent, which raises
        results.put((rank, timings, repr(error)))


def _rank_context():
    """Rank processes forked from a clean fork server holding only this module: no paddle, fast to start."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


def replay(waits: Dict[str, str], nranks: int, repeats: int, timeout_s: float) -> Dict[str, Dict]:
    """Replay every mode's waits on ``nranks`` spawned rank processes; send time per mode (slowest rank)."""
    context = _rank_context()
    manager = BarrierManager(ctx=context)
    manager.start()
    processes = []
    try:
        barriers = {"start": manager.Barrier(nranks), BEGIN: manager.Barrier(nranks), FINISH: manager.Barrier(nranks)}
        results = context.Queue()
        for rank in range(nranks):
            process = context.Process(
                target=_rank_main, args=(rank, waits, repeats, barriers, results, timeout_s), daemon=True
            )
            process.start()
            processes.append(process)
        reports = [results.get(timeout=timeout_s * (repeats * len(waits) + 1)) for _ in range(nranks)]
        for process in processes:
            process.join(timeout_s)
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
        manager.shutdown()
    errors = [f"rank {rank}: {error}" for rank, _, error in reports if error]
    if errors:
        raise RuntimeError(f"barrier replay failed on {nranks} ranks: {'; '.join(errors)}")
    timed = {}
    for mode, sequence in waits.items():
        per_repeat = [max(timings[mode][index] for _, timings, _ in reports) for index in range(repeats)]
        timed[mode] = {
            "rounds": len(sequence),
            "send_ms": min(per_repeat) * 1e3,
            "send_median_ms": statistics.median(per_repeat) * 1e3,
            "per_round_us": min(per_repeat) * 1e6 / max(1, len(sequence)),
        }
    for entry in timed.values():
        entry["time_ratio"] = entry["send_ms"] / timed[ORIGINAL]["send_ms"]
    return timed


def run(config: BarrierConfig) -> Dict:
    """Count every workload's rounds, then replay the timed workload on each number of ranks."""
    workloads = []
    for spec in config.workloads:
        counted = count_rounds(make_workload(spec))
        counted["spec"] = {"requests_per_step": spec.requests_per_step, "steps": spec.steps, "seed": spec.seed}
        workloads.append(counted)
    timed_waits = {mode: workloads[config.timed_workload]["waits"][mode] for mode in MODES}
    timings = {str(nranks): replay(timed_waits, nranks, config.repeats, config.timeout_s) for nranks in config.nranks}
    for counted in workloads:
        del counted["waits"]  # long strings; the counts say it all
    return {"workloads": workloads, "timed_workload": config.timed_workload, "timings": timings}


def table(results: Dict) -> str:
    lines = ["Barrier rounds (begin per batch + finish per finished request), ratio to the original per-step batching"]
    lines.append(f"{'K x S':>8} {'signals':>8} {'requests':>8} " + " ".join(f"{mode:>16}" for mode in MODES))
    for counted in results["workloads"]:
        spec = counted["spec"]
        cells = " ".join(
            f"{counted['modes'][mode]['rounds']:>8} ({counted['modes'][mode]['ratio']:.2f}x)" for mode in MODES
        )
        lines.append(
            f"{spec['requests_per_step']:>3} x {spec['steps']:<3} {counted['signals']:>8} {counted['requests']:>8} "
            + cells
        )
    spec = results["workloads"][results["timed_workload"]]["spec"]
    lines.append(
        f"Send path, barrier waits only ({spec['requests_per_step']} x {spec['steps']} workload, slowest rank, "
        "best of repeats): ms (ratio to original), us per round"
    )
    lines.append(f"{'ranks':>6} " + " ".join(f"{mode:>26}" for mode in MODES))
    for nranks, timed in results["timings"].items():
        cells = " ".join(
            f"{timed[mode]['send_ms']:>9.1f} ({timed[mode]['time_ratio']:.2f}x) {timed[mode]['per_round_us']:>6.0f}us"
            for mode in MODES
        )
        lines.append(f"{nranks:>6} " + cells)
    return "\n".join(lines)
