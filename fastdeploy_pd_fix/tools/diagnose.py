"""``fastdeploy-pd-fix diagnose``: the first batch at which the ranks' cache messager logs diverge.

Every queued batch is logged as a :data:`~fastdeploy_pd_fix.core.messager_step.QUEUED_LINE` with a rolling
``seq_hash`` that is equal on every rank until their sequences diverge, by the plugin (``fastdeploy_pd_fix:``) and by
a FastDeploy that carries the upstreamed fix (``layer0_release:``) alike, so one reader serves both.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from fastdeploy_pd_fix.core.messager_step import QUEUED_LINE

RANK_LOG = re.compile(r"cache_messager_rank(?P<rank>\d+)\.log$")


@dataclass
class Divergence:
    """The first batch at which two ranks' queued sequences differ."""

    number: int
    batches: Dict[int, Optional[str]]


def read_rank_sequences(log_dir) -> Dict[int, List[Tuple[str, str]]]:
    """Per rank: the queued batches ``(batch, seq_hash)`` in order, from ``cache_messager_rank{R}.log`` files."""
    sequences: Dict[int, List[Tuple[str, str]]] = {}
    for path in sorted(Path(log_dir).rglob("cache_messager_rank*.log")):
        match = RANK_LOG.search(path.name)
        if not match:
            continue
        entries = sequences.setdefault(int(match["rank"]), [])
        for line in path.read_text(errors="replace").splitlines():
            queued = QUEUED_LINE.search(line)
            if queued:
                entries.append((queued["batch"], queued["hash"]))
    return sequences


def first_divergence(sequences: Dict[int, List[Tuple[str, str]]]) -> Optional[Divergence]:
    """The first position where ranks queued different batches (a shorter rank is not a divergence)."""
    length = min((len(entries) for entries in sequences.values()), default=0)
    for index in range(length):
        if len({entries[index][1] for entries in sequences.values()}) > 1:
            return Divergence(index + 1, {rank: entries[index][0] for rank, entries in sequences.items()})
    return None


def diagnose(log_dir) -> Tuple[int, str]:
    """Exit code and report: 0 no divergence, 1 divergence, 2 no usable logs."""
    sequences = read_rank_sequences(log_dir)
    if not sequences or not any(sequences.values()):
        return 2, f"no 'queued batch' lines in cache_messager_rank*.log under {log_dir} (is the plugin installed?)"
    counts = ", ".join(f"rank {rank}: {len(entries)} batches" for rank, entries in sorted(sequences.items()))
    if len(sequences) < 2:
        return 2, f"only one rank's log found ({counts}); nothing to compare"
    divergence = first_divergence(sequences)
    if divergence is None:
        return 0, f"none: the ranks' batch sequences agree ({counts})"
    lines = [f"first divergence at batch #{divergence.number} ({counts}):"]
    lines += [f"  rank {rank}: {batch}" for rank, batch in sorted(divergence.batches.items())]
    return 1, "\n".join(lines)
