"""The FastDeploy side of the GPU end-to-end PD test: settings, prerequisites, server command lines, the workload.

Written from the launch facts of FastDeploy's own PD router e2e tests (router ``python -m fastdeploy.router.launch
--port P --splitwise``; servers ``python -m fastdeploy.entrypoints.openai.api_server ... --splitwise-role
prefill|decode --router HOST:P``, each with ``ENABLE_V1_KVCACHE_SCHEDULER=1`` and its own ``FD_LOG_DIR``; ready when
``GET {router}/registered_number`` counts a prefill and a decode instance). Standard library only, plus
``fastdeploy_pd_fix.config`` (stdlib itself) to read ``FD_E2E_INJECT`` as the plugin will.

Every server also gets ``ENABLE_V1_KVCACHE_MANAGER=0`` (the new cache manager does not use ``cache_messager.py``),
``FD_ENABLE_REQUEST_DISCONNECT_STOP_INFERENCE=1`` (a closed stream aborts its request: the abort wave; a prefill
instance of release/2.6 only records the abort and computes the request to the end),
``FD_DETERMINISTIC_MODE`` (``FD_E2E_DETERMINISTIC``: mixed and PD servers batch differently, and only deterministic
mode makes their greedy outputs comparable without a tolerance) and ``NO_PROXY``/``no_proxy`` with the loopback
addresses added (the router reaches the servers over loopback HTTP, never through a proxy from the environment).

GPUs: over IPC the decode server needs as many GPUs as prefill. With 4 GPUs each server has its own two; with 2, they
share them and both get ``--gpu-memory-utilization`` ``$FD_E2E_SHARED_GPU_MEMORY_UTILIZATION`` (0.4; unless
``FD_E2E_EXTRA_SERVER_ARGS`` sets it), since at FastDeploy's default 0.9 the second server's KV cache allocation
fails; with fewer than the TP2 prefill needs, the module skips with that reason.

Settings (environment, all optional):

==============================  =======================================================================================
``FD_E2E_MODEL``                model directory; default ``$MODEL_PATH/ERNIE-4.5-0.3B-Paddle``
``FD_E2E_PORT_BASE``            first port (default 8700): prefill uses base+10.., decode base+20.., mixed base+30..
``FD_E2E_ROUTER_PORT``          router port (default: the base)
``FD_E2E_PREFILL_GPUS``         GPU ids of the prefill server, its tensor parallel size is their number (default 0,1)
``FD_E2E_DECODE_GPUS``          default: the next free GPUs, else shared with prefill; as many as prefill over IPC
                                (the router uses IPC only between equal TP sizes), one over RDMA
``FD_E2E_MIXED_GPUS``           reference mixed server (runs before the PD servers; default: the prefill GPUs)
``KVCACHE_RDMA_NICS``           set: transfer over RDMA with ``--rdma-comm-ports``; unset: IPC
``FD_E2E_REQUESTS``             concurrent requests (16); ``FD_E2E_MAX_TOKENS`` (32)
``FD_E2E_MAX_NUM_BATCHED_TOKENS`` per-step token budget (256), small so that the long prompts are prefilled in chunks
``FD_E2E_INJECT``               ``FD_PD_FIX_INJECT`` of the prefill server (default
                                registration_after_barrier:rank=1:delay_ms=300: rank 1 alone registers late; the
                                race assertions count that rank's early layer-0 signals)
``FD_E2E_DETERMINISTIC``        ``FD_DETERMINISTIC_MODE`` of every server (1); with 0, allow for batch-dependent
                                outputs with ``FD_E2E_MAX_MISMATCHES``
``FD_E2E_ABORTED_REQUESTS``     abort wave: streamed requests closed once the server answered, before any token (8)
``FD_E2E_ABORT_AFTER_S``        ... or after this long without an answer (2)
``FD_E2E_REFILL_REQUESTS``      the wave after it, more than ``--max-num-seqs`` (default: max-num-seqs + 8)
``FD_E2E_ORPHAN_REQUESTS``      orphan wave: requests sent straight to the prefill server's API, not through the
                                router (4), at the same time as ``FD_E2E_ORPHAN_ROUTED_REQUESTS`` routed ones
                                (default: max-num-seqs; together more than ``--max-num-seqs``, so that routed
                                requests reuse the orphans' slots)
``FD_E2E_MAX_NUM_SEQS``         ``--max-num-seqs`` (16)
``FD_E2E_DEADLINE_S``           every request must complete within this (300); ``FD_E2E_UNFIXED_DEADLINE_S`` (180)
``FD_E2E_READY_ATTEMPTS``       registration polls (60), ``FD_E2E_READY_INTERVAL_S`` apart (5)
``FD_E2E_ARTIFACTS_DIR``        where logs are copied (default: under pytest's tmp dir)
``FD_E2E_EXTRA_SERVER_ARGS``    appended to every api_server command, e.g. ``--gpu-memory-utilization 0.4``
``FD_E2E_MAX_MISMATCHES``       outputs allowed to differ from the mixed reference (0)
``FD_E2E_EXPECT_UNFIXED=1``     the installed FastDeploy has #7724 and lacks #8034: also run the expected-hang A/B test
``FD_E2E_UNFIXED_PLUGIN``       plugin setting of that test: ``observe`` (default; the release's own code with the
                                plugin's fault injection and batch journal) or ``off`` (``FD_PD_FIX=0``: no injection)
``FD_E2E_REQUIRED=1``           missing prerequisites fail instead of skipping (nightly CI)
==============================  =======================================================================================
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from e2e.orchestration import LOOPBACK, Deployment, ServerSpec, WaitForHealth, WaitForRegistration

from fastdeploy_pd_fix.config import parse_injection

DEFAULT_MODEL_DIR_NAME = "ERNIE-4.5-0.3B-Paddle"
#: Rank 1 stores each registration 300 ms after the barrier let both ranks through: its layer-0 signals can beat
#: their registration, rank 0's cannot (fastdeploy_pd_fix/plugin/messager/inject.py).
DEFAULT_INJECT = "registration_after_barrier:rank=1:delay_ms=300"
ASYMMETRIC_STAGE = "registration_after_barrier"
#: Hosts never sent through a proxy (added to any NO_PROXY of the environment).
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
GPU_MEMORY_UTILIZATION_OPTION = "--gpu-memory-utilization"
PLUGIN_ENV_PREFIX = "FD_PD_FIX"
PLUGIN_ORDERED = {"FD_PD_FIX": "1", "FD_PD_FIX_MODE": "ordered"}
UNFIXED_PLUGIN_ENVS = {
    "observe": {"FD_PD_FIX": "1", "FD_PD_FIX_MODE": "observe"},
    "off": {"FD_PD_FIX": "0"},
}
PREFILL_PORT_OFFSET, DECODE_PORT_OFFSET, MIXED_PORT_OFFSET = 10, 20, 30
MAX_TENSOR_PARALLEL = 5  # ports of one server: api, metrics, engine queue, cache queue, pd comm, one rdma per rank
GREEDY = {"temperature": 0, "top_p": 1e-6, "seed": 33}


def _text(environ: Mapping[str, str], name: str, default: str) -> str:
    value = environ.get(name, "").strip()
    return value if value else default


def _number(environ: Mapping[str, str], name: str, default, kind):
    value = _text(environ, name, "")
    if not value:
        return default
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not a valid {kind.__name__}") from None


def _gpu_ids(environ: Mapping[str, str], name: str, default: Tuple[int, ...]) -> Tuple[int, ...]:
    value = _text(environ, name, "")
    if not value:
        return default
    try:
        return tuple(int(part) for part in value.split(","))
    except ValueError:
        raise ValueError(f"{name}={value!r} is not a comma-separated list of GPU ids") from None


def default_decode_gpus(prefill_gpus: Tuple[int, ...], gpu_count: int, over_rdma: bool) -> Tuple[int, ...]:
    """The GPUs after the prefill ones when the machine has them, else shared with prefill (as upstream's tests do)."""
    needed = 1 if over_rdma else len(prefill_gpus)
    first = max(prefill_gpus) + 1
    if first + needed <= gpu_count:
        return tuple(range(first, first + needed))
    return prefill_gpus[-needed:]


@dataclass(frozen=True)
class ServerPorts:
    """The ports one api_server is given; ``api`` first (the HTTP port)."""

    api: int
    metrics: int
    engine_worker_queue: int
    cache_queue: int
    pd_comm: int
    rdma: Tuple[int, ...]

    def all(self) -> List[int]:
        return [self.api, self.metrics, self.engine_worker_queue, self.cache_queue, self.pd_comm, *self.rdma]


def server_ports(base: int, tensor_parallel_size: int) -> ServerPorts:
    rdma = tuple(range(base + 5, base + 5 + tensor_parallel_size))
    return ServerPorts(base, base + 1, base + 2, base + 3, base + 4, rdma)


@dataclass(frozen=True)
class E2ESettings:
    """Everything a run can be told through the environment (see the module docstring)."""

    python: str
    model: Optional[Path]
    port_base: int
    router_port: int
    prefill_gpus: Tuple[int, ...]
    decode_gpus: Tuple[int, ...]
    mixed_gpus: Tuple[int, ...]
    rdma_nics: str
    requests: int
    max_tokens: int
    max_num_batched_tokens: int
    max_num_seqs: int
    max_model_len: int
    inject: str
    deterministic: bool
    aborted_requests: int
    abort_after_s: float
    refill_requests: int
    orphan_requests: int
    orphan_routed_requests: int
    shared_gpu_memory_utilization: float
    deadline_s: float
    unfixed_deadline_s: float
    ready_attempts: int
    ready_interval_s: float
    stop_grace_s: float
    port_free_timeout_s: float
    artifacts_dir: Optional[Path]
    extra_server_args: Tuple[str, ...]
    max_mismatches: int
    expect_unfixed: bool
    unfixed_plugin: str
    required: bool
    test_timeout_s: float

    @property
    def protocol(self) -> str:
        return "rdma" if self.rdma_nics else "ipc"

    @property
    def unfixed_plugin_env(self) -> Dict[str, str]:
        return UNFIXED_PLUGIN_ENVS[self.unfixed_plugin]

    @property
    def shared_gpus(self) -> Tuple[int, ...]:
        """The GPUs prefill and decode both use (empty: each has its own)."""
        return tuple(sorted(set(self.prefill_gpus) & set(self.decode_gpus)))

    @property
    def delayed_rank(self) -> Optional[int]:
        """The rank ``FD_E2E_INJECT`` delays on its own (after the barrier), None when it delays none alone."""
        injections, _ = parse_injection(self.inject)
        ranks = sorted({injection.rank for injection in injections if injection.stage == ASYMMETRIC_STAGE})
        return ranks[0] if len(ranks) == 1 else None

    @classmethod
    def from_env(cls, environ: Mapping[str, str], gpu_count: int = 0) -> "E2ESettings":
        model_text = _text(environ, "FD_E2E_MODEL", "")
        model_root = _text(environ, "MODEL_PATH", "")
        if model_text:
            model = Path(model_text)
        elif model_root:
            model = Path(model_root) / DEFAULT_MODEL_DIR_NAME
        else:
            model = None
        rdma_nics = _text(environ, "KVCACHE_RDMA_NICS", "")
        prefill_gpus = _gpu_ids(environ, "FD_E2E_PREFILL_GPUS", (0, 1))
        decode_default = default_decode_gpus(prefill_gpus, gpu_count, over_rdma=bool(rdma_nics))
        port_base = _number(environ, "FD_E2E_PORT_BASE", 8700, int)
        max_num_seqs = _number(environ, "FD_E2E_MAX_NUM_SEQS", 16, int)
        unfixed_plugin = _text(environ, "FD_E2E_UNFIXED_PLUGIN", "observe")
        artifacts = _text(environ, "FD_E2E_ARTIFACTS_DIR", "")
        settings = cls(
            python=_text(environ, "FD_E2E_PYTHON", sys.executable),
            model=model,
            port_base=port_base,
            router_port=_number(environ, "FD_E2E_ROUTER_PORT", port_base, int),
            prefill_gpus=prefill_gpus,
            decode_gpus=_gpu_ids(environ, "FD_E2E_DECODE_GPUS", decode_default),
            mixed_gpus=_gpu_ids(environ, "FD_E2E_MIXED_GPUS", prefill_gpus),
            rdma_nics=rdma_nics,
            requests=_number(environ, "FD_E2E_REQUESTS", 16, int),
            max_tokens=_number(environ, "FD_E2E_MAX_TOKENS", 32, int),
            max_num_batched_tokens=_number(environ, "FD_E2E_MAX_NUM_BATCHED_TOKENS", 256, int),
            max_num_seqs=max_num_seqs,
            max_model_len=_number(environ, "FD_E2E_MAX_MODEL_LEN", 8192, int),
            inject=_text(environ, "FD_E2E_INJECT", DEFAULT_INJECT),
            deterministic=_text(environ, "FD_E2E_DETERMINISTIC", "1") == "1",
            aborted_requests=_number(environ, "FD_E2E_ABORTED_REQUESTS", 8, int),
            abort_after_s=_number(environ, "FD_E2E_ABORT_AFTER_S", 2.0, float),
            refill_requests=_number(environ, "FD_E2E_REFILL_REQUESTS", max_num_seqs + 8, int),
            orphan_requests=_number(environ, "FD_E2E_ORPHAN_REQUESTS", 4, int),
            orphan_routed_requests=_number(environ, "FD_E2E_ORPHAN_ROUTED_REQUESTS", max_num_seqs, int),
            shared_gpu_memory_utilization=_number(environ, "FD_E2E_SHARED_GPU_MEMORY_UTILIZATION", 0.4, float),
            deadline_s=_number(environ, "FD_E2E_DEADLINE_S", 300.0, float),
            unfixed_deadline_s=_number(environ, "FD_E2E_UNFIXED_DEADLINE_S", 180.0, float),
            ready_attempts=_number(environ, "FD_E2E_READY_ATTEMPTS", 60, int),
            ready_interval_s=_number(environ, "FD_E2E_READY_INTERVAL_S", 5.0, float),
            stop_grace_s=_number(environ, "FD_E2E_STOP_GRACE_S", 20.0, float),
            port_free_timeout_s=_number(environ, "FD_E2E_PORT_FREE_TIMEOUT_S", 60.0, float),
            artifacts_dir=Path(artifacts).resolve() if artifacts else None,
            extra_server_args=tuple(shlex.split(environ.get("FD_E2E_EXTRA_SERVER_ARGS", ""))),
            max_mismatches=_number(environ, "FD_E2E_MAX_MISMATCHES", 0, int),
            expect_unfixed=_text(environ, "FD_E2E_EXPECT_UNFIXED", "0") == "1",
            unfixed_plugin=unfixed_plugin,
            required=_text(environ, "FD_E2E_REQUIRED", "0") == "1",
            test_timeout_s=_number(environ, "FD_E2E_TEST_TIMEOUT_S", 3600.0, float),
        )
        settings.validate()
        return settings

    def validate(self) -> None:
        if len(self.prefill_gpus) < 2:
            raise ValueError(f"FD_E2E_PREFILL_GPUS={self.prefill_gpus}: the race needs a prefill TP size of 2 or more")
        for name, gpus in (("decode", self.decode_gpus), ("mixed", self.mixed_gpus), ("prefill", self.prefill_gpus)):
            if not 1 <= len(gpus) <= MAX_TENSOR_PARALLEL:
                raise ValueError(f"{name} GPUs {gpus}: between 1 and {MAX_TENSOR_PARALLEL} ids")
        if self.protocol == "ipc" and len(self.decode_gpus) != len(self.prefill_gpus):
            raise ValueError(
                f"IPC transfer needs equal TP sizes (the router picks IPC only then): prefill GPUs "
                f"{self.prefill_gpus}, decode GPUs {self.decode_gpus}; set KVCACHE_RDMA_NICS for RDMA"
            )
        if self.unfixed_plugin not in UNFIXED_PLUGIN_ENVS:
            raise ValueError(f"FD_E2E_UNFIXED_PLUGIN={self.unfixed_plugin!r}: one of {sorted(UNFIXED_PLUGIN_ENVS)}")
        counts = {
            "FD_E2E_REQUESTS": self.requests,
            "FD_E2E_MAX_TOKENS": self.max_tokens,
            "FD_E2E_ABORTED_REQUESTS": self.aborted_requests,
            "FD_E2E_ORPHAN_REQUESTS": self.orphan_requests,
            "FD_E2E_ORPHAN_ROUTED_REQUESTS": self.orphan_routed_requests,
        }
        for name, count in counts.items():
            if count < 1:
                raise ValueError(f"{name}={count}: must be positive")
        if self.refill_requests <= self.max_num_seqs:
            raise ValueError(
                f"FD_E2E_REFILL_REQUESTS={self.refill_requests}: the wave after the aborts must exceed "
                f"--max-num-seqs {self.max_num_seqs}, so that it reuses the slots the aborts freed"
            )
        if self.orphan_requests + self.orphan_routed_requests <= self.max_num_seqs:
            raise ValueError(
                f"FD_E2E_ORPHAN_REQUESTS={self.orphan_requests} and FD_E2E_ORPHAN_ROUTED_REQUESTS="
                f"{self.orphan_routed_requests}: together they must exceed --max-num-seqs {self.max_num_seqs}, so "
                "that routed requests reuse the orphans' slots"
            )
        if not 0 < self.shared_gpu_memory_utilization < 0.5:
            raise ValueError(
                f"FD_E2E_SHARED_GPU_MEMORY_UTILIZATION={self.shared_gpu_memory_utilization}: two servers share the "
                "GPUs, each needs a share in (0, 0.5)"
            )


# --- prerequisites ---------------------------------------------------------------------------------------------


def detect_gpus(which: Callable = shutil.which, run: Callable = subprocess.run) -> Tuple[int, Optional[str]]:
    """Number of NVIDIA GPUs from ``nvidia-smi -L`` and, when there is none, why."""
    nvidia_smi = which("nvidia-smi")
    if nvidia_smi is None:
        return 0, "nvidia-smi not found"
    try:
        result = run([nvidia_smi, "-L"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        return 0, f"nvidia-smi -L did not run: {error!r}"
    if result.returncode != 0:
        return 0, f"nvidia-smi -L exited with {result.returncode}: {result.stderr.strip()[:200]}"
    count = sum(1 for line in result.stdout.splitlines() if line.startswith("GPU "))
    return count, None if count else "nvidia-smi lists no GPU"


def probe_fastdeploy(python: str, run: Callable = subprocess.run) -> Optional[str]:
    """Why the servers' interpreter has no usable FastDeploy (None: it has one). Imported in a child process,
    as the servers will import it, and never in the test process (which then stays free of CUDA)."""
    code = "import fastdeploy as fd; print(bool(getattr(fd, 'STANDIN', False)), getattr(fd, '__version__', '?'))"
    try:
        result = run([python, "-c", code], capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"import fastdeploy did not run: {error!r}"
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines()
        return f"import fastdeploy failed: {lines[-1] if lines else f'exit code {result.returncode}'}"
    standin, _, version = (result.stdout.strip().splitlines() or ["False ?"])[-1].partition(" ")
    if standin == "True":
        return f"fastdeploy {version} is this project's CPU stand-in, not FastDeploy"
    return None


#: The markers of the feature line of ``fastdeploy-pd-fix status`` (fastdeploy_pd_fix/analysis.py, ``features``).
PRE_7724_MARKER, WITH_7724_MARKER = "(pre-#7724)", "(#7724+)"


@dataclass(frozen=True)
class ReleaseFeatures:
    """What ``fastdeploy-pd-fix status`` says of the release the servers run.

    ``can_race``: True from #7724 on (the prefill engine no longer waits for every rank's registration before it
    computes, so a layer-0 signal can beat its registration); False before (no race is possible: the race
    assertions skip with ``reason``); None when status could not tell (``reason`` says why)."""

    can_race: Optional[bool]
    reason: str
    status: str = ""


def release_features(status: str) -> ReleaseFeatures:
    """Read the FastDeploy and target lines of a ``fastdeploy-pd-fix status`` report."""
    lines = [line.strip() for line in status.splitlines()]
    fastdeploy = next((line for line in lines if line.startswith("FastDeploy:")), "FastDeploy: ?")
    target = next((line for line in lines if line.startswith("target:")), None)
    if target is None:
        return ReleaseFeatures(None, f"fastdeploy-pd-fix status analysed no cache messager ({fastdeploy})", status)
    if PRE_7724_MARKER in target:
        return ReleaseFeatures(
            False,
            f"the installed release predates #7724 ({fastdeploy}; {target}): its prefill engine waits for every "
            "rank's registration before computing, so no layer-0 signal can beat its registration",
            status,
        )
    if WITH_7724_MARKER in target:
        return ReleaseFeatures(True, f"the installed release has #7724 ({fastdeploy}; {target})", status)
    return ReleaseFeatures(None, f"fastdeploy-pd-fix status does not tell whether #7724 is in: {target}", status)


def probe_release(python: str, run: Callable = subprocess.run) -> ReleaseFeatures:
    """``python -m fastdeploy_pd_fix status`` with the servers' interpreter, read by :func:`release_features`."""
    try:
        result = run([python, "-m", "fastdeploy_pd_fix", "status"], capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as error:
        return ReleaseFeatures(None, f"fastdeploy-pd-fix status did not run: {error!r}")
    if result.returncode != 0:
        return ReleaseFeatures(
            None, f"fastdeploy-pd-fix status exited with {result.returncode}: {result.stderr[-300:]}"
        )
    return release_features(result.stdout)


def prerequisite_problems(
    settings: E2ESettings, gpu_count: int, gpu_problem: Optional[str], fastdeploy_problem: Optional[str]
) -> List[str]:
    """Everything missing for a GPU run, each in a few words (empty: ready to run)."""
    problems = []
    if gpu_problem:
        problems.append(f"no GPU ({gpu_problem})")
    else:
        needed = max(settings.prefill_gpus + settings.decode_gpus + settings.mixed_gpus) + 1
        if gpu_count < needed:
            problems.append(
                f"{gpu_count} GPU(s), the configured GPU ids need {needed} (prefill {list(settings.prefill_gpus)}: "
                f"the race needs TP 2 or more; decode {list(settings.decode_gpus)})"
            )
    if fastdeploy_problem:
        problems.append(f"no FastDeploy ({fastdeploy_problem})")
    if settings.model is None:
        problems.append(f"no model (set FD_E2E_MODEL, or MODEL_PATH holding {DEFAULT_MODEL_DIR_NAME})")
    elif not settings.model.is_dir():
        problems.append(f"no model at {settings.model}")
    return problems


def skip_reason(problems: Sequence[str]) -> str:
    return "GPU PD e2e needs NVIDIA GPUs, FastDeploy and the model; missing: " + "; ".join(problems)


# --- servers ---------------------------------------------------------------------------------------------------


def no_proxy_value(base_env: Mapping[str, str]) -> str:
    """The environment's ``NO_PROXY`` (or ``no_proxy``) with the loopback hosts added."""
    present = [host.strip() for host in (base_env.get("NO_PROXY") or base_env.get("no_proxy") or "").split(",")]
    hosts = [host for host in present if host]
    return ",".join(hosts + [host for host in LOOPBACK_HOSTS if host not in hosts])


def server_environment(
    base_env: Mapping[str, str], plugin_env: Mapping[str, str], extra: Mapping[str, str]
) -> Dict[str, str]:
    """The inherited environment without any plugin setting, then the run's plugin setting, then ``extra``; loopback
    never goes through a proxy."""
    env = {name: value for name, value in base_env.items() if not name.startswith(PLUGIN_ENV_PREFIX)}
    env.update(plugin_env)
    env.update(extra)
    env["NO_PROXY"] = env["no_proxy"] = no_proxy_value(base_env)
    return env


def fastdeploy_switches(settings: E2ESettings) -> Dict[str, str]:
    """FastDeploy's own switches every api_server of the run gets (module docstring)."""
    return {
        "ENABLE_V1_KVCACHE_SCHEDULER": "1",
        "ENABLE_V1_KVCACHE_MANAGER": "0",
        "FD_ENABLE_REQUEST_DISCONNECT_STOP_INFERENCE": "1",
        "FD_DETERMINISTIC_MODE": "1" if settings.deterministic else "0",
    }


def gpu_memory_arguments(settings: E2ESettings, role: str) -> List[str]:
    """``--gpu-memory-utilization`` for a PD server on GPUs the other one uses too (none when the extra arguments
    already set it, or for the mixed server, which runs alone)."""
    if role == "mixed" or not settings.shared_gpus or GPU_MEMORY_UTILIZATION_OPTION in settings.extra_server_args:
        return []
    return [GPU_MEMORY_UTILIZATION_OPTION, str(settings.shared_gpu_memory_utilization)]


def router_spec(settings: E2ESettings, run_dir: Path, base_env: Mapping[str, str]) -> ServerSpec:
    work_dir = run_dir / "router"
    return ServerSpec(
        name="router",
        argv=[settings.python, "-m", "fastdeploy.router.launch", "--port", str(settings.router_port), "--splitwise"],
        env=server_environment(base_env, {}, {"FD_LOG_DIR": str(work_dir / "log")}),
        log_path=work_dir / "stdout.log",
        ports=[settings.router_port],
        log_dirs=[work_dir / "log"],
        cwd=work_dir,
        startup_check=WaitForHealth(settings.ready_attempts, settings.ready_interval_s),
        stop_grace_s=settings.stop_grace_s,
    )


def api_server_spec(
    settings: E2ESettings,
    run_dir: Path,
    role: str,
    base_env: Mapping[str, str],
    plugin_env: Mapping[str, str],
) -> ServerSpec:
    """``python -m fastdeploy.entrypoints.openai.api_server`` for ``role`` (prefill, decode or mixed)."""
    gpus, offset = {
        "prefill": (settings.prefill_gpus, PREFILL_PORT_OFFSET),
        "decode": (settings.decode_gpus, DECODE_PORT_OFFSET),
        "mixed": (settings.mixed_gpus, MIXED_PORT_OFFSET),
    }[role]
    ports = server_ports(settings.port_base + offset, len(gpus))
    work_dir = run_dir / role
    options = {
        "--model": settings.model,
        "--port": ports.api,
        "--metrics-port": ports.metrics,
        "--engine-worker-queue-port": ports.engine_worker_queue,
        "--cache-queue-port": ports.cache_queue,
        "--tensor-parallel-size": len(gpus),
        "--max-model-len": settings.max_model_len,
        "--max-num-seqs": settings.max_num_seqs,
        "--max-num-batched-tokens": settings.max_num_batched_tokens,
    }
    if role != "mixed":
        options["--splitwise-role"] = role
        options["--cache-transfer-protocol"] = settings.protocol
        options["--pd-comm-port"] = ports.pd_comm
        options["--router"] = f"{LOOPBACK}:{settings.router_port}"
        if settings.protocol == "rdma":
            options["--rdma-comm-ports"] = ",".join(str(port) for port in ports.rdma)
    argv = [settings.python, "-m", "fastdeploy.entrypoints.openai.api_server"]
    argv += [str(item) for option in options.items() for item in option]
    argv += gpu_memory_arguments(settings, role) + list(settings.extra_server_args)
    extra = {
        "CUDA_VISIBLE_DEVICES": ",".join(str(gpu) for gpu in gpus),
        **fastdeploy_switches(settings),
        "FD_LOG_DIR": str(work_dir / "log"),
    }
    if role == "prefill" and settings.inject:
        extra["FD_PD_FIX_INJECT"] = settings.inject
    return ServerSpec(
        name=role,
        argv=argv,
        env=server_environment(base_env, plugin_env, extra),
        log_path=work_dir / "stdout.log",
        ports=ports.all(),
        log_dirs=[work_dir / "log"],
        cwd=work_dir,
        stop_grace_s=settings.stop_grace_s,
    )


def pd_deployment(
    settings: E2ESettings,
    run_dir: Path,
    artifacts_dir: Path,
    label: str,
    plugin_env: Mapping[str, str],
    base_env: Optional[Mapping[str, str]] = None,
) -> Deployment:
    """Router, prefill (TP over the prefill GPUs, fault injection) and decode; ready once both registered."""
    base_env = os.environ if base_env is None else base_env
    specs = [
        router_spec(settings, run_dir, base_env),
        api_server_spec(settings, run_dir, "prefill", base_env, plugin_env),
        api_server_spec(settings, run_dir, "decode", base_env, plugin_env),
    ]
    readiness = WaitForRegistration({"prefill": 1, "decode": 1}, settings.ready_attempts, settings.ready_interval_s)
    return Deployment(
        label,
        specs,
        entry="router",
        readiness=readiness,
        artifacts_dir=artifacts_dir,
        diagnose_server="prefill",
        port_free_timeout_s=settings.port_free_timeout_s,
    )


def mixed_deployment(
    settings: E2ESettings, run_dir: Path, artifacts_dir: Path, base_env: Optional[Mapping[str, str]] = None
) -> Deployment:
    """One non-disaggregated server, the reference for the outputs."""
    base_env = os.environ if base_env is None else base_env
    specs = [api_server_spec(settings, run_dir, "mixed", base_env, PLUGIN_ORDERED)]
    return Deployment(
        "mixed-reference",
        specs,
        entry="mixed",
        readiness=WaitForHealth(settings.ready_attempts, settings.ready_interval_s),
        artifacts_dir=artifacts_dir,
        port_free_timeout_s=settings.port_free_timeout_s,
    )


# --- workload --------------------------------------------------------------------------------------------------

COLOURS = ("red", "blue", "green", "amber", "violet", "grey", "white", "black")


def long_prompts(count: int, min_entries: int = 40, max_entries: int = 160, first: int = 0) -> List[str]:
    """``count`` distinct prompts of about 700 to 2900 tokens (different lengths: different numbers of chunks),
    numbered from ``first`` (prompts of different numbers differ)."""
    span = max_entries - min_entries + 1
    prompts = []
    for number in range(first, first + count):
        entries = min_entries + (number * 37) % span
        lines = [f"Inspection log {number}."]
        lines += [
            f"Entry {entry}: the {COLOURS[(number + entry) % len(COLOURS)]} valve in room "
            f"{(number * 7 + entry * 3) % 50} reads {(number * 31 + entry * 17) % 997} units."
            for entry in range(entries)
        ]
        lines.append(f"Question: which room in inspection log {number} has the highest reading? Answer:")
        prompts.append("\n".join(lines))
    return prompts


def completion_payload(prompt: str, max_tokens: int, stream: bool = False) -> dict:
    """A greedy ``/v1/completions`` request (temperature 0, tiny top_p, fixed seed), streamed or not (only a
    streamed request's client disconnect reaches the servers as an abort)."""
    return {"model": "default", "prompt": prompt, "max_tokens": max_tokens, "stream": stream, **GREEDY}


def abort_wave_payloads(settings: E2ESettings) -> List[dict]:
    """The streamed requests the abort wave closes: long prompts (many chunks, so a close lands mid-prefill) that
    differ from the first wave's."""
    prompts = long_prompts(settings.aborted_requests, min_entries=120, max_entries=160, first=settings.requests)
    return [completion_payload(prompt, settings.max_tokens, stream=True) for prompt in prompts]


def refill_payloads(settings: E2ESettings) -> List[dict]:
    """The wave after the aborts: more requests than ``--max-num-seqs``, so that it reuses the slots they freed."""
    first = settings.requests + settings.aborted_requests
    return [
        completion_payload(prompt, settings.max_tokens)
        for prompt in long_prompts(settings.refill_requests, first=first)
    ]


def orphan_wave_payloads(settings: E2ESettings) -> Tuple[List[dict], List[dict]]:
    """The orphan wave: the requests sent through the router, then those sent straight to the prefill server (no
    ``disaggregate_info``: orphans); long prompts, so that an orphan is prefilled in several chunks among the routed
    requests' chunks. Their prompts differ from every other wave's."""
    first = settings.requests + settings.aborted_requests + settings.refill_requests
    prompts = long_prompts(settings.orphan_routed_requests + settings.orphan_requests, min_entries=80, first=first)
    payloads = [completion_payload(prompt, settings.max_tokens) for prompt in prompts]
    return payloads[: settings.orphan_routed_requests], payloads[settings.orphan_routed_requests :]
