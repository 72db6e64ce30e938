"""One PNG with every benchmark (matplotlib, Agg backend); optional: without matplotlib the plot is skipped."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

from benchmarks.barrier_rounds import MODES

COLORS = {"original": "tab:gray", "upstream": "tab:red", "ordered": "tab:blue", "ours": "tab:blue"}


def write_plot(results: Dict, hol_samples: Dict, path: Path) -> Optional[str]:
    """Write the figure to ``path``; return None on success, or why it was skipped."""
    try:
        import matplotlib
    except ImportError:
        return "matplotlib is not installed (pip install '.[bench]'); plot skipped"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 3, figsize=(17, 9.5))
    _parse_by_tasks(axes[0][0], results["parse"])
    _parse_by_layer(axes[0][1], results["parse"])
    _rounds(axes[0][2], results["barrier_rounds"])
    _send_time(axes[1][0], results["barrier_rounds"])
    _extra_wait_cdf(axes[1][1], results["head_of_line"], hol_samples)
    _extra_wait_by_delay(axes[1][2], results["head_of_line"])
    figure.suptitle(f"fastdeploy_pd_fix benchmarks ({results['summary']['preset']} run)")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return None


def _parse_by_tasks(axis, parse: Dict) -> None:
    tasks = [entry["tasks"] for entry in parse["by_tasks"]]
    axis.loglog(tasks, [e["upstream_us"] for e in parse["by_tasks"]], "o-", color=COLORS["upstream"], label="upstream")
    axis.loglog(tasks, [e["ours_us"] for e in parse["by_tasks"]], "o-", color=COLORS["ours"], label="ours")
    for entry in parse["by_tasks"]:
        position = (entry["tasks"], entry["ours_us"])
        label = f"{entry['speedup']:.0f}x"
        axis.annotate(label, position, textcoords="offset points", xytext=(0, -13), ha="center", fontsize=8)
    axis.set(title="Signal parsing per signal", xlabel="tasks per signal", ylabel="us (best of repeats)")
    axis.legend()


def _parse_by_layer(axis, parse: Dict) -> None:
    costs = parse["by_layer"]["costs"]
    axis.bar(range(len(costs)), [entry["ours_us"] for entry in costs], color=COLORS["ours"])
    axis.set_xticks(range(len(costs)), [str(entry["layer"]) for entry in costs])
    axis.set(
        title=f"Ours per signal by layer index ({parse['by_layer']['tasks']} tasks): "
        f"max/min {parse['by_layer']['max_vs_min']:.2f}x",
        xlabel="layer index",
        ylabel="us",
    )


def _rounds(axis, barrier: Dict) -> None:
    workloads = barrier["workloads"]
    width = 0.8 / len(MODES)
    for index, mode in enumerate(MODES):
        positions = [number + (index - 1) * width for number in range(len(workloads))]
        ratios = [workload["modes"][mode]["ratio"] for workload in workloads]
        bars = axis.bar(positions, ratios, width, color=COLORS[mode], label=mode)
        axis.bar_label(bars, labels=[str(workload["modes"][mode]["rounds"]) for workload in workloads], fontsize=8)
    labels = [f"K={w['spec']['requests_per_step']}, S={w['spec']['steps']}" for w in workloads]
    axis.set_xticks(range(len(workloads)), labels)
    top = max(workload["modes"][mode]["ratio"] for workload in workloads for mode in MODES)
    axis.set(title="Barrier rounds (labels: count)", ylabel="rounds / original", ylim=(0, top * 1.3))
    axis.legend(loc="upper center", ncol=len(MODES))


def _send_time(axis, barrier: Dict) -> None:
    ranks = list(barrier["timings"])
    width = 0.8 / len(MODES)
    for index, mode in enumerate(MODES):
        positions = [number + (index - 1) * width for number in range(len(ranks))]
        times = [barrier["timings"][nranks][mode]["send_ms"] for nranks in ranks]
        bars = axis.bar(positions, times, width, color=COLORS[mode], label=mode)
        ratios = [barrier["timings"][nranks][mode]["time_ratio"] for nranks in ranks]
        axis.bar_label(bars, labels=[f"{ratio:.2f}x" for ratio in ratios], fontsize=8)
    axis.set_xticks(range(len(ranks)), [f"{nranks} ranks" for nranks in ranks])
    axis.set(title="Send path: time in barrier waits (labels: / original)", ylabel="ms (best of repeats)")
    axis.legend()


def _extra_wait_cdf(axis, hol: Dict, samples: Dict) -> None:
    for key, label, color in (
        ("extra_ms", "extra wait (ordered - upstream)", COLORS["ordered"]),
        ("blocking_delay_ms", "blocking task's registration delay", COLORS["upstream"]),
    ):
        values = sorted(samples[key])
        axis.plot(values, [(rank + 1) / len(values) for rank in range(len(values))], color=color, label=label)
    headline = hol["runs"][0]
    axis.axhline(0.99, color="black", linewidth=0.5, linestyle=":")
    axis.set(
        title=f"Head-of-line cost per task (delay median {headline['spec']['delay_median_ms']:g} ms)",
        xlabel="ms (virtual time)",
        ylabel="fraction of tasks",
    )
    axis.legend(loc="lower right")


def _extra_wait_by_delay(axis, hol: Dict) -> None:
    runs = sorted(hol["runs"], key=lambda run: run["spec"]["delay_median_ms"])
    labels = [f"{run['spec']['delay_median_ms']:g}" for run in runs]
    series = (
        ("extra wait p50", lambda run: run["extra_wait_ms"]["p50"], "tab:cyan"),
        ("extra wait p99", lambda run: run["extra_wait_ms"]["p99"], COLORS["ordered"]),
        ("blocking delay p99", lambda run: run["blocking_delay_ms"]["p99"], COLORS["upstream"]),
        ("registration delay p99", lambda run: run["registration_delay_ms"]["p99"], COLORS["original"]),
    )
    width = 0.8 / len(series)
    for index, (label, value, color) in enumerate(series):
        positions = [number + (index - 1.5) * width for number in range(len(runs))]
        axis.bar(positions, [value(run) for run in runs], width, color=color, label=label)
    axis.set_xticks(range(len(runs)), labels)
    axis.set(title="Head-of-line cost by registration delay", xlabel="registration delay median (ms)", ylabel="ms")
    axis.legend(loc="upper left")
