"""``fastdeploy-pd-fix diagnose``: the first batch at which the ranks' cache messager logs diverge.

Every queued batch is logged as a :data:`~fastdeploy_pd_fix.adapters.messager_step.QUEUED_LINE` with a rolling
``seq_hash`` that is equal on every rank until their sequences diverge, by the plugin (``fastdeploy_pd_fix:``) and by
a FastDeploy that carries the upstreamed fix (``layer0_release:``) alike, so one reader serves both.

Which files: every file under the folder, searched recursively, that holds a cache messager's lines
(:data:`MESSAGER_MARKERS`), whatever it is called: releases have named it ``cache_messager_rank{R}.log``,
``cache_messager_{R}.log``, ``cache_messager_device{N}.log``, ``cache_messager_tprank{R}.log``, and the next may name
it otherwise. Only the head of each file is read to tell (:data:`SNIFF_BYTES`; a binary file is skipped there), and
only a messager log is read whole, line by line. Its rank is what its lines say (:func:`read_rank_log`), else the
number its name ends with. Besides: the launch logs (:data:`LAUNCH_LOG`, the messagers' stderr, where the plugin's
first decision line goes). Which ranks are compared: those of one data-parallel group in one folder. A
messager's ``rank_id`` is ``rank + dp * tp``; only the ranks of one DP group take part in the same barriers, so
only they must queue the same batches. The tensor-parallel size ``tp`` is read from the logs (the plugin's decision
line ``active on rank_id=R rank=r nranks=N``, FastDeploy's own ``Namespace(... mp_num=N ...)`` or
``[rank r/N]`` lines) or given with ``--tp``; without either, all ranks of a folder are one group (right for DP 1).
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from fastdeploy_pd_fix.adapters.messager_step import QUEUED_LINE
from fastdeploy_pd_fix.arguments import positive_int

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

#: How much of a file's head is read to tell whether it is a messager log: a messager writes its first lines (the
#: plugin's decision line, FastDeploy's ``create cache messager...`` and arguments) as it starts.
SNIFF_BYTES = 256 * 1024
#: The number a messager log's name ends with (before its suffix): a device id after ``device``, else a rank id.
#: Only used when the log's lines do not say it.
NAME_NUMBER = re.compile(r"(?P<device>device)?(?P<number>\d+)$")
#: The messager's launch log (its stdout/stderr): ``launch_cache_messager_{i}.log`` or ``..._tprank{i}.log``.
LAUNCH_LOG = re.compile(r"^launch_cache_messager_(?P<kind>tprank)?(?P<number>\d+)\.log$")
#: The import-time default log of the messager module, shared by every process that logs before ``main`` names its
#: own: its lines do not tell the ranks apart.
SHARED_LOG = "cache_messager.log"

#: The journal prefix of a FastDeploy that carries the fix (no plugin, so no decision lines).
UPSTREAMED_PREFIX = "layer0_release: "
#: The plugin's decision line (``fastdeploy_pd_fix.plugin.patching.PatchRecord.describe``).
DECISION = re.compile(
    r"fastdeploy_pd_fix \S+: (?P<decision>patched|stood aside|already patched) \S+ \(mode=(?P<mode>[^,)]+)[^)]*\)"
    r"(?:: (?P<reason>[^;]*))?"
)
#: Its activation suffix in the messager's own log: ``active on rank_id=R``, from later versions also with
#: ``rank=r nranks=N`` (in any order, after it on the same line).
ACTIVE = re.compile(r"active on rank_id=(?P<rank_id>\d+|\?)(?P<rest>.*)$")
STOOD_ASIDE_FOR_MESSAGER = re.compile(r"stood aside for this messager, original methods run: (?P<reason>.*)$")
#: FastDeploy's own lines: ``logger.info(f"{args}")`` in ``main`` and ``[rank {rank}/{args.mp_num}] ...``.
NAMESPACE = re.compile(r"Namespace\((?P<arguments>.*)\)")
RANK_OF = re.compile(r"\[rank (?P<rank>\d+)/(?P<tp>\d+)\]")
#: FastDeploy's messager lines that name its rank_id: the consume loop's last-layer line and the send thread's start.
TASKS_COUNT = re.compile(r"tasks_count: -?\d+, layer_id: -?\d+ self\.rank_id (?P<rank_id>\d+)")
PREFILLED_STEP = re.compile(r"splitwise_complete_prefilled_step_(?P<rank_id>\d+), gpu_id: (?P<device>\d+)")
#: The first line of this project's stand-in messager (``fastdeploy_pd_fix/standin``).
STANDIN = re.compile(r"stand-in cache messager: rank=(?P<rank>\d+) rank_id=(?P<rank_id>\d+)")
#: Lines only a cache messager writes: a file with one of them in its head is a messager log, whatever its name.
#: The plugin's journal and its lines in the messager's own log, FastDeploy's own (``logger.info`` calls of
#: ``cache_messager.py`` in every release read, 2.0 to 2.6: ``create cache messager...`` is the first line of its
#: ``__main__``) and the stand-in's. FastDeploy's ``Namespace(...)`` and ``[rank r/N]`` lines are not among them:
#: other FastDeploy processes log such lines too.
MESSAGER_MARKERS = (
    QUEUED_LINE,
    re.compile(r"active on rank_id=|stood aside for this messager, original methods run"),
    re.compile(r"create cache messager\.\.\.|cache messager init finished, use "),
    TASKS_COUNT,
    PREFILLED_STEP,
    STANDIN,
)


def _field(text: str, name: str) -> Optional[int]:
    match = re.search(rf"(?<![\w.]){name}=(?P<value>\d+)\b", text)
    return int(match["value"]) if match else None


class LogError(Exception):
    """A log that cannot be read (exit code 2)."""


@dataclass
class RankLog:
    """What one messager log says: who wrote it and the batches it queued (of its last run)."""

    path: Path
    rank_id: Optional[int] = None
    device: Optional[int] = None
    rank: Optional[int] = None  # the tensor-parallel rank
    tp: Optional[int] = None
    dp: Optional[int] = None
    plugin: str = ""  # "active (mode=ordered)", "stood aside: ...", "" (no plugin line)
    entries: List[Tuple[str, str]] = field(default_factory=list)
    runs: int = 0  # journals that start at batch #1 (a restarted messager appends to its log)
    upstreamed: bool = False  # its journal is the upstreamed fix's (``layer0_release:``), not the plugin's

    @property
    def label(self) -> str:
        if self.rank_id is not None:
            return f"rank {self.rank_id}"
        if self.device is not None:
            return f"device {self.device}"
        return self.path.name

    @property
    def sort_key(self):
        return (self.rank_id if self.rank_id is not None else sys.maxsize, self.device or 0, str(self.path))


@dataclass
class LaunchLog:
    """The plugin's decision as a messager's launch log shows it."""

    path: Path
    index: int
    tprank: bool
    decision: str = ""  # "patched", "stood aside", "already patched", "" (no decision line)
    reason: str = ""

    @property
    def label(self) -> str:
        return f"{'tp rank' if self.tprank else 'launch'} {self.index} ({self.path.name})"


@dataclass
class Divergence:
    """The first batch at which two ranks' queued sequences differ."""

    number: int
    batches: Dict[int, Optional[str]]


