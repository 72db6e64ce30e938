"""``fastdeploy-pd-fix verify``: exhaustive interleaving explorer over the release logic.

For bounded workloads (:mod:`.workloads`) it drives a fresh release policy (:mod:`.models`; for ``ordered`` and
``upstream`` exactly :func:`fastdeploy_pd_fix.policy.release.make_release`) through every interleaving of one rank's
threads and reduces them to the rank's distinct outcomes (:mod:`.explorer`), then checks the invariants of
``docs/protocol.md`` within and across ranks (:mod:`.checks`, :mod:`.barriers`). In the race families a rank's
interleavings are the merges of its two streams (:mod:`.race_rank`); the slot-lifecycle families (:mod:`.lifecycle`:
aborts, repeated and late D-parts, requests that never register) have the send thread as a third actor
(:mod:`.lifecycle_rank`), and their findings in workloads the two streams cannot decide are counted as limits, with
the reason. In ordered mode they are explored both without and with the engine's slot-lifecycle notices (release
rules 8 and 9: the engine-side patch absent or on); with notices nothing is a limit.

Usage: ``fastdeploy-pd-fix verify [--mode ordered|upstream|pr7872] [--compare MODE|none] [--quick] [--no-lifecycle]
[--notices on|off|both] [--json-out PATH] [--strict] [--slot-model fifo|dict] [--show N]``. Prints a progress line
on stderr, a table per workload family and rank count on stdout (a lifecycle family's counts with notices beside
those without, and the comparison mode's violations and limits beside: by default ``upstream``, or ``ordered`` when
exploring ``upstream``), the smallest counterexample of each kind found, and as the last line a JSON summary
``{"mode", "configs", "interleavings", "violations"}`` (``violations`` with and without notices; the JSON file
has them apart); exits 0 iff there is no violation in ``--mode``.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Dict, List, Optional

from fastdeploy_pd_fix.arguments import OneLineParser, output_file
from fastdeploy_pd_fix.policy.release import ORDERED, UPSTREAM
from fastdeploy_pd_fix.verify.models import VERIFY_MODES
from fastdeploy_pd_fix.verify.report import (
    NOTICE_SETTINGS,
    NOTICES_BOTH,
    counterexample_json,
    explore,
    has_notices,
    render_counterexample,
    render_table,
)
from fastdeploy_pd_fix.verify.workloads import FIFO, SLOT_MODELS


def _parse(argv: List[str]) -> argparse.Namespace:
    parser = OneLineParser(
        prog="fastdeploy-pd-fix verify",
        description="Enumerate every interleaving, on every rank, of the layer-0 signal and registration streams "
        "for bounded workloads, and check the cross-rank invariants of the release logic.",
    )
    parser.add_argument("--mode", choices=VERIFY_MODES, default=ORDERED, help="release policy (default ordered)")
    # Checked now, not after a run of many seconds: the JSON file must be writable where it is asked for.
    parser.add_argument(
        "--json-out", metavar="PATH", type=output_file, help="write the counterexamples and the summary as JSON"
    )
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
    parser.add_argument(
        "--compare",
        choices=VERIFY_MODES + ("none",),
        help="also explore every workload in this mode and print its counts beside; against upstream, also check "
        "invariant 7 (never worse than upstream). Default: upstream (ordered when --mode upstream)",
    )
    parser.add_argument("--no-lifecycle", action="store_true", help="skip the slot-lifecycle families")
    parser.add_argument(
        "--notices",
        choices=NOTICE_SETTINGS,
        default=NOTICES_BOTH,
        help="explore the lifecycle families in ordered mode with the engine's slot-lifecycle notices (engine-side "
        "patch on), without them (absent or standing aside), or both ways side by side (default both)",
    )
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    """``fastdeploy-pd-fix verify``: exit 0 iff no violation was found."""
    args = _parse(sys.argv[1:] if argv is None else argv)
    compare = args.compare or (ORDERED if args.mode == UPSTREAM else UPSTREAM)
    report = explore(
        args.mode,
        quick=args.quick,
        strict=args.strict,
        slot_model=args.slot_model,
        compare=None if compare in ("none", args.mode) else compare,
        lifecycle=not args.no_lifecycle,
        notices=args.notices,
    )
    print(
        f"mode {report.mode}, slot model {report.slot_model}: {report.configs} configurations (workload x ranks), "
        "every merge of the two streams on every rank; lifecycle families (below the rule): every interleaving of "
        "the signal, registration and send threads"
    )
    print(render_table(report))
    print(
        "interleavings: joint ones covered (merges per rank ** ranks); states: distinct (release state, outputs) "
        "per rank; outcomes: distinct per-rank results; violations: (configuration, kind) findings; limits: known, "
        "documented limitations (ordered: workloads without the engine's notices, released by upstream's rule; "
        "upstream: ghosts and lifecycle workloads the two streams cannot decide), not counted"
        + (" (--strict: counted)" if args.strict else "")
        + (
            "; notices viol./limits: the lifecycle families with the engine's notices (fenced), where nothing is a "
            "limit; '-': not explored that way"
            if any(row.notice_violations is not None for row in report.rows)
            else ""
        )
        + (f"; {report.compare} viol./limits: the same counts in mode {report.compare}" if report.compare else "")
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
            tag += "[with notices] " if has_notices(counterexample.workload) else ""
            print(
                f"  also: {tag}{counterexample.kind} ({counterexample.shape}) in {counterexample.workload.describe()}"
            )
    if limitations:
        print("\nknown, documented limitations (not counted; --strict counts them), smallest example of each kind:")
        by_reason: Dict[str, list] = {}
        for counterexample in limitations:
            by_reason.setdefault(counterexample.reason, []).append(counterexample)
        for reason, examples in by_reason.items():
            print(f"  {reason}:")
            for counterexample in examples:
                family = f" [{counterexample.workload.family}]" if counterexample.limit_reason else ""
                print(f"    {counterexample.kind}{family}, e.g. {counterexample.workload.describe()}")
                print(f"      {counterexample.details[0]}")
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as handle:
            json.dump(
                {
                    "summary": report.summary(),
                    "notices": report.notices,
                    "notice_violations": report.notice_violations,
                    "notice_limitations": report.notice_limitations,
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
