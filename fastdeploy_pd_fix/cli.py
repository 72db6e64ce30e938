"""Command line: ``fastdeploy-pd-fix status|demo|preflight|diagnose|verify|make-patch`` (or ``-m fastdeploy_pd_fix``).

Argument parsing only: each subcommand calls one function of the module that owns it. The subcommands' parsers
share :class:`OneLineParser` and the output path types here, so that a refusal reads the same in every one.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import List, Optional

from fastdeploy_pd_fix import __version__
from fastdeploy_pd_fix.tools import positive_seconds

#: The exit code of a command that refused its arguments or could not do its work here (argparse's own).
EXIT_USAGE = 2


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose refusal is one line on stderr, ``PROG: error: WHY``, exit :data:`EXIT_USAGE`: an
    operator's script reads one line per refusal (``--help`` still shows the usage)."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _refuse_unless_writable_in(folder: Path, text: str) -> None:
    """Create and drop a temporary file in ``folder``: unlike permission bits, this also holds for root, ACLs and
    read-only mounts."""
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as error:
        raise argparse.ArgumentTypeError(f"{text}: cannot write in {folder} ({error.strerror})") from None


def output_file(text: str) -> str:
    """An argparse type for a file written after the work: refused now if it could not be written then."""
    path = Path(text).expanduser()
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder, not a file")
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: no such directory {path.parent.absolute()}")
    _refuse_unless_writable_in(path.parent, text)
    if path.exists() and not os.access(path, os.W_OK):
        raise argparse.ArgumentTypeError(f"{text}: not writable")
    return text


def output_folder(text: str) -> str:
    """An argparse type for a folder created (with its parents) and written after the work: refused now if it
    could not be then."""
    path = Path(text).expanduser().absolute()
    existing = next(folder for folder in (path, *path.parents) if folder.exists())
    if not existing.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: {existing} is not a folder")
    _refuse_unless_writable_in(existing, text)
    return text


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
