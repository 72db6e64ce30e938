"""Parsing and validation of the kv signal buffer that ``get_output_kv_signal`` fills.

Layout (int32, ``KV_SIGNAL_LENGTH`` entries): ``[tasks_count, layer_id, (slot, chunk_token_offset,
current_chunk_length) x tasks_count, ...]``; ``tasks_count == -1`` means no signal. The buffer is read once per
signal as a numpy array: indexing a paddle tensor element by element costs ~100x more per signal.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import numpy as np

MAX_TASKS = 512
KV_SIGNAL_LENGTH = MAX_TASKS * 3 + 2
NO_SIGNAL = -1


@dataclass(frozen=True)
class KvSignal:
    """One valid kv signal: the layer that has just been computed and its tasks
    ``(slot, chunk_offset, prefilled_token_num)``, the chunk being ``[chunk_offset, prefilled_token_num)``."""

    layer: int
    tasks: Tuple[Tuple[int, int, int], ...]


@dataclass
class ParsedSignal:
    """The result of parsing one buffer: ``signal`` is None when there was none or it was rejected whole."""

    signal: KvSignal | None = None
    problems: List[str] = field(default_factory=list)


def parse_kv_signal(values: np.ndarray, num_slots: int = MAX_TASKS, num_layers: Optional[int] = None) -> ParsedSignal:
    """Validate one kv signal buffer; malformed tasks are dropped with a reason, valid ones kept in order.

    A signal whose layer is negative or, when ``num_layers`` is given, ``>= num_layers`` is dropped whole: its
    progress would be recorded for a layer the model does not have."""
    values = np.asarray(values).reshape(-1)
    if values.size < 2:
        return ParsedSignal(problems=[f"kv signal buffer has {values.size} entries, expected {KV_SIGNAL_LENGTH}"])
    tasks_count, layer = int(values[0]), int(values[1])
    if tasks_count == NO_SIGNAL:
        return ParsedSignal()
    capacity = min(MAX_TASKS, (values.size - 2) // 3)
    if not 0 <= tasks_count <= capacity:
        return ParsedSignal(problems=[f"tasks_count {tasks_count} out of range [0, {capacity}]; signal dropped"])
    if layer < 0:
        return ParsedSignal(problems=[f"layer {layer} is negative; signal of {tasks_count} tasks dropped"])
    if num_layers is not None and layer >= num_layers:
        return ParsedSignal(
            problems=[f"layer {layer} out of range [0, {num_layers - 1}]; signal of {tasks_count} tasks dropped"]
        )

    triples = values[2 : 2 + 3 * tasks_count].astype(np.int64).reshape(tasks_count, 3)
    slots, offsets, lengths = triples[:, 0], triples[:, 1], triples[:, 2]
    valid = (slots >= 0) & (slots < num_slots) & (offsets >= 0) & (lengths > 0)
    problems = [  # only the invalid tasks are visited, so a clean signal costs no Python loop
        f"layer {layer} task {index} dropped: slot {slot} (valid 0..{num_slots - 1}), "
        f"offset {offset} (>= 0), length {length} (> 0)"
        for index, (slot, offset, length) in zip(np.flatnonzero(~valid).tolist(), triples[~valid].tolist())
    ]
    prefilled = (offsets + lengths)[valid]
    tasks = tuple(zip(slots[valid].tolist(), offsets[valid].tolist(), prefilled.tolist()))
    return ParsedSignal(KvSignal(layer, tasks), problems)
