"""Run a scenario against the stand-in: one engine process (manager with the barriers), one process per rank.

Each rank runs ``python <standin>/fastdeploy/cache_manager/cache_messager.py --rank R --mp_num N ...`` exactly as
FastDeploy launches its cache messager, in its own session, with ``PYTHONPATH`` pointing at the stand-in. A run
ends "finished" when every rank exits 0 after finishing all requests, "hang" when that has not happened
``deadline_s`` after every rank reported ready (slow imports do not count), and "error" when a rank exits
non-zero or never gets ready, "not run" when an interrupt (SIGINT, SIGTERM, SIGHUP) stopped it or it never started.
Every process is killed at the end, whatever happened.

    python -m fastdeploy_pd_fix.standin.harness            # outcome table, every scenario x variant
    python -m fastdeploy_pd_fix.standin.harness s1 --release 8034 --with-7724 --op-args 4 -v
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, List, Optional

from fastdeploy_pd_fix import config
from fastdeploy_pd_fix.arguments import positive_seconds
from fastdeploy_pd_fix.standin import STANDIN_ROOT
from fastdeploy_pd_fix.standin.fastdeploy.pd_fix_standin import contract
from fastdeploy_pd_fix.standin.run_result import (
    NOT_RUN,
    ScenarioResult,
    not_started,
    print_table,
    read_progress,
    read_result,
    read_text,
)
from fastdeploy_pd_fix.standin.scenarios import RELEASES, SCENARIOS, resolve_scenario
from fastdeploy_pd_fix.target import SCRIPT_PATH

ENGINE_SERVER_SCRIPT = STANDIN_ROOT / "engine_server.py"
POLL_S = 0.01  # how often the harness looks at its processes and files (detection only, never ordering)


# Every live run's processes and temporary folder in this interpreter: what an interrupt must clean up.
_live_lock = threading.Lock()
_live_processes: set = set()
_live_folders: set = set()
_stopping = threading.Event()  # set by the main thread once it handles an interrupt: no run may start or go on
#: The signals that interrupt a command (Ctrl-C, ``kill``, a closed terminal).
INTERRUPT_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# While cleanup_on_signals is installed: the pipe the interpreter writes each signal's number to (its wakeup fd, in
# arrival order, from the C-level handler), and the numbers read from it so far.
_signal_pipe: List[int] = []
_received: List[int] = []


class Interrupted(BaseException):
    """Raised in the main thread once it has stopped the runs after a signal; :func:`cleanup_on_signals` ends the
    command. A BaseException, so that no ``except Exception`` on the way takes it for a failed run."""


def _track(process: subprocess.Popen) -> subprocess.Popen:
    with _live_lock:
        _live_processes.add(process)
    if _stopping.is_set():  # started while the command is being stopped: do not leave it behind
        _kill_group(process)
    return process


def _signals_received() -> List[int]:
    """The interrupt signals received since :func:`cleanup_on_signals` was installed, in arrival order."""
    while _signal_pipe:
        try:
            numbers = os.read(_signal_pipe[0], 64)
        except BlockingIOError:
            break
        _received.extend(number for number in numbers if number in INTERRUPT_SIGNALS)
    return _received


def stop_live_runs() -> None:
    """Kill every live run's process group; each run's own thread reaps its processes and ends "not run"."""
    _stopping.set()
    with _live_lock:
        processes = list(_live_processes)
    for process in processes:
        if process.returncode is None:  # not reaped yet, so its pid is still its own group's
            _signal_group(process)


def _ignore_here(signum, frame) -> None:
    """The Python-level handler of :data:`INTERRUPT_SIGNALS`: the interpreter has already written the signal to the
    wakeup pipe, which the main thread reads at its next check. Doing nothing here, a signal arriving while the main
    thread stops the runs cannot re-enter that cleanup (a second Ctrl-C used to deadlock in ``Popen.wait``)."""


@contextmanager
def cleanup_on_signals(command: str = "fastdeploy-pd-fix"):
    """While running: SIGINT, SIGTERM and SIGHUP stop the command, once, whatever else arrives meanwhile. The main
    thread notices the first at its next check (:func:`run_many` checks every :data:`POLL_S`, and raises
    :class:`Interrupted` once its runs are stopped); on the way out, every live run's process group is killed and its
    temporary folder removed, one ``interrupted`` line goes to stderr, and the command ends with 128 + the first
    signal's number. Nested uses, and uses outside the main thread (which cannot install handlers), do nothing."""
    if _signal_pipe or threading.current_thread() is not threading.main_thread():
        yield
        return
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    os.set_blocking(write_end, False)
    _signal_pipe[:] = [read_end, write_end]
    _received.clear()
    _stopping.clear()
    previous = {number: signal.signal(number, _ignore_here) for number in INTERRUPT_SIGNALS}
    previous_wakeup = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    try:
        yield
    except Interrupted:
        pass  # ended below, as is a signal that arrived after the last check
    finally:
        received = list(_signals_received())
        for number, handler in previous.items():
            # Interrupted, the command ends with the first signal's code: what comes now is ignored.
            signal.signal(number, signal.SIG_IGN if received else handler)
        signal.set_wakeup_fd(previous_wakeup)
        for descriptor in _signal_pipe:
            os.close(descriptor)
        _signal_pipe.clear()
        if received:
            _end_interrupted(command, received)