def _unreadable(path: Path, error: OSError) -> LogError:
    return LogError(f"cannot read {path}: {error.strerror or error}")


def _lines(path: Path) -> Iterator[str]:
    """The file's lines, one at a time (a messager log of weeks is not held in memory)."""
    try:
        with path.open(encoding="utf-8", errors="replace") as file:
            yield from file
    except OSError as error:
        raise _unreadable(path, error) from None


def is_messager_log(path: Path) -> bool:
    """Whether the head of ``path`` (:data:`SNIFF_BYTES`) has a cache messager's line (:data:`MESSAGER_MARKERS`);
    a file with a NUL byte there is binary: not read further."""
    try:
        with path.open("rb") as file:
            head = file.read(SNIFF_BYTES)
    except OSError as error:
        raise _unreadable(path, error) from None
    if b"\0" in head:
        return False
    text = head.decode("utf-8", errors="replace")
    return any(marker.search(text) for marker in MESSAGER_MARKERS)


def read_rank_log(path: Path) -> RankLog:
    """One messager log parsed: its batches; who wrote it, from its lines, else its name (:data:`NAME_NUMBER`)."""
    log = RankLog(path)
    for line in _lines(path):
        queued = QUEUED_LINE.search(line)
        if queued:
            if queued["number"] == "1":
                log.entries, log.runs = [], log.runs + 1
            log.upstreamed = line[: queued.start()].endswith(UPSTREAMED_PREFIX)
            log.entries.append((queued["batch"], queued["hash"]))
            continue
        active = ACTIVE.search(line)
        if active:
            decision = DECISION.search(line)
            log.plugin = f"active (mode={decision['mode']})" if decision else "active"
            if active["rank_id"] != "?":
                _learn(log, rank_id=int(active["rank_id"]))
            _learn(log, rank=_field(active["rest"], "rank"), tp=_field(active["rest"], "nranks"))
            continue
        aside = STOOD_ASIDE_FOR_MESSAGER.search(line)
        if aside and "fastdeploy_pd_fix" in line:
            log.plugin = f"stood aside: {aside['reason']}"
            continue
        decision = DECISION.search(line)
        if decision and decision["decision"] == "stood aside" and not log.plugin.startswith("active"):
            log.plugin = f"stood aside: {decision['reason'] or 'no reason logged'}"
            continue
        namespace = NAMESPACE.search(line)
        if namespace:
            arguments = namespace["arguments"]
            _learn(
                log,
                rank=_field(arguments, "rank"),
                tp=_field(arguments, "mp_num"),
                dp=_field(arguments, "local_data_parallel_id"),
                device=_field(arguments, "device_id"),
            )
            continue
        rank_of = RANK_OF.search(line)
        if rank_of:
            _learn(log, rank=int(rank_of["rank"]), tp=int(rank_of["tp"]))
            continue
        identity = TASKS_COUNT.search(line) or PREFILLED_STEP.search(line) or STANDIN.search(line)
        if identity:
            _learn(log, **{name: int(value) for name, value in identity.groupdict().items()})
    if log.rank_id is None and None not in (log.rank, log.tp, log.dp):
        log.rank_id = log.rank + log.dp * log.tp
    named = NAME_NUMBER.search(path.stem)
    if named:
        _learn(log, **{"device" if named["device"] else "rank_id": int(named["number"])})
    if log.dp is None and None not in (log.rank_id, log.rank, log.tp) and log.tp > 0:
        log.dp = (log.rank_id - log.rank) // log.tp
    return log


