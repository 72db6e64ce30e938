"""``fastdeploy-pd-fix diagnose``: the first batch at which the ranks' cache messager logs diverge.

Every queued batch is logged as a :data:`~fastdeploy_pd_fix.adapters.messager_log.QUEUED_LINE` with a rolling
``seq_hash`` that is equal on every rank until their sequences diverge, by the plugin (``fastdeploy_pd_fix:``) and by
a FastDeploy that carries the upstreamed fix (``layer0_release:``) alike, so one reader serves both.

At the first divergence it also names the first of the release's decisions (a request abandoned, a repeated part
not counted, ...: :mod:`fastdeploy_pd_fix.policy.decision`, parsed back from their log lines) that the ranks took
differently before it: those too are a function of the two streams, the same on every rank.

Which files are read and what each says (its rank, the plugin's decision, its batches and the release's decisions):
:mod:`.diagnose_logs`.
Which ranks are compared: those of one data-parallel group in one folder. A messager's ``rank_id`` is ``rank + dp *
tp``; only the ranks of one DP group take part in the same barriers, so only they must queue the same batches. The
tensor-parallel size ``tp`` is read from the logs (the plugin's decision line ``active on rank_id=R rank=r
nranks=N``, FastDeploy's own ``Namespace(... mp_num=N ...)`` or ``[rank r/N]`` lines) or given with ``--tp``; without
either, all ranks of a folder are one group (right for DP 1).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from fastdeploy_pd_fix.arguments import positive_int
from fastdeploy_pd_fix.tools.diagnose_logs import LogError, Logs, RankLog, find_logs

#: Exit codes (also in the command help).
NO_DIVERGENCE, DIVERGENCE, NOT_DIAGNOSED = 0, 1, 2
EXIT_CODES = f"""\
exit codes:
  {NO_DIVERGENCE}  no divergence: in every DP group, the ranks' batch sequences agree (a rank that is only behind
     does not count: a dead or lost rank's log just stops)
  {DIVERGENCE}  divergence: in at least one DP group two ranks queued different batches (the report names the first)
  {NOT_DIAGNOSED}  nothing diagnosed: the folder is missing, a file is unreadable, no cache messager log (a file with a
     cache messager's lines) or none with 'queued batch' lines, no DP group has two ranks to compare, a bad
     argument, or diagnose itself failed
"""


@dataclass
class Divergence:
    """The first batch at which two ranks' queued sequences differ."""

    number: int
    batches: Dict[int, Optional[str]]


def first_divergence(sequences: Dict[int, List[Tuple[str, str]]]) -> Optional[Divergence]:
    """The first position where ranks queued different batches (a shorter rank is not a divergence)."""
    length = min((len(entries) for entries in sequences.values()), default=0)
    for index in range(length):
        if len({entries[index][1] for entries in sequences.values()}) > 1:
            return Divergence(index + 1, {rank: entries[index][0] for rank, entries in sequences.items()})
    return None


def decisions_apart(logs: Sequence[RankLog], number: int) -> List[str]:
    """Report lines for the first of the release's decisions logged before batch ``number`` where the ranks differ
    (none when they agree): the ordered release decides from the two streams alone, so its decisions, like its
    batches, are the same on every rank, and the first that differs says where the streams' reading parted."""
    taken = [[decision for queued_before, decision in log.decisions if queued_before < number] for log in logs]
    for position in range(max(map(len, taken), default=0)):
        at = [decisions[position] if position < len(decisions) else None for decisions in taken]
        if len(set(at)) > 1:
            lines = [f"  the release's decisions before it differ first at decision #{position + 1}:"]
            lines += [
                f"    {log.label}: {decision.describe() if decision else 'none'}" for log, decision in zip(logs, at)
            ]
            return lines
    return []


@dataclass
class Group:
    """The ranks of one DP group in one folder: those whose batch sequences must agree."""

    folder: Path
    dp: Optional[int]
    logs: List[RankLog]


def resolve_tp(logs: Sequence[RankLog], tp: Optional[int]) -> Tuple[Dict[Path, Optional[int]], List[str]]:
    """Per folder, the tensor-parallel size used to group its ranks, and notes (conflicts, unknown size)."""
    notes: List[str] = []
    sizes: Dict[Path, Optional[int]] = {}
    for folder in sorted({log.path.parent for log in logs}):
        found = sorted({log.tp for log in logs if log.path.parent == folder and log.tp})
        if tp is not None:
            sizes[folder] = tp
            if found and found != [tp]:
                notes.append(f"--tp {tp} used for {folder}, although its logs say tp={'/'.join(map(str, found))}")
        elif len(found) == 1:
            sizes[folder] = found[0]
        else:
            sizes[folder] = None
            if len(found) > 1:
                notes.append(f"logs in {folder} disagree on the tp size ({', '.join(map(str, found))}): pass --tp N")
    return sizes, notes


#: The note for a folder whose tp size is unknown (shown with a divergence: it may be one across DP groups).
TP_UNKNOWN = (
    "tp size unknown (no 'nranks=' in the plugin's decision line, no FastDeploy 'mp_num=' line): all ranks of the "
    "folder compared as one DP group; with more than one DP group, pass --tp N"
)


def dp_group_of(log: RankLog, size: Optional[int], stated: bool = True) -> Optional[int]:
    """The DP group of ``log`` (None: unknown): the DP id the log states (when ``stated``), else ``rank_id // size``
    for tensor-parallel size ``size``."""
    if stated and log.dp is not None:
        return log.dp
    if size is not None and size > 0 and log.rank_id is not None:
        return log.rank_id // size
    return None


def group_ranks(logs: Sequence[RankLog], tp: Optional[int]) -> Tuple[List[Group], List[str]]:
    """The DP groups to compare (``dp = rank_id // tp`` unless a log states its DP id) and notes."""
    sizes, notes = resolve_tp(logs, tp)
    unknown = {folder for folder, size in sizes.items() if size is None}
    groups: Dict[Tuple[Path, Optional[int]], List[RankLog]] = {}
    for log in logs:
        size = sizes[log.path.parent]
        dp = None if size is None else dp_group_of(log, size, stated=tp is None)  # --tp N overrides stated DP ids
        groups.setdefault((log.path.parent, dp), []).append(log)
    if any(len(members) > 1 for (folder, _), members in groups.items() if folder in unknown):
        notes.append(TP_UNKNOWN)
    for log in logs:
        if log.rank_id is None and sizes[log.path.parent] is not None:
            notes.append(
                f"{log.path}: the log does not say its rank_id (no decision or FastDeploy args line): DP group unknown"
            )
    ordered = sorted(groups.items(), key=lambda item: (str(item[0][0]), -1 if item[0][1] is None else item[0][1]))
    return [
        Group(folder, dp, sorted(members, key=lambda log: log.sort_key)) for (folder, dp), members in ordered
    ], notes


def _without_batches_beside(group: Group, logs: Iterable[RankLog]) -> List[RankLog]:
    """The messager logs of ``group``'s folder without a queued batch that may belong to its DP group (their DP id
    is unknown or the group's)."""
    beside = []
    for log in logs:
        if log.entries or log.path.parent != group.folder:
            continue
        dp = dp_group_of(log, log.tp)
        if group.dp is None or dp is None or dp == group.dp:
            beside.append(log)
    return sorted(beside, key=lambda log: log.sort_key)


def _counts(logs: Iterable[RankLog]) -> str:
    return ", ".join(f"{log.label}: {len(log.entries)} batches" for log in logs)


def _plugin_problems(logs: Logs) -> List[str]:
    """Where the logs say the plugin is not active: per rank log and per launch log."""
    problems = []
    for log in sorted(logs.ranks, key=lambda log: log.sort_key):
        if log.plugin.startswith("stood aside"):
            problems.append(f"plugin not active on {log.label} ({log.path.name}): {log.plugin}")
        elif not log.plugin and not log.entries:
            problems.append(f"plugin not active on {log.label}: no fastdeploy_pd_fix line in {log.path.name}")
    if (
        logs.ranks
        and all(log.upstreamed for log in logs.ranks if log.entries)
        and any(log.entries for log in logs.ranks)
    ):
        return problems  # FastDeploy with the fix upstreamed: no plugin, its launch logs say nothing of it
    for launch in sorted(logs.launches, key=lambda launch: (launch.index, str(launch.path))):
        if launch.decision == "stood aside":
            problems.append(f"plugin stood aside on {launch.label}: {launch.reason}")
        elif not launch.decision:
            problems.append(
                f"plugin not loaded on {launch.label}: no fastdeploy_pd_fix decision line "
                "(not installed in that Python, or FD_PD_FIX off)"
            )
    return problems


def diagnose_logs(log_dir, tp: Optional[int] = None) -> Tuple[int, str]:
    """Exit code (:data:`EXIT_CODES`) and report for the logs under ``log_dir``; may raise LogError."""
    folder = Path(log_dir)
    if not folder.exists():
        return NOT_DIAGNOSED, f"{folder}: no such folder"
    if not folder.is_dir():
        return NOT_DIAGNOSED, f"{folder}: not a folder (give the folder that holds the cache messager logs)"
    logs = find_logs(folder)
    problems = _plugin_problems(logs)
    with_batches = [log for log in logs.ranks if log.entries]
    if not with_batches:
        if not logs.ranks:
            message = (
                f"no cache messager log under {folder} (searched recursively for files with a cache messager's "
                "lines, whatever their names: the plugin's 'queued batch' or 'active on rank_id=' lines, "
                "FastDeploy's 'create cache messager...')"
            )
            if logs.shared_with_batches:
                shared = ", ".join(str(path) for path in logs.shared_with_batches)
                message += f"; {shared} has 'queued batch' lines, but they do not tell the ranks apart"
        else:
            names = ", ".join(log.path.name for log in sorted(logs.ranks, key=lambda log: log.sort_key))
            message = f"no 'queued batch' lines in the {len(logs.ranks)} cache messager logs under {folder} ({names})"
        return NOT_DIAGNOSED, "\n".join([message] + [f"  {problem}" for problem in problems])

    groups, notes = group_ranks(with_batches, tp)
    several_folders = len({group.folder for group in groups}) > 1
    several = len(groups) > 1
    compared, diverged, sections = 0, 0, []
    for group in groups:
        where = [f"DP group {group.dp}" if group.dp is not None else "ranks"]
        if several_folders:
            where.append(f"in {group.folder}")
        heading = f"{' '.join(where)}: " if several else ""
        counts = _counts(group.logs)
        if len(group.logs) < 2:
            silent = _without_batches_beside(group, logs.ranks)
            if silent:
                names = ", ".join(f"{log.label} ({log.path.name})" for log in silent)
                sections.append(
                    f"{heading}only one rank queued batches ({counts}); no 'queued batch' line from {names}: "
                    "nothing to compare (a rank that queued nothing is behind or dropped its signals: a hang, "
                    "not a divergence)"
                )
            else:
                sections.append(f"{heading}only one rank's log found in {group.folder} ({counts}); nothing to compare")
            continue
        compared += 1
        divergence = first_divergence({index: log.entries for index, log in enumerate(group.logs)})
        if divergence is None:
            sections.append(f"{heading}none: the ranks' batch sequences agree ({counts})")
            continue
        diverged += 1
        lines = [f"{heading}first divergence at batch #{divergence.number} ({counts}):"]
        lines += [f"  {group.logs[index].label}: {batch}" for index, batch in sorted(divergence.batches.items())]
        lines += decisions_apart(group.logs, divergence.number)
        sections.append("\n".join(lines))
    if not diverged and TP_UNKNOWN in notes:
        notes.remove(TP_UNKNOWN)  # agreement across all ranks holds within every DP group too
    restarted = [log for log in with_batches if log.runs > 1]
    notes += [f"{log.path}: {log.runs} runs in one log, the last compared" for log in restarted]
    if not compared:
        code = NOT_DIAGNOSED
    else:
        code = DIVERGENCE if diverged else NO_DIVERGENCE
    if code == NO_DIVERGENCE and several:
        sections.insert(0, f"none: the ranks' batch sequences agree in every one of the {compared} DP groups compared")
    elif code == DIVERGENCE and several:
        sections.insert(0, f"divergence in {diverged} of the {compared} DP groups compared")
    report = sections + [f"note: {note}" for note in notes]
    report += [f"note: {problem}" for problem in problems]
    return code, "\n".join(report)


def diagnose(log_dir, tp: Optional[int] = None) -> Tuple[int, str]:
    """Exit code and report: 0 no divergence, 1 divergence, 2 not diagnosed (:data:`EXIT_CODES`). Never raises: an
    unreadable log or a failure of its own is exit code 2 with a message, never 1 (which means divergence found)."""
    if tp is not None and (isinstance(tp, bool) or not isinstance(tp, int) or tp < 1):
        return NOT_DIAGNOSED, f"--tp {tp!r}: expected a positive integer (the tensor-parallel size)"
    try:
        return diagnose_logs(log_dir, tp)
    except LogError as error:
        return NOT_DIAGNOSED, str(error)
    except Exception as error:  # a bug of ours must not read as "divergence found"
        return NOT_DIAGNOSED, f"diagnose failed: {error!r}"


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The command's arguments (``fastdeploy-pd-fix diagnose``), its description and exit codes."""
    parser.description = (
        "First divergence of the ranks' batch sequences ('queued batch #N [...] seq_hash=H' lines) in the cache "
        "messager logs, compared within each data-parallel group."
    )
    parser.epilog = EXIT_CODES
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "log_dir",
        help="folder holding the logs (FD_LOG_DIR), searched recursively: the cache messager logs, found by their "
        "lines whatever their names, and launch_cache_messager_[tprank]<i>.log",
    )
    parser.add_argument(
        "--tp",
        type=positive_int,
        metavar="N",
        help="tensor-parallel size: ranks rank_id // N form one DP group (default: read from the logs; unknown: "
        "all ranks of a folder are one group)",
    )
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """``fastdeploy-pd-fix diagnose [--tp N] LOG_DIR`` (or ``python -m fastdeploy_pd_fix.tools.diagnose``)."""
    parser = add_arguments(argparse.ArgumentParser(prog="fastdeploy-pd-fix diagnose"))
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exit:  # argparse: 0 for --help, 2 for a bad argument
        return int(exit.code or 0)
    code, report = diagnose(args.log_dir, tp=args.tp)
    try:
        print(report)
    except BrokenPipeError:  # `diagnose ... | head -1`
        pass
    return code


if __name__ == "__main__":
    sys.exit(main())