def _end_interrupted(command: str, received: List[int]) -> None:
    """Remove what is left of the runs (their processes were stopped and reaped by :func:`run_many`), say so in one
    line and end the command with 128 + the first signal's number."""
    first, *later = received
    with _live_lock:
        folders = list(_live_folders)
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)
    ignored = f" ({', '.join(signal.Signals(number).name for number in later)} ignored)" if later else ""
    print(
        f"{command}: interrupted by {signal.Signals(first).name}{ignored}: every run stopped, its processes killed "
        f"and its temporary files removed (exit {128 + first})",
        file=sys.stderr,
        flush=True,
    )
    raise SystemExit(128 + first)


def _signal_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)  # the process leads its own session (start_new_session)
    except ProcessLookupError:
        pass


def _kill_group(process: Optional[subprocess.Popen]) -> None:
    if process is None:
        return
    if process.poll() is None:
        _signal_group(process)
    process.wait()


def plugin_variables(environ=os.environ) -> Dict[str, str]:
    """The ``FD_PD_FIX*`` variables set in ``environ`` (every plugin variable's name starts with the switch's)."""
    return {name: value for name, value in environ.items() if name.startswith(config.ENV_SWITCH)}


def ignored_variables_line(ignored: Dict[str, str]) -> str:
    """The report line naming the caller's ``FD_PD_FIX*`` values a command did not use."""
    names = ", ".join(f"{name}={value}" for name, value in sorted(ignored.items()))
    return f"environment: ignored {names} (each run sets its own)"


def _rank_environment(
    env: Optional[dict],
    variant_env: dict,
    log_dir: Path,
    out_dir: Path,
    scenario_path: Path,
    standin_root: Path = STANDIN_ROOT,
    inherit_plugin_variables: bool = True,
):
    """os.environ (without its ``FD_PD_FIX*`` variables unless ``inherit_plugin_variables``), then the caller's
    ``env`` (not interpreted here), then what the harness itself owns."""
    run_env = dict(os.environ)
    if not inherit_plugin_variables:
        for name in plugin_variables(run_env):
            del run_env[name]
    run_env.setdefault("OMP_NUM_THREADS", "1")  # paddle's thread pools are of no use to the stand-in
    run_env.update(env or {})
    python_path = run_env.get("PYTHONPATH", "")
    run_env["PYTHONPATH"] = os.pathsep.join(part for part in (str(standin_root), python_path) if part)
    run_env.update(variant_env)
    run_env["FD_LOG_DIR"] = str(log_dir)
    run_env[contract.ENV_OUT] = str(out_dir)
    run_env[contract.ENV_SCENARIO] = str(scenario_path)
    return run_env


def _start_engine(python: str, nranks: int, run_env: dict, log_dir: Path, record_path: Path, timeout_s: float):
    """Start the engine process and return it with the port it listens on."""
    engine_log = open(log_dir / "engine_server.log", "wb")
    try:
        engine = subprocess.Popen(
            [python, str(ENGINE_SERVER_SCRIPT), "--nranks", str(nranks), "--record", str(record_path)],
            stdout=subprocess.PIPE,
            stderr=engine_log,
            env=run_env,
            start_new_session=True,
        )
        _track(engine)
    finally:
        engine_log.close()
    ready, _, _ = select.select([engine.stdout], [], [], timeout_s)
    line = engine.stdout.readline().decode(errors="replace").strip() if ready else ""
    if not line.startswith("port "):
        _kill_group(engine)
        raise RuntimeError(f"engine server did not start: {line!r}; {read_text(log_dir / 'engine_server.log')}")
    return engine, int(line.split()[1])


