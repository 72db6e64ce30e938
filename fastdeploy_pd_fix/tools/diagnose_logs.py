"""The cache messager logs ``fastdeploy-pd-fix diagnose`` reads (:mod:`.diagnose`): which files, and what each says.

Which files: every file under the folder, searched recursively, that holds a cache messager's lines
(:data:`MESSAGER_MARKERS`), whatever it is called: releases have named it ``cache_messager_rank{R}.log``,
``cache_messager_{R}.log``, ``cache_messager_device{N}.log``, ``cache_messager_tprank{R}.log``, and the next may name
it otherwise. Only the head of each file is read to tell (:data:`SNIFF_BYTES`; a binary file is skipped there), and
only a messager log is read whole, line by line. Its rank is what its lines say (:func:`read_rank_log`), else the
number its name ends with. Besides: the launch logs (:data:`LAUNCH_LOG`, the messagers' stderr, where the plugin's
first decision line goes).
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

from fastdeploy_pd_fix.adapters.messager_log import QUEUED_LINE
from fastdeploy_pd_fix.plugin import LOG_PREFIX
from fastdeploy_pd_fix.policy.decision import Decision, parse_decision

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
    #: The release's decisions (:class:`~fastdeploy_pd_fix.policy.decision.Decision`), each with the number of
    #: batches queued before it: every rank must take the same ones, like its batches.
    decisions: List[Tuple[int, Decision]] = field(default_factory=list)
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


def release_decision(line: str) -> Optional[Decision]:
    """The release decision a messager log line reports (after the plugin's or the upstreamed fix's prefix), or
    None."""
    for prefix in (LOG_PREFIX, UPSTREAMED_PREFIX):
        position = line.find(prefix)
        if position >= 0:
            return parse_decision(line[position + len(prefix) :].rstrip("\n"))
    return None


def read_rank_log(path: Path) -> RankLog:
    """One messager log parsed: its batches; who wrote it, from its lines, else its name (:data:`NAME_NUMBER`)."""
    log = RankLog(path)
    for line in _lines(path):
        queued = QUEUED_LINE.search(line)
        if queued:
            if queued["number"] == "1":  # a restart: what came after the previous run's last batch is this run's
                since = len(log.entries)
                log.decisions = [(0, decision) for queued_before, decision in log.decisions if queued_before == since]
                log.entries, log.runs = [], log.runs + 1
            log.upstreamed = line[: queued.start()].endswith(UPSTREAMED_PREFIX)
            log.entries.append((queued["batch"], queued["hash"]))
            continue
        decided = release_decision(line)
        if decided is not None:
            log.decisions.append((len(log.entries), decided))
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
