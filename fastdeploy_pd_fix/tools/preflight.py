"""``fastdeploy-pd-fix preflight [--source FILE_OR_CHECKOUT] [--json]``: prove the fix on *your* FastDeploy release.

It takes the release's ``fastdeploy/cache_manager/cache_messager.py`` (default: the one of the FastDeploy installed
in this environment, found without importing FastDeploy), copies it unmodified into a temporary tree beside our
stubs for everything it imports (:mod:`fastdeploy_pd_fix.tools.preflight_tree`,
:mod:`fastdeploy_pd_fix.tools.preflight_stubs`), and runs it as a script in two real rank processes on the CPU,
with the stand-in's engine process serving real cross-rank barriers, once with the plugin off (``FD_PD_FIX=0``) and
once on (``ordered``, with the engine notices the plugin's engine side puts), for every race scenario and every
slot-lifecycle scenario of the stand-in. Batches are observed on the messager's queue, never in the file. Each run
sets every ``FD_PD_FIX*`` variable of its ranks itself: the caller's are ignored, and named in the report.

Exit codes: :data:`EXIT_PASS` (0) every scenario finished with identical batches on every rank with the plugin;
:data:`EXIT_FAIL` (1) one did not; :data:`EXIT_USAGE` (2) the command could not check, refused in one line on stderr
before any work (no such file, not a FastDeploy ``cache_messager.py``, FastDeploy not installed, a kept folder in
use, no race scenario selected); :data:`EXIT_STANDS_ASIDE` (3) the plugin stands aside on this release (no
``CacheMessagerV1``, a shape it does not recognise, a release that cannot race, or a release that already carries
the fix): it would leave FastDeploy as it is.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

from fastdeploy_pd_fix import config
from fastdeploy_pd_fix.analysis import ALREADY_FIXED, CANNOT_RACE, analyse_source
from fastdeploy_pd_fix.arguments import OneLineParser, output_folder, positive_int, positive_seconds
from fastdeploy_pd_fix.standin.harness import cleanup_on_signals, ignored_variables_line, plugin_variables
from fastdeploy_pd_fix.standin.lifecycle import LIFECYCLE_SCENARIOS
from fastdeploy_pd_fix.standin.scenarios import SCENARIOS
from fastdeploy_pd_fix.target import SCRIPT_PATH, TARGET_CLASS, UPSTREAMED_PATH
from fastdeploy_pd_fix.tools import engine_slice, preflight_tree
from fastdeploy_pd_fix.tools.preflight_runs import cell, play, run_good

EXIT_PASS, EXIT_FAIL, EXIT_USAGE, EXIT_STANDS_ASIDE = 0, 1, 2, 3
OFF, ON = config.OFF, config.ORDERED
MODES = (OFF, ON)
RACE_SCENARIOS = tuple(name for name in SCENARIOS if name not in LIFECYCLE_SCENARIOS)
DEFAULT_SCENARIOS = RACE_SCENARIOS + tuple(LIFECYCLE_SCENARIOS)
#: Race scenarios in which every rank sees the events in one order (s0): a selection of only these proves nothing.
NO_RACE = tuple(name for name in RACE_SCENARIOS if len({tuple(ranks) for ranks in SCENARIOS[name]["schedules"]}) == 1)
#: Classes a FastDeploy ``cache_messager.py`` defines: ``CacheMessager`` (every release, 2.0 on) and the plugin's
#: target (the releases it patches).
MESSAGER_CLASSES = ("CacheMessager", TARGET_CLASS)
DEFAULT_DEADLINE_S = 4.0


class PreflightError(Exception):
    """No file to check: the message says why."""


def installed_cache_messager() -> Path:
    """The ``cache_messager.py`` of the FastDeploy installed here, located without importing FastDeploy (the spec
    of the top-level package is found without running its ``__init__``)."""
    try:
        spec = importlib.util.find_spec("fastdeploy")
    except (ImportError, ValueError) as error:
        raise PreflightError(f"cannot locate FastDeploy: {error!r}")
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations:
        raise PreflightError("FastDeploy is not installed in this environment: pass --source FILE_OR_CHECKOUT")
    for location in locations:
        candidate = Path(location) / "cache_manager" / "cache_messager.py"
        if candidate.is_file():
            return candidate
    raise PreflightError(f"FastDeploy at {locations[0]} has no cache_manager/cache_messager.py")


def locate_source(source: Optional[str]) -> Path:
    """The file to check: ``source`` (a file, a checkout, or a ``fastdeploy`` package directory) or the installed."""
    if source is None:
        return installed_cache_messager()
    path = Path(source).expanduser()
    if path.is_file():
        return path.resolve()
    if path.is_dir():
        for candidate in (
            path / SCRIPT_PATH,
            path / "cache_manager" / "cache_messager.py",
            path / "cache_messager.py",
        ):
            if candidate.is_file():
                return candidate.resolve()
        raise PreflightError(f"{path}: no {SCRIPT_PATH} in this directory")
    raise PreflightError(f"{path}: no such file or directory")


def package_dir_of(messager: Path) -> Optional[Path]:
    """The ``fastdeploy`` package directory a ``cache_messager.py`` sits in (where the engine slice finds the
    release's engine files), or None for a file outside such a tree."""
    return messager.parents[1] if messager.parts[-3:] == Path(SCRIPT_PATH).parts else None


def defines_class(text: str, names) -> bool:
    """The file defines a class named one of ``names`` somewhere (SyntaxError or ValueError: it is not Python)."""
    return any(isinstance(node, ast.ClassDef) and node.name in names for node in ast.walk(ast.parse(text)))


def defines_target_class(text: str) -> bool:
    """The file defines a ``CacheMessagerV1`` somewhere: the plugin's target, patched or not at run time."""
    return defines_class(text, (TARGET_CLASS,))


def check_messager_file(path: Path) -> None:
    """Refuse (:class:`PreflightError`) what cannot be a FastDeploy ``cache_messager.py``: unreadable, not Python,
    or without a messager class. A release without ``CacheMessagerV1`` is one: the plugin stands aside there."""
    why = f"no class {' or '.join(MESSAGER_CLASSES)}"
    try:
        if defines_class(path.read_text(encoding="utf-8"), MESSAGER_CLASSES):
            return
    except OSError as error:
        raise PreflightError(f"{path}: cannot read it ({error.strerror})") from None
    except (SyntaxError, ValueError) as error:  # ValueError: not UTF-8, or null bytes (before Python 3.12)
        why = f"not Python: {error}"
    raise PreflightError(f"{path}: not a FastDeploy cache_messager.py ({why})")


def fastdeploy_version(source: Path) -> str:
    """The installed FastDeploy's version when ``source`` is its file, without importing it; else unknown."""
    from importlib import metadata

    for distribution in ("fastdeploy-gpu", "fastdeploy"):
        try:
            files = metadata.files(distribution) or []
            if any(Path(file.locate()).resolve() == source for file in files if str(file).endswith(SCRIPT_PATH)):
                return metadata.version(distribution)
        except (metadata.PackageNotFoundError, OSError):
            continue
    return "unknown (preflight stubs)"


def _kind(name: str) -> str:
    return "lifecycle" if name in LIFECYCLE_SCENARIOS else "race"


def preflight(
    source: Optional[str] = None,
    scenarios=DEFAULT_SCENARIOS,
    deadline_s: float = DEFAULT_DEADLINE_S,
    parallel: Optional[int] = None,
    keep: Optional[str] = None,
    progress=print,
    observe: bool = False,
    patch_non_racing: bool = False,
) -> dict:
    """The whole check as one JSON-ready report; ``report["exit_code"]`` is the command's exit code. ``observe``: the
    release's own runs use ``FD_PD_FIX_MODE=observe`` instead of ``FD_PD_FIX=0`` (its own release, journalled: their
    kept logs are for ``diagnose``). ``patch_non_racing``: on a release that cannot race, where the plugin stands
    aside, force the races anyway with the plugin told to patch (``FD_PD_FIX_PATCH_NON_RACING=1``)."""
    started = time.monotonic()
    report: dict = {
        "source": source,
        "scenarios": {},
        "exit_code": EXIT_USAGE,
        "environment_ignored": plugin_variables(),  # each run sets its own: see run_scenario's ``mode``
        "baseline": config.OBSERVE if observe else OFF,  # the mode of the release's own runs
    }
    try:
        path = locate_source(source)
        text = path.read_text(encoding="utf-8")
        ast.parse(text, filename=str(path))
    except (PreflightError, OSError, UnicodeDecodeError, SyntaxError) as error:
        report["verdict"] = f"NO CHECK: {error}"
        return report
    analysis = analyse_source(text)
    report.update(
        source=str(path),
        sha256=preflight_tree.sha256(path),
        lines=text.count("\n"),
        analysis={
            "recognised": analysis.recognised,
            "reason": analysis.reason,
            "features": analysis.features(),
            "already_fixed": analysis.already_fixed,
        },
    )
    if not defines_target_class(text):
        return _stands_aside(report, analysis.reason, "", started)
    if analysis.cannot_race and not patch_non_racing:
        return _stands_aside(report, CANNOT_RACE, " (--patch-non-racing forces the races anyway)", started)

    engine_dir = package_dir_of(path)
    if analysis.already_fixed and (engine_dir is None or not (engine_dir.parent / UPSTREAMED_PATH).is_dir()):
        report["verdict"] = (
            f"NO CHECK: {path} carries the fix ({UPSTREAMED_PATH}), which is not beside it: pass the checkout "
            f"(--source TREE) so that the release's own package runs (exit {EXIT_USAGE})"
        )
        return report
    work = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="fd-pd-fix-preflight-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        tree = preflight_tree.build_tree(path, work / "tree", fastdeploy_version(path), engine_dir)
        report.update(
            stubbed_modules=tree.stubbed_modules,
            missing_third_party=tree.missing_third_party,
            command=f"{SCRIPT_PATH} {preflight_tree.describe_command(tree.options)}",
            options=len(tree.options),
            required_options=[option.flag for option in tree.options if option.required],
        )
        modes = (report["baseline"], ON)
        progress(f"running {len(scenarios)} scenarios x plugin {'/'.join(modes)} on 2 rank processes each ...")
        workers = parallel or max(2, min(8, 2 * (os.cpu_count() or 1)))
        records = play(
            tree, list(scenarios), deadline_s, workers, work / "runs", progress, modes, bool(keep), patch_non_racing
        )
        if engine_dir is not None:
            progress(f"running the engine slice on {engine_dir} (plugin on/off) ...")
        report["engine"] = engine_slice.check_engine(engine_dir, work / "engine")
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    report["scenarios"] = {name: {"kind": _kind(name), **records[name]} for name in scenarios}
    if keep:
        report["kept"] = str(work)
    _conclude(report, records)
    report["elapsed_s"] = round(time.monotonic() - started, 1)
    return report


def _stands_aside(report: dict, why: str, hint: str, started: float) -> dict:
    """Conclude ``report`` before any run: the plugin stands aside on this release, for ``why``."""
    report["decision"] = f"stands aside: {why}"
    report["verdict"] = (
        f"PLUGIN STANDS ASIDE: {why}. FastDeploy would run as released; nothing to roll out for this release{hint} "
        f"(exit {EXIT_STANDS_ASIDE})"
    )
    report["exit_code"] = EXIT_STANDS_ASIDE
    report["elapsed_s"] = round(time.monotonic() - started, 1)
    return report


def _conclude(report: dict, records: Dict[str, dict]) -> None:
    baseline = report["baseline"]
    if report["analysis"]["already_fixed"]:
        _conclude_already_fixed(report, records)
        return
    on_runs = [record[ON] for record in records.values()]
    decision_lines = [line for record in on_runs for lines in record["decisions"].values() for line in lines]
    stood_aside = [line for line in decision_lines if "stood aside" in line]
    patched = [line for line in decision_lines if ": patched " in line]
    report["decision"] = (stood_aside or patched or ["no decision line in the rank logs"])[0]
    failing = [name for name, record in records.items() if not run_good(record[ON])]
    off_bad = [name for name, record in records.items() if not run_good(record[baseline])]
    without = f"without the plugin {len(off_bad)} of {len(records)} fail ({', '.join(off_bad) or 'none'})"
    engine_failed = bool(report["engine"].get("problems"))
    if stood_aside or not all(record["patched"] for record in on_runs):
        why = stood_aside[0].split("stood aside", 1)[-1].strip(" :") if stood_aside else "no rank logged a patch"
        report["verdict"] = (
            f"PLUGIN STANDS ASIDE at run time on this release: {why}. FastDeploy would run as released "
            f"(exit {EXIT_STANDS_ASIDE})"
        )
        report["exit_code"] = EXIT_STANDS_ASIDE
    elif failing or engine_failed:
        what = [f"{len(failing)} of {len(records)} scenarios did not finish with identical batches"] if failing else []
        what += ["the engine slice failed (see engine:)"] if engine_failed else []
        report["verdict"] = (
            f"FAIL: with the plugin {' and '.join(what)} ({', '.join(failing) or 'engine'}); do not roll out, "
            f"report it with --json output (exit {EXIT_FAIL})"
        )
        report["exit_code"] = EXIT_FAIL
    else:
        report["verdict"] = (
            f"PASS: with the plugin all {len(records)} scenarios finished with identical batches on every rank"
            f"{' and the engine slice passed' if report['engine']['checked'] else ''}; {without} (exit {EXIT_PASS})"
        )
        report["exit_code"] = EXIT_PASS


def _conclude_already_fixed(report: dict, records: Dict[str, dict]) -> None:
    """A release that carries the fix (``make-patch``): the plugin stands aside and the release's own runs count."""
    baseline = report["baseline"]
    report["decision"] = f"stands aside: {ALREADY_FIXED}"
    failing = [name for name, record in records.items() if not run_good(record[baseline])]
    failing += ["the engine slice"] if report["engine"].get("problems") else []
    if failing:
        failed = ", ".join(failing)
        report["verdict"] = f"FAIL: this release carries the fix, and its own code failed {failed} (exit {EXIT_FAIL})"
        report["exit_code"] = EXIT_FAIL
    else:
        engine = " and the engine slice passed" if report["engine"]["checked"] else ""
        report["verdict"] = (
            f"PASS: this release carries the fix; its own release finished all {len(records)} scenarios with "
            f"identical batches on every rank{engine}; the plugin stands aside (exit {EXIT_PASS})"
        )
        report["exit_code"] = EXIT_PASS


def print_report(report: dict) -> None:
    """The human-readable report (the progress lines were printed while the scenarios ran)."""
    source = f"source:   {report.get('source') or 'the installed FastDeploy'}"
    if "sha256" in report:
        source += f" ({report['lines']} lines, sha256 {report['sha256'][:12]})"
    print(source)
    if report["environment_ignored"]:
        print(ignored_variables_line(report["environment_ignored"]))
    if "analysis" in report:
        analysis = report["analysis"]
        if analysis["recognised"]:
            found = f"recognised: {analysis['features']}"
        else:
            found = f"NOT recognised: {analysis['reason']}"
        if not analysis["recognised"] and report["scenarios"]:
            found += " (read off the file; the plugin decides on the class it runs: see 'plugin:' below)"
        print(f"analysis: {TARGET_CLASS} {found}")
    if "command" in report:
        stubs = ", ".join(report["stubbed_modules"])
        if report["missing_third_party"]:
            stubs += f"; not installed here, stubbed: {', '.join(report['missing_third_party'])}"
        print(f"stubs:    {stubs}")
        print(f"command:  {report['command']}")
        required = ", ".join(report["required_options"]) or "none"
        print(f"          (from its parse_args: {report['options']} options, required: {required})")
    if report["scenarios"]:
        baseline = report["baseline"]
        cells = {name: (cell(record[baseline]), cell(record[ON])) for name, record in report["scenarios"].items()}
        header = "plugin off (FD_PD_FIX=0)" if baseline == OFF else "release's own (FD_PD_FIX_MODE=observe)"
        width = max(len(text) for pair in cells.values() for text in pair + (header,)) + 2
        print()
        print(f"{'scenario':<9}{'kind':<10}{header:<{width}}plugin on (ordered)")
        print(f"{'-' * 8:<9}{'-' * 9:<10}{'-' * (width - 2):<{width}}{'-' * (width - 2)}")
        for name, (off_cell, on_cell) in cells.items():
            print(f"{name:<9}{report['scenarios'][name]['kind']:<10}{off_cell:<{width}}{on_cell}")
        for name, record in report["scenarios"].items():
            if not run_good(record[ON]):
                print(f"\n{name} with the plugin: {record[ON]['outcome']} {record[ON]['error']}")
                print(f"  batches per rank: {record[ON]['batches']}")
                for rank, lines in record[ON]["errors"].items():
                    print(f"  rank {rank} errors logged:\n    " + ("\n    ".join(lines) or "none"))
                for rank, lines in record[ON]["log_tail"].items():
                    print(f"  rank {rank} log tail:\n    " + "\n    ".join(lines))
    print()
    if "decision" in report:
        print(f"plugin:   {report['decision']}")
    if "engine" in report:
        print(f"engine:   {report['engine']['line']}")
    print(f"verdict:  {report['verdict']}")
    if "kept" in report:
        print(f"kept:     {report['kept']} (rank logs in runs/MODE/SCENARIO-*/log: fastdeploy-pd-fix diagnose FOLDER)")
    if "elapsed_s" in report:
        print(f"({report['elapsed_s']}s)")


def main(argv: Optional[List[str]] = None) -> int:
    parser = OneLineParser(
        prog="fastdeploy-pd-fix preflight",
        description="Prove the fix on your FastDeploy release: run its cache_messager.py, unmodified, in two rank "
        f"processes on the CPU with the plugin off and on. Exit {EXIT_PASS} pass, {EXIT_FAIL} fail, {EXIT_USAGE} "
        f"could not check (one line on stderr), {EXIT_STANDS_ASIDE} the plugin stands aside on this release.",
    )
    parser.add_argument(
        "--source", help="cache_messager.py, a FastDeploy checkout or package dir (default: installed)"
    )
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object (progress: stderr)")
    parser.add_argument("--scenarios", help=f"comma-separated subset of {','.join(DEFAULT_SCENARIOS)}")
    parser.add_argument(
        "--deadline", type=positive_seconds, default=DEFAULT_DEADLINE_S, help="seconds after ready: a hang"
    )
    parser.add_argument("--parallel", type=positive_int, help="runs at a time (default: 2 x CPUs, 2 to 8)")
    parser.add_argument(
        "--observe",
        action="store_true",
        help="run the release's own side with FD_PD_FIX_MODE=observe (its release, journalled: with --keep, its logs "
        "are for diagnose) instead of FD_PD_FIX=0",
    )
    parser.add_argument(
        "--patch-non-racing",
        action="store_true",
        help="on a release that cannot race (pre-#7724: its engine waits for the registration report), where the "
        "plugin stands aside, force the races anyway with the plugin patching (FD_PD_FIX_PATCH_NON_RACING=1)",
    )
    parser.add_argument(
        "--keep",
        metavar="DIR",
        type=output_folder,
        help="keep the tree and every run's files under DIR (new or empty)",
    )
    args = parser.parse_args(argv)
    # Every refusal here, before any work starts: one line on stderr, exit EXIT_USAGE (parser.error).
    scenarios = DEFAULT_SCENARIOS
    if args.scenarios is not None:
        scenarios = tuple(dict.fromkeys(name.strip() for name in args.scenarios.split(",") if name.strip()))
        unknown = [name for name in scenarios if name not in SCENARIOS]
        if not scenarios:
            parser.error(f"--scenarios {args.scenarios!r} names no scenario; known: {', '.join(SCENARIOS)}")
        if unknown:
            parser.error(f"--scenarios: unknown {', '.join(unknown)}; known: {', '.join(SCENARIOS)}")
        if set(scenarios) <= set(NO_RACE):
            parser.error(
                f"--scenarios {args.scenarios}: no race scenario selected (in {', '.join(NO_RACE)} every rank sees "
                f"the events in one order: a pass proves nothing); add one of "
                f"{', '.join(name for name in DEFAULT_SCENARIOS if name not in NO_RACE)}"
            )
    keep = Path(args.keep).expanduser() if args.keep else None
    if keep and keep.is_dir() and any(keep.iterdir()):
        parser.error(f"--keep {args.keep}: in use (not empty: a previous run's?); name a new or empty folder")
    try:
        check_messager_file(locate_source(args.source))
    except PreflightError as error:
        parser.error(str(error))
    if importlib.util.find_spec("paddle") is None:
        print("preflight runs the release's file with real paddle tensors: install paddlepaddle", file=sys.stderr)
        return EXIT_USAGE
    stream = sys.stderr if args.json else sys.stdout
    with cleanup_on_signals("fastdeploy-pd-fix preflight"):
        report = preflight(
            args.source,
            scenarios,
            args.deadline,
            args.parallel,
            args.keep,
            progress=lambda line: print(line, file=stream, flush=True),
            observe=args.observe,
            patch_non_racing=args.patch_non_racing,
        )
        if args.json:
            print(json.dumps(report, indent=1))
        else:
            print_report(report)
    return report["exit_code"]


if __name__ == "__main__":
    sys.exit(main())