def _wait_until_ready(ranks: Dict[int, subprocess.Popen], out_dir: Path, timeout_s: float) -> str:
    """Wait for a "ready" line from every rank; return an error text, or "" when all are ready."""
    deadline = time.monotonic() + timeout_s
    waiting = set(ranks)
    while waiting:
        for rank in sorted(waiting):
            if any(event.get("event") == "ready" for event in read_progress(out_dir, rank)):
                waiting.discard(rank)
            elif ranks[rank].poll() is not None:
                return f"rank {rank} exited with {ranks[rank].returncode} before it was ready"
        if waiting and time.monotonic() > deadline:
            return f"ranks {sorted(waiting)} not ready after {timeout_s}s"
        if waiting:
            time.sleep(POLL_S)
    return ""


def _wait_for_ranks(ranks: Dict[int, subprocess.Popen], deadline_s: float, watch_survivors: bool = False):
    """Outcome once every rank exited, one failed, or the deadline passed; plus an error text.
    ``watch_survivors``: after a failure, keep waiting until the other ranks exited too or the deadline passed."""
    deadline = time.monotonic() + deadline_s
    while True:
        returncodes = {rank: process.poll() for rank, process in ranks.items()}
        failed = {rank: code for rank, code in returncodes.items() if code not in (None, 0)}
        running = [rank for rank, code in returncodes.items() if code is None]
        if failed and (not watch_survivors or not running or time.monotonic() > deadline):
            still = f"; ranks {running} still running after {deadline_s}s" if running else ""
            return "error", f"ranks exited non-zero: {failed}{still}"
        if all(code == 0 for code in returncodes.values()):
            return "finished", ""
        if time.monotonic() > deadline:
            return "hang", ""
        time.sleep(POLL_S)


def standin_arguments(rank: int, nranks: int, port: int, num_layers: int) -> List[str]:
    """The stand-in's command line after the script path, as FastDeploy's engine launches a cache messager."""
    return [
        *("--splitwise_role", "prefill", "--rank", str(rank), "--device_id", str(rank)),
        *("--mp_num", str(nranks), "--num_layers", str(num_layers)),
        *("--pod_ip", "127.0.0.1", "--engine_worker_queue_port", str(port), "--protocol", "ipc"),
    ]