def _learn(log: RankLog, **facts) -> None:
    """Keep the first value found for each fact (the plugin's line comes first among the sources it is read from)."""
    for name, value in facts.items():
        if value is not None and getattr(log, name) is None:
            setattr(log, name, value)


def read_launch_log(path: Path, index: int, tprank: bool) -> LaunchLog:
    log = LaunchLog(path, index, tprank)
    for line in _lines(path):
        decision = DECISION.search(line)
        if decision:
            log.decision, log.reason = decision["decision"], (decision["reason"] or "").strip()
    return log


@dataclass
class Logs:
    """Every log found under a folder."""

    ranks: List[RankLog] = field(default_factory=list)
    launches: List[LaunchLog] = field(default_factory=list)
    shared_with_batches: List[Path] = field(default_factory=list)


def find_logs(log_dir: Path) -> Logs:
    """Every messager log (by its lines) and launch log (by its name) under ``log_dir``, recursively, parsed;
    LogError for an unreadable file (it may be a messager log)."""
    logs = Logs()
    for path in sorted(log_dir.rglob("*")):
        if not path.is_file():
            continue
        launch = LAUNCH_LOG.match(path.name)
        if launch:
            logs.launches.append(read_launch_log(path, int(launch["number"]), bool(launch["kind"])))
        elif path.name == SHARED_LOG:
            if any(QUEUED_LINE.search(line) for line in _lines(path)):
                logs.shared_with_batches.append(path)
        elif is_messager_log(path):
            logs.ranks.append(read_rank_log(path))
    return logs


def read_rank_sequences(log_dir) -> Dict[int, List[Tuple[str, str]]]:
    """Per rank_id (device id where the log does not tell the rank): the queued batches ``(batch, seq_hash)``."""
    return {
        log.rank_id if log.rank_id is not None else log.device: log.entries for log in find_logs(Path(log_dir)).ranks
    }


def first_divergence(sequences: Dict[int, List[Tuple[str, str]]]) -> Optional[Divergence]:
    """The first position where ranks queued different batches (a shorter rank is not a divergence)."""
    length = min((len(entries) for entries in sequences.values()), default=0)
    for index in range(length):
        if len({entries[index][1] for entries in sequences.values()}) > 1:
            return Divergence(index + 1, {rank: entries[index][0] for rank, entries in sequences.items()})
    return None


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
