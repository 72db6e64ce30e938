"""A history's two streams in the stand-in's scenario form (the lists :mod:`fastdeploy_pd_fix.standin.scenarios`
describes), for the stand-in scenarios and the stress generator.

* ``signals``: per layer-0 kv signal, ``[slot, chunk_token_offset, current_chunk_len]`` per task;
* ``owners``: per signal, the request of each task (the ground truth the stand-in's send thread is checked against);
* ``registrations``: the cache-info stream cut into ``get_cache_info`` reads. A request's P-part and a D-part in one
  read make one registration entry (at the P-part's place); a part alone is an entry with ``"parts"``; the engine's
  notices are notice entries.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

from fastdeploy_pd_fix.engine_history.occupancy import (
    ABORT_NOTICE,
    DECODE_PART,
    ORPHAN_NOTICE,
    PREFILL_PART,
    Occupancy,
)
from fastdeploy_pd_fix.engine_history.streams import CacheEvent, LifecycleWorkload
from fastdeploy_pd_fix.policy.release import SignalTask
from fastdeploy_pd_fix.standin.fastdeploy.pd_fix_standin.contract import NOTICE_ENTRY

#: The stand-in's name of a lone part.
PART_NAMES = {PREFILL_PART: "prefill", DECODE_PART: "decode"}


def signal_entries(signals: Sequence[Sequence[SignalTask]]) -> List[List[List[int]]]:
    """The kv signals as the stand-in takes them: ``[slot, chunk_token_offset, current_chunk_len]`` per task."""
    return [[[slot, offset, end - offset] for slot, offset, end in tasks] for tasks in signals]


def registration_entry(occupancy: Occupancy, part: Optional[str] = None) -> dict:
    """Its cache info as one read entry: both parts, or only ``part``."""
    entry = {"request_id": occupancy.request_id, "slot": occupancy.slot, "need_prefill_tokens": occupancy.need}
    if part is not None:
        entry["parts"] = PART_NAMES[part]
    return entry


def abort_entry(occupancy: Occupancy) -> dict:
    """The engine's abort notice (and its fence): ``emitted_end`` None if it emitted nothing."""
    return {
        NOTICE_ENTRY: "abort",
        "request_id": occupancy.request_id,
        "slot": occupancy.slot,
        "emitted_end": occupancy.emitted_end,
    }


def orphan_entry(occupancy: Occupancy) -> dict:
    """The engine's orphan notice: the request is computed on its slot without a transfer."""
    return {
        NOTICE_ENTRY: "orphan",
        "request_id": occupancy.request_id,
        "slot": occupancy.slot,
        "need_prefill_tokens": occupancy.need,
    }


def read_entries(occupancies: Sequence[Occupancy], read: Sequence[CacheEvent]) -> List[dict]:
    """One read's events as entries: a P-part takes the first D-part of its request later in the read."""
    entries, merged = [], set()
    for position, (kind, index) in enumerate(read):
        occupancy = occupancies[index]
        if kind == ABORT_NOTICE:
            entries.append(abort_entry(occupancy))
        elif kind == ORPHAN_NOTICE:
            entries.append(orphan_entry(occupancy))
        elif kind == PREFILL_PART:
            later = [p for p in range(position + 1, len(read)) if read[p] == (DECODE_PART, index) and p not in merged]
            merged.update(later[:1])
            entries.append(registration_entry(occupancy, None if later else PREFILL_PART))
        elif position not in merged:
            entries.append(registration_entry(occupancy, DECODE_PART))
    return entries


def cache_reads(occupancies: Sequence[Occupancy], reads: Sequence[Sequence[CacheEvent]]) -> List[List[dict]]:
    """The cache-info stream, cut into ``reads``, as the stand-in's ``registrations``."""
    return [read_entries(occupancies, read) for read in reads]


def cut_reads(cache: Sequence[CacheEvent], read_sizes: Optional[Sequence[int]] = None) -> List[List[CacheEvent]]:
    """``cache`` cut into reads of ``read_sizes`` events; by default a P-part directly followed by its D-part is one
    read and every other event a read of its own."""
    if read_sizes is None:
        read_sizes, position = [], 0
        while position < len(cache):
            kind, index = cache[position]
            pair = kind == PREFILL_PART and cache[position + 1 : position + 2] == [(DECODE_PART, index)]
            read_sizes.append(2 if pair else 1)
            position += read_sizes[-1]
    assert sum(read_sizes) == len(cache), (read_sizes, cache)
    starts = [sum(read_sizes[:number]) for number in range(len(read_sizes))]
    return [list(cache[start : start + size]) for start, size in zip(starts, read_sizes)]


def standin_streams(
    workload: LifecycleWorkload, read_sizes: Optional[Sequence[int]] = None, owners: bool = True
) -> Dict[str, list]:
    """A stand-in scenario's ``signals``, ``registrations`` (reads cut by :func:`cut_reads`), ``owners`` (unless
    ``owners`` is False: a race scenario's send thread is not checked) and ``aborted`` (when any is)."""
    occupancies = workload.occupancies
    streams = {
        "signals": signal_entries(workload.signals),
        "registrations": cache_reads(occupancies, cut_reads(list(workload.cache), read_sizes)),
    }
    if owners:
        streams["owners"] = [
            [occupancies[workload.tid_owner[tid]].request_id for tid in tids] for tids in workload.signal_tids
        ]
    aborted = [occupancy.request_id for occupancy in occupancies if not occupancy.completes]
    if aborted:
        streams["aborted"] = aborted
    return streams
