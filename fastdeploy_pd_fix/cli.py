"""Command line: ``fastdeploy-pd-fix status|demo|preflight|diagnose|verify|make-patch`` (or ``-m fastdeploy_pd_fix``).

Argument parsing only: each subcommand calls one function of the module that owns it. The subcommands' parsers
share :mod:`fastdeploy_pd_fix.arguments`, so that a refusal reads the same in every one.
"""

from __future__ import annotations

import os
import sys
from typing import List, Optional

from fastdeploy_pd_fix import __version__
from fastdeploy_pd_fix.arguments import EXIT_USAGE, OneLineParser, positive_seconds


def status(args) -> int:
    """Print what the plugin does in this environment: bootstrap, switches, FastDeploy, target, manifest."""
    try:
        from fastdeploy_pd_fix.plugin.status import print_status
    except ImportError as error:  # a requirement missing or broken (numpy): say which, not a traceback
        needed = error.name or "a module"
        print(f"fastdeploy-pd-fix status: the plugin needs {needed}, which does not import: {error}", file=sys.stderr)
        return EXIT_USAGE
    return print_status()


def demo(args) -> int:
    from fastdeploy_pd_fix.tools.demo import run_demo

    return run_demo(json_output=args.json, deadline_s=args.deadline)


def verify(argv: List[str]) -> int:
    from fastdeploy_pd_fix.verify.command import main as verify_main

    return verify_main(argv)


def make_patch(argv: List[str]) -> int:
    from fastdeploy_pd_fix.upstream.command import main as make_patch_main

    return make_patch_main(argv)


def preflight(argv: List[str]) -> int:
    from fastdeploy_pd_fix.tools.preflight import main as preflight_main

    return preflight_main(argv)


def diagnose(argv: List[str]) -> int:
    from fastdeploy_pd_fix.tools.diagnose import main as diagnose_main

    return diagnose_main(argv)


def main(argv: Optional[List[str]] = None) -> int:
    """Run one subcommand; a reader that closes the pipe early (``status | head -1``) ends it quietly."""
    try:
        return run(sys.argv[1:] if argv is None else argv)
    except BrokenPipeError:
        # As the Python docs advise: point stdout at devnull so that the interpreter's final flush cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def run(argv: List[str]) -> int:
    parser = OneLineParser(
        prog="fastdeploy-pd-fix", description="Rank-invariant layer-0 release for FastDeploy's PD cache messager."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("status", help="what is patched, in which mode, against which FastDeploy")
    demo_parser = commands.add_parser("demo", help="run the race scenarios on the stand-in: off/upstream/ordered")
    demo_parser.add_argument("--json", action="store_true", help="print the results as one JSON object")
    demo_parser.add_argument(
        "--deadline", type=positive_seconds, default=3.0, help="seconds after start-up before a hang"
    )
    commands.add_parser(
        "diagnose",
        help="first divergence of the ranks' batch sequences in logs (--help for its options)",
        add_help=False,
    )
    commands.add_parser(
        "preflight", help="run your FastDeploy's cache_messager.py with the plugin off and on (--help)", add_help=False
    )
    commands.add_parser("verify", help="exhaustive interleaving explorer (--help for its options)", add_help=False)
    commands.add_parser(
        "make-patch", help="apply the fix to a FastDeploy checkout (--help for its options)", add_help=False
    )

    # These own their argument parsing: hand them the rest of the command line untouched.
    if argv[:1] == ["verify"]:
        return verify(argv[1:])
    if argv[:1] == ["make-patch"]:
        return make_patch(argv[1:])
    if argv[:1] == ["diagnose"]:
        return diagnose(argv[1:])
    if argv[:1] == ["preflight"]:
        return preflight(argv[1:])
    args = parser.parse_args(argv)
    if args.command == "status":
        return status(args)
    if args.command == "demo":
        return demo(args)
    parser.print_help()
    return EXIT_USAGE
