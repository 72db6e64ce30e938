"""The engine slice: a release's own engine files, unmodified, run on the CPU around the messagers' mailbox.

The plugin's engine-side patch (:mod:`fastdeploy_pd_fix.plugin.engine.patch`) wraps ``ResourceManagerV1`` and
``SplitwiseConnector``. This module runs those classes as the release wrote them, with the release's prepare threads
(``_prepare_request_v1``), its ``EngineWorkerQueue`` (server, the engine's client, one client per messager rank) and
its ``Request`` and ``envs``, in a fresh interpreter where the plugin's start-up hook patches them through the same
import path as in a deployment (:mod:`fastdeploy_pd_fix.tools.preflight_stubs.slice_engine` is that process). Only
the rest stands in, our own code: the resource manager's base class and block pool, the config, the scheduler, the
decode instance, zmq (where it is not installed), and each messager rank's registration loop on the mailbox.

The release files are found in a FastDeploy package directory by what they define, not by a list of file names:
the plugin's two targets at the modules it patches (:mod:`fastdeploy_pd_fix.target`), the class with the prefill
prepare thread (``_fetch_request_prefill``), the class with the mailbox (``put_cache_info`` and ``get_cache_info``;
of several, the one the release's ``cache_messager.py`` imports), the module the resource manager imports
``Request`` from, and ``envs``.

:func:`check_engine` plays :data:`~.slice_scenarios.WAVES` (routed requests and orphans, an orphan's slot reused by
a routed request) and judges what every rank read: the ``engine:`` line of ``preflight``. :func:`run_with_messagers`
runs the release's own ``cache_messager.py`` (unmodified, as a script, one process per rank, with preflight's stubs
and tap) on that engine's real mailbox instead, kv signals coming from the slice's worker, playing scenarios of
:data:`~.slice_scenarios.SCENARIOS` as episodes of one run (the races, orphans, both orders of a request's parts, a
late repeated D-part, a prepare thread failing after the P-part), with interleavings forced by handshakes;
:func:`judge_messagers` judges an episode: every routed request finished, identical batches on every rank, no
ground-truth violation. The scenarios are data, in :mod:`fastdeploy_pd_fix.tools.slice_scenarios`.
"""

from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from fastdeploy_pd_fix import config
from fastdeploy_pd_fix.policy.notice import ENGINE, NOTICE_KEY, ORPHAN
from fastdeploy_pd_fix.standin.harness import plugin_variables
from fastdeploy_pd_fix.target import (
    CONNECTOR_CLASS,
    CONNECTOR_MODULE,
    MAILBOX_PUT,
    RESOURCE_MANAGER_CLASS,
    RESOURCE_MANAGER_METHODS,
    RESOURCE_MANAGER_MODULE,
    SCRIPT_PATH,
    UPSTREAMED_PACKAGE,
    UPSTREAMED_PATH,
)
from fastdeploy_pd_fix.tools import preflight_tree
from fastdeploy_pd_fix.tools.slice_scenarios import CHUNK_TOKENS, NRANKS, SCENARIOS, WAVES, run_key

PACKAGE = preflight_tree.PACKAGE
#: The prefill prepare thread's fetch (#7724 on): the engine admits a request with ``add_request_in_p`` there.
PREFILL_FETCH = "_fetch_request_prefill"
MAILBOX_GET = "get_cache_info"
REQUEST_CLASS = "Request"
#: How long the slice process may take (start-up imports paddle; each wait inside has its own deadline).
TIMEOUT_S = 120.0
#: With real messager ranks: how long a wait of an episode may see nothing happen (no report of a rank, no transfer
#: reported, no decode answer) before the episode is a hang; a slow machine only stretches the episode.
MESSAGER_DEADLINE_S = 4.0


@dataclass(frozen=True)
class EngineFiles:
    """The release files of a slice: role -> module name, and module name -> file; ``fixed``: the release carries
    the fix (``make-patch``'s package, which its engine files import, is among the files)."""

    roles: Dict[str, str]
    files: Dict[str, Path]
    fixed: bool = False
    #: The release's ``cache_messager.py`` beside the package (among ``files``), for :func:`run_with_messagers`.
    messager: Optional[Path] = None


