"""Command line: ``fastdeploy-pd-fix status | demo | verify`` (also ``python -m fastdeploy_pd_fix``)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from fastdeploy_pd_fix import __version__


def _bootstrap_line(state) -> str:
    if not state["installed"]:
        return (
            "NOT active: fastdeploy_pd_fix.pth did not run in this interpreter (is the plugin pip-installed into "
            "this environment?)"
        )
    if state["disabled"]:
        return "installed, switched off by FD_PD_FIX=0: nothing is patched"
    hooks = "import hook on" if state["import_hook"] else "no import hook (fastdeploy not importable at start-up)"
    return f"active ({hooks}; the cache messager script is patched as its class is built)"


def status(args) -> int:
    """Print what the plugin does in this environment: bootstrap, switches, FastDeploy, target, manifest."""
    from fastdeploy_pd_fix import _bootstrap
    from fastdeploy_pd_fix.patching import MANIFEST, RECORDS, analyse_class, fastdeploy_version, selected_mode

    mode, mode_warning = selected_mode()
    print(f"fastdeploy-pd-fix {__version__}")
    print(f"bootstrap:   {_bootstrap_line(_bootstrap.state)}")
    print(f"switch:      {_bootstrap.ENV_SWITCH}={os.environ.get(_bootstrap.ENV_SWITCH, '1')}")
    print(f"mode:        {mode}" + (f" ({mode_warning})" if mode_warning else ""))
    try:
        from fastdeploy.cache_manager import cache_messager
    except Exception as error:  # FastDeploy absent, or its import needs a GPU build
        cache_messager = None
        print(
            f"FastDeploy:  {fastdeploy_version()}; fastdeploy.cache_manager.cache_messager not importable: {error!r}"
        )
    if cache_messager is not None:
        print(f"FastDeploy:  {fastdeploy_version()} ({getattr(cache_messager, '__file__', '?')})")
        cls = getattr(cache_messager, "CacheMessagerV1", None)
        if cls is None:
            print("target:      no CacheMessagerV1: nothing to patch (the plugin stands aside)")
        else:
            analysis = analyse_class(cls)
            verdict = "recognised" if analysis.recognised else f"not recognised, stands aside: {analysis.reason}"
            print(f"target:      CacheMessagerV1 {verdict}; {analysis.features()}")
        for record in RECORDS:
            print(f"this process: {record.describe()}")
    print("manifest (details: fastdeploy_pd_fix/patching.py):")
    for patch in MANIFEST:
        print(f"  {patch.target}: {patch.how}; upstream {patch.upstream}; remove when {patch.remove_when}")
    return 0


def demo(args) -> int:
    from fastdeploy_pd_fix.demo import run_demo

    return run_demo(json_output=args.json, deadline_s=args.deadline)


def verify(argv: List[str]) -> int:
    from fastdeploy_pd_fix.explorer import main as explorer_main

    return explorer_main(argv)


def make_patch(argv: List[str]) -> int:
    from fastdeploy_pd_fix.make_patch import main as make_patch_main

    return make_patch_main(argv)


def diagnose(args) -> int:
    from fastdeploy_pd_fix.diagnostics import diagnose as diagnose_logs

    code, report = diagnose_logs(args.log_dir)
    print(report)
    return code


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="fastdeploy-pd-fix", description="Rank-invariant layer-0 release for FastDeploy's PD cache messager."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("status", help="what is patched, in which mode, against which FastDeploy")
    demo_parser = commands.add_parser(
        "demo", help="run the race scenarios on the stand-in: no plugin/upstream/ordered"
    )
    demo_parser.add_argument("--json", action="store_true", help="print the results as one JSON object")
    demo_parser.add_argument("--deadline", type=float, default=3.0, help="seconds after start-up before a hang")
    diagnose_parser = commands.add_parser("diagnose", help="first divergence of the ranks' batch sequences in logs")
    diagnose_parser.add_argument("log_dir", help="directory holding cache_messager_rank*.log (searched recursively)")
    commands.add_parser("verify", help="exhaustive interleaving explorer (--help for its options)", add_help=False)
    commands.add_parser(
        "make-patch", help="apply the fix to a FastDeploy checkout (--help for its options)", add_help=False
    )

    # These two own their argument parsing: hand them the rest of the command line untouched.
    if argv[:1] == ["verify"]:
        return verify(argv[1:])
    if argv[:1] == ["make-patch"]:
        return make_patch(argv[1:])
    args = parser.parse_args(argv)
    if args.command == "status":
        return status(args)
    if args.command == "demo":
        return demo(args)
    if args.command == "diagnose":
        return diagnose(args)
    parser.print_help()
    return 2
