"""Start-up cost of the plugin in an interpreter that never runs the cache messager, where fastdeploy is importable.

``fastdeploy_pd_fix.pth`` runs in every interpreter of the environment. This benchmark puts a ``fastdeploy`` package
on the path (the stand-in's, by default: what a real deployment has) and times ``python -c pass`` with the plugin on
and switched off (``FD_PD_FIX=0``), interleaved, then lists what the plugin imports (``-X importtime``: the modules
loaded only with the plugin on). Budget: the median difference is at most 10 ms.

    python benchmarks/startup.py [--runs 40] [--python PYTHON] [--fastdeploy-root DIR]

The plugin must be installed into PYTHON's environment (``pip install .`` or ``-e .``). Nothing is written; the last
line is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

BUDGET_MS = 10.0
REPO = Path(__file__).resolve().parents[1]
STANDIN_ROOT = REPO / "fastdeploy_pd_fix" / "standin"
PROBE = (
    "import importlib.util, json; from fastdeploy_pd_fix import bootstrap; "
    "print(json.dumps({'fastdeploy': importlib.util.find_spec('fastdeploy') is not None, 'state': bootstrap.state}))"
)


def environment(fastdeploy_root: Path, plugin_on: bool) -> dict:
    env = {key: value for key, value in os.environ.items() if not key.startswith("FD_PD_FIX")}
    env["PYTHONPATH"] = str(fastdeploy_root)
    env.pop("PYTHONSTARTUP", None)
    if not plugin_on:
        env["FD_PD_FIX"] = "0"
    return env


def time_run(python: str, env: dict) -> float:
    start = time.perf_counter()
    subprocess.run([python, "-c", "pass"], env=env, check=True)
    return (time.perf_counter() - start) * 1000.0


def imported_modules(python: str, env: dict) -> dict:
    """``-X importtime``: module name -> self time in microseconds."""
    completed = subprocess.run(
        [python, "-X", "importtime", "-c", "pass"], env=env, capture_output=True, text=True, check=True
    )
    modules = {}
    for line in completed.stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, _, name = line[len("import time:") :].split("|")
        modules[name.strip()] = modules.get(name.strip(), 0) + int(self_us)
    return modules


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=40, help="runs per side (default 40)")
    parser.add_argument("--python", default=sys.executable, help="interpreter whose environment has the plugin")
    parser.add_argument(
        "--fastdeploy-root", type=Path, default=STANDIN_ROOT, help="directory holding a fastdeploy package"
    )
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")

    on_env, off_env = environment(args.fastdeploy_root, True), environment(args.fastdeploy_root, False)
    probe = subprocess.run([args.python, "-c", PROBE], env=on_env, capture_output=True, text=True)
    if probe.returncode != 0:
        print(f"the plugin is not importable by {args.python}: {probe.stderr.strip()}", file=sys.stderr)
        return 2
    state = json.loads(probe.stdout.strip().splitlines()[-1])
    print(f"python: {args.python}; fastdeploy importable: {state['fastdeploy']}; bootstrap state: {state['state']}")
    if not state["state"]["installed"]:
        print("fastdeploy_pd_fix.pth did not run: install the plugin into this environment first", file=sys.stderr)
        return 2

    for env in (on_env, off_env):  # warm the page cache and the bytecode caches
        time_run(args.python, env)
    on, off = [], []
    for index in range(args.runs):
        print(f"\rrun {index + 1}/{args.runs}", end="", file=sys.stderr, flush=True)
        on.append(time_run(args.python, on_env))
        off.append(time_run(args.python, off_env))
    print(file=sys.stderr)

    on_modules, off_modules = imported_modules(args.python, on_env), imported_modules(args.python, off_env)
    extra = {name: us for name, us in on_modules.items() if name not in off_modules}
    median_on, median_off = statistics.median(on), statistics.median(off)
    difference = median_on - median_off
    print(f"python -c pass, {args.runs} runs each, interleaved (ms):")
    print(f"  plugin on:  median {median_on:7.2f}  min {min(on):7.2f}")
    print(f"  plugin off: median {median_off:7.2f}  min {min(off):7.2f}  (FD_PD_FIX=0)")
    print(f"  difference of medians {difference:+.2f} ms, ratio {median_on / median_off:.3f}")
    print(f"modules imported only with the plugin on (-X importtime, self us): {sum(extra.values())} us in total")
    for name, us in sorted(extra.items(), key=lambda item: -item[1])[:10]:
        print(f"  {us:8d}  {name}")
    own_off = {name: us for name, us in off_modules.items() if name.startswith("fastdeploy_pd_fix")}
    print(
        f"with FD_PD_FIX=0 the start-up hook imports only {', '.join(sorted(own_off))}: "
        f"{sum(own_off.values())} us (-X importtime, self)"
    )
    met = difference <= BUDGET_MS
    print(f"budget {BUDGET_MS:g} ms: {'met' if met else 'NOT met'}")
    summary = {
        "runs": args.runs,
        "median_on_ms": round(median_on, 2),
        "median_off_ms": round(median_off, 2),
        "difference_ms": round(difference, 2),
        "ratio": round(median_on / median_off, 3),
        "plugin_only_imports_us": sum(extra.values()),
        "plugin_only_modules": sorted(extra),
        "switched_off_imports_us": sum(own_off.values()),
        "budget_ms": BUDGET_MS,
        "budget_met": met,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