def _module_name(package_dir: Path, path: Path) -> str:
    return ".".join((PACKAGE,) + path.relative_to(package_dir).with_suffix("").parts)


def _module_path(package_dir: Path, module: str) -> Path:
    return package_dir.joinpath(*module.split(".")[1:]).with_suffix(".py")


def _classes(tree: ast.Module) -> Dict[str, set]:
    return {
        node.name: {item.name for item in node.body if isinstance(item, ast.FunctionDef)}
        for node in ast.walk(tree)
        if isinstance(node, ast.ClassDef)
    }


def _find_defining(package_dir: Path, methods: Tuple[str, ...]) -> Dict[str, str]:
    """Every class of the package that defines all of ``methods``: class name -> module (a cheap text filter first)."""
    found: Dict[str, str] = {}
    for path in sorted(package_dir.rglob("*.py")):
        if "test" in path.relative_to(package_dir).parts[0]:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if not all(method in text for method in methods):
            continue
        try:
            classes = _classes(ast.parse(text))
        except (SyntaxError, ValueError):
            continue
        for name, defined in classes.items():
            if set(methods) <= defined:
                found.setdefault(name, _module_name(package_dir, path))
    return found


def _messager_imports(package_dir: Path) -> set:
    """The names the release's ``cache_messager.py`` imports (empty without one)."""
    try:
        tree = ast.parse((package_dir.parent / SCRIPT_PATH).read_bytes())
    except (OSError, SyntaxError, ValueError):
        return set()
    return {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for alias in node.names}