def run_scenario(
    scenario,
    *,
    release: str = "7872",
    with_7724: bool = False,
    op_args: int = 3,
    mode: Optional[str] = None,
    env: Optional[dict] = None,
    nranks: int = 2,
    deadline_s: float = 3.0,
    workdir=None,
    python: str = sys.executable,
    startup_timeout_s: float = 120.0,
    standin_root=None,
    watch_survivors: bool = False,
    rank_arguments=None,
    patch_non_racing: bool = True,
) -> ScenarioResult:
    """Run ``scenario`` (a name from :data:`SCENARIOS` or a scenario dict) on ``nranks`` rank processes of the
    stand-in release variant. ``mode`` (one of :data:`config.RUN_MODES`, e.g. :data:`config.OFF`) sets every
    plugin switch in each rank's environment: no ``FD_PD_FIX*`` variable of this process reaches the ranks (default:
    the switches as inherited); ``env`` is added to it as is (e.g. ``{"FD_PD_FIX_WATCHDOG_S": "1"}``).
    ``workdir``: directory to keep the run's files in (a fresh subdirectory per run); a temporary one otherwise.
    ``standin_root``: the directory holding the ``fastdeploy`` package the ranks run (put first on ``PYTHONPATH``,
    its ``fastdeploy/cache_manager/cache_messager.py`` launched), e.g. a patched checkout; default the built-in
    stand-in. The engine process always runs the built-in one. ``watch_survivors``: when a rank exits non-zero, keep
    the others running until they exit or ``deadline_s`` passes (the outcome is "error" either way), to see what the
    survivors of a dead rank do. ``rank_arguments``: ``(rank, nranks, port, num_layers) -> list`` of the command-line
    arguments after the script path (default :func:`standin_arguments`), for a ``cache_messager.py`` whose
    ``parse_args`` differs from the stand-in's (``fastdeploy-pd-fix preflight``). ``patch_non_racing``: the runs force
    races that a release whose engine waits for the registration report (the stand-in's variants without #7724) cannot
    have; the plugin, which stands aside on such a release, is told to patch it anyway
    (``FD_PD_FIX_PATCH_NON_RACING=1``, before ``env``); preflight passes False unless asked."""
    scenario = resolve_scenario(scenario)
    if release not in RELEASES:
        raise ValueError(f"release {release!r}: expected one of {', '.join(RELEASES)}")
    if op_args not in (3, 4):
        raise ValueError(f"op_args {op_args!r}: expected 3 or 4")
    if nranks < 1:
        raise ValueError("nranks must be >= 1")
    variant = {"release": release, "with_7724": bool(with_7724), "op_args": op_args, "nranks": nranks}
    variant_env = {
        contract.ENV_RELEASE: release,
        contract.ENV_WITH_7724: "1" if with_7724 else "0",
        contract.ENV_OP_ARGS: str(op_args),
    }
    if workdir is None:
        run_dir, keep = Path(tempfile.mkdtemp(prefix="fd-standin-")), False
        with _live_lock:
            _live_folders.add(run_dir)
    else:
        workdir = Path(workdir).resolve()  # the rank processes run in other directories
        workdir.mkdir(parents=True, exist_ok=True)
        run_dir = Path(tempfile.mkdtemp(prefix=f"{scenario['name']}-{release}-", dir=workdir))
        keep = True
    log_dir, out_dir = run_dir / "log", run_dir / "out"
    log_dir.mkdir()
    out_dir.mkdir()
    scenario_path = run_dir / "scenario.json"
    scenario_path.write_text(json.dumps(scenario, indent=1), encoding="utf-8")
    engine_record = out_dir / "engine.jsonl"
    standin_root = STANDIN_ROOT if standin_root is None else Path(standin_root).resolve()
    cache_messager_script = standin_root / SCRIPT_PATH
    plugin_env = {} if mode is None else config.environment_for(mode)
    plugin_env[config.ENV_PATCH_NON_RACING] = "1" if patch_non_racing else "0"
    run_env = _rank_environment(
        {**plugin_env, **(env or {})},
        variant_env,
        log_dir,
        out_dir,
        scenario_path,
        standin_root,
        inherit_plugin_variables=mode is None,
    )

    engine = None
    ranks: Dict[int, subprocess.Popen] = {}
    outcome, error, startup_s, elapsed_s = "error", "", 0.0, 0.0
    started = time.monotonic()
    try:
        engine, port = _start_engine(python, nranks, run_env, log_dir, engine_record, startup_timeout_s)
        num_layers = int(scenario.get("num_layers", 1))
        for rank in range(nranks):
            arguments = (rank_arguments or standin_arguments)(rank, nranks, port, num_layers)
            command = [python, str(cache_messager_script), *arguments]
            with open(log_dir / f"launch_cache_messager_{rank}.log", "wb") as launch_log:
                ranks[rank] = _track(
                    subprocess.Popen(
                        command,
                        stdout=launch_log,
                        stderr=subprocess.STDOUT,
                        env=run_env,
                        cwd=str(run_dir),
                        start_new_session=True,
                    )
                )
        error = _wait_until_ready(ranks, out_dir, startup_timeout_s)
        ready_at = time.monotonic()
        startup_s = ready_at - started
        if not error:
            outcome, error = _wait_for_ranks(ranks, deadline_s, watch_survivors)
            elapsed_s = time.monotonic() - ready_at
    except Exception as exception:  # report, never a false "finished"
        outcome, error = "error", f"harness: {exception!r}"
    finally:
        returncodes = {rank: process.poll() for rank, process in ranks.items()}
        for process in ranks.values():
            _kill_group(process)
        _kill_group(engine)
        with _live_lock:
            _live_processes.difference_update([*ranks.values(), engine])
        if engine is not None and engine.stdout is not None:
            engine.stdout.close()
    if outcome == "error" and _stopping.is_set():  # killed by the interrupt, or could not start because of it
        outcome, error = NOT_RUN, f"stopped by an interrupt: {error}"

    result = read_result(
        log_dir,
        out_dir,
        engine_record,
        nranks,
        outcome,
        error,
        elapsed_s=elapsed_s,
        returncodes=returncodes,
        scenario=scenario["name"],
        variant=variant,
        startup_s=startup_s,
        workdir=str(run_dir) if keep else None,
    )
    if not keep:
        shutil.rmtree(run_dir, ignore_errors=True)
        with _live_lock:
            _live_folders.discard(run_dir)
    return result


