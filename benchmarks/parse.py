"""Signal parsing: our consume path versus upstream-style per-element paddle indexing, side by side.

Both read the same real paddle CPU int32 tensor of ``KV_SIGNAL_LENGTH`` entries, filled as ``get_output_kv_signal``
fills it (``[tasks_count, layer, (slot, chunk offset, chunk length) x tasks_count]``, the rest left at -1), and
produce the same ``(layer, ((slot, prefilled_token_num), ...))``:

- ``ours``: what the patched ``consume_signals`` does, ``buffer.numpy()`` once, then ``parse_kv_signal``;
- ``upstream-style``: what the original loop does, one paddle index per entry, each converted with ``int()``
  (indexing a paddle tensor yields a 0-d tensor).

Timings are per signal, the best of ``repeats`` blocks, the two paths alternating block by block so that both see the
same machine load.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence

import numpy as np

from fastdeploy_pd_fix.policy.kv_signal import KV_SIGNAL_LENGTH, MAX_TASKS, parse_kv_signal


@dataclass(frozen=True)
class ParseConfig:
    task_counts: Sequence[int] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
    layers: Sequence[int] = (0, 1, 15, 30, 45, 60)  # layer indices for the flatness check (at layer_tasks tasks)
    layer_tasks: int = 64
    repeats: int = 15  # many short blocks: the best one is the least disturbed by other load on the machine
    block_seconds: float = 0.02  # target duration of one timed block
    seed: int = 0


def signal_buffer(num_tasks: int, layer: int, seed: int = 0):
    """A paddle CPU int32 buffer holding one kv signal of ``num_tasks`` distinct slots, like the op leaves it."""
    import paddle

    paddle.device.set_device("cpu")
    rng = random.Random(seed)
    values = np.full([KV_SIGNAL_LENGTH], -1, dtype=np.int32)
    values[0], values[1] = num_tasks, layer
    for index, slot in enumerate(rng.sample(range(MAX_TASKS), num_tasks)):
        offset = 2048 * rng.randint(0, 3)
        values[2 + 3 * index : 5 + 3 * index] = (slot, offset, rng.randint(1, 2048))
    buffer = paddle.full([KV_SIGNAL_LENGTH], -1, dtype="int32")
    buffer.set_value(values)
    return buffer


def parse_ours(buffer):
    """The patched consume path: one ``numpy()`` copy, then the vectorised parser."""
    signal = parse_kv_signal(buffer.numpy(), num_slots=MAX_TASKS).signal
    return signal.layer, signal.tasks


def parse_upstream_style(buffer):
    """Per-element paddle indexing with explicit ``int()`` conversion, as the original consume loop reads."""
    tasks_count = int(buffer[0])
    layer = int(buffer[1])
    tasks = []
    for index in range(tasks_count):
        slot = int(buffer[2 + 3 * index])
        offset = int(buffer[3 + 3 * index])
        length = int(buffer[4 + 3 * index])
        tasks.append((slot, offset, offset + length))  # the same triples as parse_kv_signal gives
    return layer, tuple(tasks)


def _calls_per_block(function: Callable, buffer, block_seconds: float) -> int:
    start = time.perf_counter()
    function(buffer)
    single = max(time.perf_counter() - start, 1e-7)
    return max(1, int(block_seconds / single))


def _time_block(function: Callable, buffer, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        function(buffer)
    return (time.perf_counter() - start) / calls


def time_side_by_side(functions: Dict[str, Callable], buffer, repeats: int, block_seconds: float) -> Dict[str, Dict]:
    """Per-call seconds of each function on ``buffer``: best and median of ``repeats`` alternating blocks."""
    calls = {name: _calls_per_block(function, buffer, block_seconds) for name, function in functions.items()}
    samples: Dict[str, List[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            samples[name].append(_time_block(function, buffer, calls[name]))
    return {
        name: {"best_s": min(values), "median_s": float(np.median(values)), "calls_per_block": calls[name]}
        for name, values in samples.items()
    }


def run(config: ParseConfig) -> Dict:
    """Time both paths for every task count, and our path for every layer index."""
    functions = {"ours": parse_ours, "upstream": parse_upstream_style}
    by_tasks = []
    for num_tasks in config.task_counts:
        buffer = signal_buffer(num_tasks, 0, config.seed + num_tasks)
        if parse_ours(buffer) != parse_upstream_style(buffer):
            raise AssertionError(f"the two parsers disagree on a signal of {num_tasks} tasks")
        timings = time_side_by_side(functions, buffer, config.repeats, config.block_seconds)
        by_tasks.append(
            {
                "tasks": num_tasks,
                "ours_us": timings["ours"]["best_s"] * 1e6,
                "upstream_us": timings["upstream"]["best_s"] * 1e6,
                "ours_median_us": timings["ours"]["median_s"] * 1e6,
                "upstream_median_us": timings["upstream"]["median_s"] * 1e6,
                "speedup": timings["upstream"]["best_s"] / timings["ours"]["best_s"],
            }
        )
    layer_buffers = {layer: signal_buffer(config.layer_tasks, layer, config.seed) for layer in config.layers}
    calls = {
        layer: _calls_per_block(parse_ours, buffer, config.block_seconds) for layer, buffer in layer_buffers.items()
    }
    layer_samples: Dict[int, List[float]] = {layer: [] for layer in config.layers}
    for _ in range(config.repeats):  # alternate the layers within each repeat, as above
        for layer, buffer in layer_buffers.items():
            layer_samples[layer].append(_time_block(parse_ours, buffer, calls[layer]))
    layer_costs = [{"layer": layer, "ours_us": min(samples) * 1e6} for layer, samples in layer_samples.items()]
    costs = [entry["ours_us"] for entry in layer_costs]
    first, last = layer_costs[0], layer_costs[-1]
    return {
        "config": {"task_counts": list(config.task_counts), "layers": list(config.layers), "repeats": config.repeats},
        "by_tasks": by_tasks,
        "by_layer": {
            "tasks": config.layer_tasks,
            "costs": layer_costs,
            "last_vs_first": last["ours_us"] / first["ours_us"],
            "max_vs_min": max(costs) / min(costs),
        },
    }


def speedup_at(results: Dict, num_tasks: int) -> float:
    """The measured speedup at ``num_tasks`` (the nearest measured count if that one was not measured)."""
    entry = min(results["by_tasks"], key=lambda item: abs(item["tasks"] - num_tasks))
    return entry["speedup"]


def table(results: Dict) -> str:
    lines = [
        "Signal parsing, per signal (best of repeats): ours = buffer.numpy() + parse_kv_signal",
        f"{'tasks':>6} {'ours us':>10} {'upstream-style us':>18} {'speedup':>9}",
    ]
    for entry in results["by_tasks"]:
        lines.append(
            f"{entry['tasks']:>6} {entry['ours_us']:>10.1f} {entry['upstream_us']:>18.1f} {entry['speedup']:>8.1f}x"
        )
    by_layer = results["by_layer"]
    costs = ", ".join(f"layer {entry['layer']}: {entry['ours_us']:.1f}" for entry in by_layer["costs"])
    lines.append(f"Ours per signal by layer index ({by_layer['tasks']} tasks, us): {costs}")
    lines.append(
        f"  layer {by_layer['costs'][-1]['layer']} / layer {by_layer['costs'][0]['layer']}: "
        f"{by_layer['last_vs_first']:.2f}x; max / min: {by_layer['max_vs_min']:.2f}x (flat = 1.0)"
    )
    return "\n".join(lines)
