"""``fastdeploy-pd-fix verify``: exhaustive interleaving explorer over the release logic.

For bounded workloads (:mod:`.workloads`) it enumerates every merge of the two streams on a rank, drives a fresh
release policy through it (:mod:`.models`; for ``ordered`` and ``upstream`` exactly
:func:`fastdeploy_pd_fix.core.release.make_release`), reduces the merges to one rank's distinct outcomes
(:mod:`.search`) and checks the invariants of ``shared/docs/protocol.md`` within and across ranks (:mod:`.checks`,
:mod:`.barriers`).

Usage: ``fastdeploy-pd-fix verify [--mode ordered|upstream|pr7872] [--quick] [--json-out PATH] [--strict]
[--slot-model fifo|dict] [--show N]``. Prints a progress line on stderr, a table per workload family and rank count
on stdout, the smallest counterexample of each kind found, and as the last line a JSON summary
``{"mode", "configs", "interleavings", "violations"}``; exits 0 iff there is no violation.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from fastdeploy_pd_fix.core.release import ORDERED
from fastdeploy_pd_fix.verify.checks import LIMITATIONS
from fastdeploy_pd_fix.verify.models import VERIFY_MODES
from fastdeploy_pd_fix.verify.report import counterexample_json, explore, render_counterexample, render_table
from fastdeploy_pd_fix.verify.workloads import FIFO, SLOT_MODELS


def _parse(argv: List[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="fastdeploy-pd-fix verify",
        description="Enumerate every interleaving, on every rank, of the layer-0 signal and registration streams "
        "for bounded workloads, and check the cross-rank invariants of the release logic.",
    )
    parser.add_argument("--mode", choices=VERIFY_MODES, default=ORDERED, help="release policy (default ordered)")
    parser.add_argument("--json-out", metavar="PATH", help="write the counterexamples and the summary as JSON")
    parser.add_argument("--quick", action="store_true", help="smaller workloads (fewer three-request templates)")
    parser.add_argument(
        "--strict", action="store_true", help="count the known limitations (stalls behind ghosts) as violations"
    )
    parser.add_argument(
        "--slot-model",
        choices=SLOT_MODELS,
        default=FIFO,
        help="idx_cache_task_dict as a per-slot FIFO (default; a slot is re-registered only after its request was "
        "sent) or as upstream's plain dict (a registration replaces the slot's entry)",
    )
    parser.add_argument("--show", type=int, default=3, metavar="N", help="print at most N counterexamples (default 3)")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    """``fastdeploy-pd-fix verify``: exit 0 iff no violation was found."""
    args = _parse(sys.argv[1:] if argv is None else argv)
    report = explore(args.mode, quick=args.quick, strict=args.strict, slot_model=args.slot_model)
    print(
        f"mode {report.mode}, slot model {report.slot_model}: {report.configs} configurations (workload x ranks), "
        "every merge of the two streams on every rank"
    )
    print(render_table(report))
    print(
        "interleavings: joint ones covered (merges per rank ** ranks); states: distinct (release state, outputs) "
        "per rank; outcomes: distinct per-rank results; violations: (configuration, kind) findings; limits: known, "
        "documented limitations, not counted"
        + (" (--strict: counted)" if args.strict else f" ({', '.join(LIMITATIONS)})")
    )
    violations = [c for c in report.counterexamples if args.strict or not c.limitation]
    limitations = [c for c in report.counterexamples if not args.strict and c.limitation]
    if violations:
        print(f"\n{len(violations)} kinds of violation; smallest counterexample of each (showing {args.show}):")
        for counterexample in violations[: args.show]:
            print()
            print(render_counterexample(counterexample))
        for counterexample in violations[args.show :]:
            tag = f"[{counterexample.scenario}] " if counterexample.scenario else ""
            print(
                f"  also: {tag}{counterexample.kind} ({counterexample.shape}) in {counterexample.workload.describe()}"
            )
    if limitations:
        print("\nknown, documented limitations (not counted; --strict counts them):")
        for counterexample in limitations:
            print(f"  {counterexample.kind}: {LIMITATIONS[counterexample.kind]}")
            print(f"    e.g. {counterexample.workload.describe()}: {counterexample.details[0]}")
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as handle:
            json.dump(
                {
                    "summary": report.summary(),
                    "limitations": report.limitations,
                    "strict": report.strict,
                    "seconds": round(report.seconds, 3),
                    "table": [vars(row) for row in report.rows],
                    "counterexamples": [counterexample_json(c) for c in report.counterexamples],
                },
                handle,
                indent=1,
            )
    print()
    print(json.dumps(report.summary()))
    return 0 if report.violations == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