def run_many(
    list_of_kwargs: List[dict],
    parallel: int = 4,
    on_result: Optional[Callable[[int, ScenarioResult], None]] = None,
) -> List[ScenarioResult]:
    """Run several scenarios concurrently (each a dict of :func:`run_scenario` arguments); results in order.

    ``on_result(index, result)`` is called as each run ends (progress lines). An interrupt (:func:`cleanup_on_signals`)
    kills every run's processes: the runs under way end "not run", as do those not started yet (``on_result`` is
    called for each of them too), then :class:`Interrupted` is raised."""
    with cleanup_on_signals():
        pool = ThreadPoolExecutor(max_workers=max(1, parallel))
        try:
            futures = [pool.submit(run_scenario, **kwargs) for kwargs in list_of_kwargs]
            if on_result is not None:
                for index, future in enumerate(futures):
                    future.add_done_callback(lambda done, index=index: _report(done, index, on_result))
            while wait(futures, timeout=POLL_S).not_done and not _signals_received():
                pass
            if _signals_received():
                stop_live_runs()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # after stop_live_runs the runs under way end at once
        if _signals_received():
            for index, future in enumerate(futures):
                if future.cancelled() and on_result is not None:
                    on_result(index, not_started(resolve_scenario(list_of_kwargs[index]["scenario"])["name"]))
            raise Interrupted()
        return [future.result() for future in futures]


def _report(done, index: int, on_result) -> None:
    if not done.cancelled() and done.exception() is None:
        on_result(index, done.result())


def all_variants():
    """Every (release, with_7724, op_args) the stand-in imitates."""
    return [
        {"release": release, "with_7724": with_7724, "op_args": op_args}
        for release in RELEASES
        for with_7724 in (False, True)
        for op_args in (3, 4)
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastdeploy_pd_fix.standin.harness", description=__doc__)
    parser.add_argument("scenarios", nargs="*", help=f"scenario names (default: all of {', '.join(SCENARIOS)})")
    parser.add_argument("--release", choices=RELEASES, help="one release variant (default: all)")
    parser.add_argument("--with-7724", action="store_true", help="with --release: the #7724 variant")
    parser.add_argument("--op-args", type=int, choices=(3, 4), default=3, help="with --release: op signature")
    parser.add_argument("--nranks", type=int, default=2)
    parser.add_argument(
        "--deadline", type=positive_seconds, default=3.0, help="seconds after ready before calling a hang"
    )
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--mode", choices=config.RUN_MODES, help="plugin mode of the ranks (default: as inherited)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra rank environment")
    parser.add_argument("--workdir", help="keep every run's files under this directory")
    parser.add_argument("-v", "--verbose", action="store_true", help="print each rank's logs")
    args = parser.parse_args(argv)
    env = dict(item.split("=", 1) for item in args.env)
    if args.release:
        variants = [{"release": args.release, "with_7724": args.with_7724, "op_args": args.op_args}]
    else:
        variants = all_variants()
    common = dict(mode=args.mode, env=env, nranks=args.nranks, deadline_s=args.deadline, workdir=args.workdir)
    runs = [
        dict(scenario=name, **common, **variant)
        for name in (args.scenarios or list(SCENARIOS))
        for variant in variants
    ]
    started = time.monotonic()
    results = run_many(runs, parallel=args.parallel)
    print_table(results, args.mode)
    print(f"{len(results)} runs in {time.monotonic() - started:.1f}s")
    for result in results:
        if args.verbose or result.outcome == "error":
            print(f"\n===== {result.summary()}")
            for rank, text in result.logs.items():
                print(f"--- rank {rank} ---\n{text}")
    return 1 if any(result.outcome == "error" for result in results) else 0


if __name__ == "__main__":
    sys.exit(main())