def _import_source(tree: ast.Module, name: str) -> Optional[str]:
    """The module ``name`` is imported from in ``tree`` (absolute imports), or None."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and any(alias.name == name for alias in node.names):
            return node.module
    return None


def find_engine_files(package_dir: Path) -> Tuple[Optional[EngineFiles], str]:
    """``(files, "")``, or ``(None, why not)`` for a FastDeploy package directory."""
    package_dir = Path(package_dir)
    roles: Dict[str, str] = {}
    for role, module, class_name in (
        ("resource_manager", RESOURCE_MANAGER_MODULE, RESOURCE_MANAGER_CLASS),
        ("connector", CONNECTOR_MODULE, CONNECTOR_CLASS),
    ):
        path = _module_path(package_dir, module)
        try:
            defined = _classes(ast.parse(path.read_bytes()))
        except (OSError, SyntaxError, ValueError):
            return None, f"no {module} here (the module the plugin patches)"
        if class_name not in defined:
            return None, f"{module} defines no {class_name}"
        roles[role] = module
    for role, methods in (("prepare", (PREFILL_FETCH,)), ("queue", (MAILBOX_PUT, MAILBOX_GET))):
        classes = _find_defining(package_dir, methods)
        if not classes:
            return None, f"no class with {', '.join(methods)} in {package_dir}"
        if len(classes) > 1:  # several mailboxes: the one the messagers read, by the name their file imports
            imported = {name: module for name, module in classes.items() if name in _messager_imports(package_dir)}
            if len(imported) != 1:
                return None, (
                    f"{len(classes)} classes with {', '.join(methods)} in {package_dir} ({', '.join(sorted(classes))})"
                    f" and the cache messager imports {len(imported)} of them"
                )
            classes = imported
        roles[role] = next(iter(classes.values()))
    resource_manager_tree = ast.parse(_module_path(package_dir, roles["resource_manager"]).read_bytes())
    request = _import_source(resource_manager_tree, REQUEST_CLASS)
    if request is None or not _module_path(package_dir, request).is_file():
        return None, f"{roles['resource_manager']} imports no {REQUEST_CLASS} from a module of {package_dir}"
    roles["request"] = request
    files = {module: _module_path(package_dir, module) for module in roles.values()}
    envs = package_dir / "envs.py"
    if envs.is_file():
        files[f"{PACKAGE}.envs"] = envs
    upstreamed = package_dir.parent / UPSTREAMED_PATH
    for path in sorted(upstreamed.rglob("*.py")) if upstreamed.is_dir() else []:
        files[_module_name(package_dir, path)] = path  # its __init__ too: the tree path follows the name
    messager = package_dir.parent / SCRIPT_PATH
    if messager.is_file():
        files[_module_name(package_dir, messager)] = messager
    return EngineFiles(roles, files, fixed=upstreamed.is_dir(), messager=messager if messager.is_file() else None), ""


def slice_tree(files: EngineFiles, work: Path) -> Path:
    """The slice tree under ``work`` (``work/tree``), laid out the first time; runs that share ``work`` share it."""
    root = work / "tree"
    if not root.exists():
        preflight_tree.build_engine_tree(files.files, root)
    return root


def _run_slice_process(files: EngineFiles, work: Path, name: str, spec: dict, environment: Dict[str, str]) -> dict:
    """Lay out the slice tree under ``work`` (once) and run the slice process with ``spec`` and ``environment`` (over
    this process's, without its ``FD_PD_FIX*`` variables); its JSON result, or ``{"error"}``. On a timeout the whole
    process group (the slice process, its mailbox server, its messager ranks) is killed."""
    root = slice_tree(files, work)
    ignored = plugin_variables()  # each run sets its own, as preflight's do
    run_environment = {key: value for key, value in os.environ.items() if key not in ignored}
    run_environment.update(environment)
    run_environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
    log, result_path = work / f"{name}.log", work / f"{name}.json"
    command = [sys.executable, "-c", "from fastdeploy._preflight import slice_engine; slice_engine.main()"]
    with open(log, "w", encoding="utf-8") as output:
        process = subprocess.Popen(
            command + [json.dumps(spec), str(result_path)],
            cwd=root,
            env=run_environment,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            returncode = process.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return {"error": f"the slice process did not finish within {TIMEOUT_S:.0f} s (log: {log})"}
    try:
        return json.loads(result_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-3:]
        return {"error": f"the slice process exited {returncode} without a result: {' | '.join(tail)}"}


def run_slice(files: EngineFiles, work: Path, plugin_on: bool = True, waves=WAVES, nranks: int = NRANKS) -> dict:
    """Run the slice with :class:`MailboxReader` ranks once: what every rank read from the mailbox (:func:`judge`)."""
    spec = {"modules": files.roles, "nranks": nranks, "waves": waves}
    environment = {config.ENV_SWITCH: "1" if plugin_on else "0"}
    return _run_slice_process(files, work, f"slice-{'on' if plugin_on else 'off'}", spec, environment)


def _episode_interleaving(scenarios: List[dict], nranks: int) -> List[List[str]]:
    """Per rank, the forced order of events over a run of ``scenarios``: each episode's own, its ``sig:<n>`` named
    ``sig:<episode>:<n>`` (the ranks count layer-0 signals per episode)."""
    ranks = []
    for rank in range(nranks):
        events = []
        for number, scenario in enumerate(scenarios):
            per_rank = scenario.get("interleaving") or [[]]
            for event in per_rank[min(rank, len(per_rank) - 1)]:
                kind, _, value = event.partition(":")
                events.append(f"sig:{number}:{value}" if kind == "sig" else event)
        ranks.append(events)
    return ranks


def run_with_messagers(
    files: EngineFiles,
    work: Path,
    mode: str,
    names: List[str],
    name: str = "messagers",
    scenarios: Dict[str, dict] = SCENARIOS,
) -> dict:
    """Run the slice once with the release's own ``cache_messager.py`` (``files.messager``, copied unmodified into
    the slice tree, run there as a script) in rank processes on the engine's real mailbox, in ``mode`` (one of
    :data:`fastdeploy_pd_fix.config.RUN_MODES`: ``off`` is the release as is), playing the scenarios ``names`` of
    ``scenarios`` (keys as in :data:`SCENARIOS`) one after another. Returns ``{"episodes": {name: result}, "ready",
    "decisions", "error", "run_s"}``; an episode after one that did not finish was not played (``outcome`` "not
    run"). Each episode is judged by :func:`judge_messagers`. The rank logs are in ``work/NAME-MODE/``."""
    nranks, environment = run_key(names, scenarios)
    name = f"{name}-{mode}"
    episodes = [{"deadline_s": MESSAGER_DEADLINE_S, **scenarios[scenario]} for scenario in names]
    messager = {
        "script": str(work / "tree" / SCRIPT_PATH),
        "log_dir": str(work / name),
        "interleaving": _episode_interleaving(episodes, nranks),
        "chunk_tokens": CHUNK_TOKENS,
    }
    spec = {"modules": files.roles, "nranks": nranks, "episodes": episodes, "messager": messager}
    started = time.monotonic()
    result = _run_slice_process(files, work, name, spec, {**config.environment_for(mode), **dict(environment)})
    played = result.get("episodes", [])
    not_run = {"outcome": "not run", "error": result.get("error")}
    result["episodes"] = {
        scenario: played[number] if number < len(played) else dict(not_run) for number, scenario in enumerate(names)
    }
    result["run_s"] = round(time.monotonic() - started, 1)
    return result


def history_problems(run: dict, waves: List[List[dict]], computed: bool = True) -> List[str]:
    """Where the release's engine did not play the engine history of ``waves`` in ``run`` (an episode or a mailbox
    readers' run; empty: it did, and the run shows what the scenario says it shows): every request it admitted is on
    its history's slot, the history's slot ``n`` being the ``n``-th lowest slot free when the run started (not
    checked on a release whose resource manager keeps no ``stop_flags``), and, with ``computed``, was computed in the
    history's chunks."""
    free, problems = run.get("free_slots"), []
    for spec in (spec for wave in waves for spec in wave):
        request_id, admitted = spec["id"], run["slots"].get(spec["id"])
        if free is not None and admitted is not None:
            expected = free[spec["slot"]] if spec["slot"] < len(free) else None
            if admitted != expected:
                where = (
                    f"slot {expected}, the lowest free then" if expected is not None else f"free slot #{spec['slot']}"
                )
                problems.append(
                    f"{request_id}: the engine admitted it on slot {admitted}, the scenario's history on {where} "
                    f"(free at the start: {free}): the scenario did not play as written"
                )
        chunk_ends = run.get("chunk_ends", {}).get(request_id, [])
        if computed and chunk_ends != spec["ends"]:
            problems.append(
                f"{request_id}: computed in chunks ending at {chunk_ends}, the scenario's history at {spec['ends']}"
            )
    return problems


def judge_messagers(episode: dict, name: str, scenarios: Dict[str, dict] = SCENARIOS) -> List[str]:
    """What is wrong with one episode of real messagers (empty: nothing): it must have finished (every routed
    request's transfer reported finished through ``get_finished_req`` and its slot freed, but those whose prepare
    thread failed) as the scenario's engine history says (:func:`history_problems`), every rank took the same batches,
    and no send broke the ground truth (the task read is the request whose chunk the batch carries, computed)."""
    if episode["outcome"] != "finished":
        return [f"{episode['outcome']}: {episode['error']}"]
    problems = history_problems(episode, scenarios[name]["waves"])
    ranks = episode["ranks"]
    batches = [reports["batch"] for reports in ranks.values()]
    if any(sequence != batches[0] for sequence in batches):
        problems.append(f"the ranks took different batches: {dict(zip(ranks, batches))}")
    for rank, reports in ranks.items():
        problems += [f"rank {rank}: {violation}" for _, _, violations in reports["send"] for violation in violations]
    routed = [
        spec["id"]
        for wave in scenarios[name]["waves"]
        for spec in wave
        if spec["routed"] and not spec.get("fails_after_p_part")
    ]
    statuses = {request_id: status for request_id, status in episode["reported"]}
    problems += [
        f"{request_id}: transfer reported {statuses[request_id]!r}"
        for request_id in routed
        if statuses.get(request_id, "finished") != "finished"
    ]
    return problems


def _notices(items: List[dict]) -> List[dict]:
    return [item for item in items if isinstance(item, dict) and NOTICE_KEY in item]


def judge(result: dict, waves=WAVES, notices_expected: bool = True) -> List[str]:
    """What is wrong with one slice run (empty: nothing). Every request was admitted on its history's slot
    (:func:`history_problems`; the readers' run computes nothing); every rank read the same items, the first of them
    the engine's announcement; every routed request was registered once, on its slot, with its prompt length; every
    orphan was announced once, on its slot, before the registration of a later wave's request on that slot
    (``notices_expected`` False: no notice at all)."""
    if result.get("error"):
        return [result["error"]]
    problems = history_problems(result, waves, computed=False)
    problems += [f"rank {rank}: {error}" for rank, error in enumerate(result["rank_errors"]) if error]
    streams = result["ranks"]
    if any(stream != streams[0] for stream in streams):
        problems.append("the ranks read different streams")
    stream, slots = streams[0], result["slots"]
    announced = [item for item in _notices(stream) if item.get("kind") == ENGINE]
    if announced != ([stream[0]] if notices_expected else []):
        problems.append(f"engine announcements {announced}, expected {'one, first' if notices_expected else 'none'}")

    def registrations(request_id):
        return [
            index for index, item in enumerate(stream) if item.get("request_id") == request_id and "current_id" in item
        ]

    for wave_number, wave in enumerate(waves):
        for spec in wave:
            request_id, slot = spec["id"], slots.get(spec["id"])
            announced = [item for item in _notices(stream) if item.get("target_request_id") == request_id]
            if spec["routed"]:
                registered = [
                    (stream[index]["current_id"], stream[index].get("need_prefill_tokens"))
                    for index in registrations(request_id)
                ]
                if registered != [(slot, spec["prompt"])]:
                    problems.append(f"{request_id}: registered as {registered}, expected once on slot {slot}")
            expected = [(ORPHAN, slot, spec["prompt"])] if notices_expected and not spec["routed"] else []
            if [(item["kind"], item["slot"], item["value"]) for item in announced] != expected:
                problems.append(f"{request_id}: notices {announced}, expected {expected}")
            elif expected:
                reuses = [
                    index
                    for later in waves[wave_number + 1 :]
                    for other in later
                    if slots.get(other["id"]) == slot
                    for index in registrations(other["id"])
                ]
                if reuses and min(reuses) < stream.index(announced[0]):
                    problems.append(f"{request_id}: its slot's next registration was read before its orphan notice")
    return problems


def check_engine(package_dir: Optional[Path], work: Path) -> dict:
    """The ``engine:`` line's facts for a FastDeploy package directory (None: only a lone cache_messager.py)."""
    methods = [f"{RESOURCE_MANAGER_CLASS}.{name}" for name in RESOURCE_MANAGER_METHODS] + [
        f"{CONNECTOR_CLASS}.__init__"
    ]
    if package_dir is None:
        return {"checked": False, "line": "not checked: no engine files", "methods": {}}
    files, why = find_engine_files(package_dir)
    if files is None:
        return {"checked": False, "line": f"not checked: {why}", "methods": {}}
    on, off = run_slice(files, work, plugin_on=True), run_slice(files, work, plugin_on=False)
    # A release that carries the fix announces and puts its own notices, with the plugin off too.
    problems = judge(on) + [f"plugin off: {problem}" for problem in judge(off, notices_expected=files.fixed)]
    patched = [line for line in on.get("decisions", []) if ": patched " in line]
    orphans_read = not judge(on) and bool(_notices(on["ranks"][0]))
    exercised = {
        f"{RESOURCE_MANAGER_CLASS}.add_request_in_p": orphans_read,
        f"{CONNECTOR_CLASS}.__init__": orphans_read,  # the notices reached the mailbox it captured
    }
    status = {
        method: "exercised" if exercised.get(method) else ("FAILED" if method in exercised else "not checked")
        for method in methods
    }
    reasons = {f"{RESOURCE_MANAGER_CLASS}.recycle_abort_task": "the slice's engine never aborts a request"}
    line = ", ".join(
        f"{method} {status[method]}" + (f" ({reasons[method]})" if method in reasons else "") for method in methods
    )
    if files.fixed:
        line = f"the release's own notices ({UPSTREAMED_PACKAGE}; the plugin's engine patch stands aside): {line}"
    return {
        "checked": True,
        "line": line if not problems else f"FAILED: {'; '.join(problems)}",
        "methods": status,
        "problems": problems,
        "decisions": patched,
        "modules": files.roles,
    }


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m fastdeploy_pd_fix.tools.engine_slice PACKAGE_DIR``: the engine line for that package."""
    package_dir = Path((argv if argv is not None else sys.argv[1:])[0])
    with tempfile.TemporaryDirectory(prefix="fd-pd-fix-slice-") as work:
        report = check_engine(package_dir, Path(work))
    print(f"engine: {report['line']}")
    return 0 if report["checked"] and not report.get("problems") else 1


if __name__ == "__main__":
    sys.exit(main())
