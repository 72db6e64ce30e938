"""The patch manifest, target checks, and applying or removing the patch.

Patch manifest (vllm-ascend style: what, why, how, upstream, when to remove)
---------------------------------------------------------------------------

``CacheMessagerV1.consume_signals`` (``fastdeploy/cache_manager/cache_messager.py``, class in ``__main__`` when
FastDeploy runs the file as a script, or in ``fastdeploy.cache_manager.cache_messager`` when imported)
    Why:   upstream turns layer-0 kv signals into transfer batches depending on whether the registration thread
           has already stored the task. That timing differs between tensor-parallel ranks, so ranks put different
           batch sequences into ``cache_prefilled_engine_ids_queue`` and block each other forever at
           ``begin_send_cache_barrier`` / ``finish_send_cache_barrier``. #7872 (buffering) and #8034 (one batch per
           request) fix single-chunk cases; chunked prefill and cross-request order still deadlock.
    How:   replaced by a loop that calls ``get_output_kv_signal`` with exactly the argument expressions of the
           running release's own call (found in its syntax tree), parses the buffer once through numpy,
           validates it, updates ``engine_cache_tasks`` under ``engine_cache_task_thread_lock`` as upstream does,
           and hands layer-0 tasks to the release policy of :mod:`fastdeploy_pd_fix.release`.
    Upstream: PaddlePaddle/FastDeploy #7872, #7896, #8034, #8035.
    Remove when: the running FastDeploy release carries the rank-invariant release (``make-patch`` output, which
           the check below recognises and then stands aside).

``CacheMessagerV1._add_cache_task_thread``
    Why:   the release policy must see every registration, in registration order.
    How:   wrapped, not rewritten: the wrapper replaces ``idx_cache_task_dict`` by a dict subclass that reports
           each item assignment to the policy, then runs the original loop unchanged, so every engine-facing
           call of the running release (``get_cache_info``, ``cache_info_barrier``, the pre-#7724
           ``finish_add_cache_task`` report and barrier) stays exactly as it is. The original's recovery of
           ``pending_layer0_signals`` (#7872+) finds nothing, because the patched ``consume_signals`` never
           fills that buffer.
    Remove when: as above.

Switches: ``FD_PD_FIX=0`` turns everything off (nothing is imported or patched). ``FD_PD_FIX_MODE`` selects what the
patched methods do: ``ordered`` (default) the rank-invariant release; ``upstream`` reproduces #8034 for A/B runs;
``observe`` keeps the running release's own methods and only adds the batch journal, watchdog and fault injection of
:mod:`fastdeploy_pd_fix.diagnostics` (to diagnose an unfixed deployment).
"""

from __future__ import annotations

import ast
import inspect
import logging
import os
import sys
import textwrap
import threading
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

from fastdeploy_pd_fix import __version__
from fastdeploy_pd_fix._bootstrap import TARGET_CLASS
from fastdeploy_pd_fix.release import MODES, ORDERED

logger = logging.getLogger("fastdeploy_pd_fix")

ENV_MODE = "FD_PD_FIX_MODE"
OBSERVE = "observe"
PATCH_MODES = MODES + (OBSERVE,)
PATCHED_METHODS = ("consume_signals", "_add_cache_task_thread")
KV_SIGNAL_OP = "get_output_kv_signal"
#: Name of the module that ``make-patch`` adds to FastDeploy; a release that uses it is already fixed.
UPSTREAMED_MODULE = "layer0_release"


@dataclass(frozen=True)
class PatchInfo:
    """One manifest entry, shown by ``fastdeploy-pd-fix status``."""

    target: str
    how: str
    upstream: str
    remove_when: str


MANIFEST = (
    PatchInfo(
        f"{TARGET_CLASS}.consume_signals",
        "replaced: rank-invariant layer-0 release, same kv-signal op call and progress updates",
        "#7872, #7896, #8034, #8035 (partial fixes)",
        "the running FastDeploy carries the rank-invariant release (make-patch)",
    ),
    PatchInfo(
        f"{TARGET_CLASS}._add_cache_task_thread",
        "wrapped: original loop unchanged, registrations observed through idx_cache_task_dict",
        "#7724 changed its engine-facing calls; every variant's calls are kept as they are",
        "the running FastDeploy carries the rank-invariant release (make-patch)",
    ),
)


@dataclass(frozen=True)
class TargetAnalysis:
    """What the checks found in one ``CacheMessagerV1`` class, and whether it can be patched."""

    recognised: bool
    reason: str
    op_arguments: Tuple[str, ...] = ()
    op_import_module: Optional[str] = None
    has_pending_buffer: bool = False
    waits_for_registration: bool = False

    def features(self) -> str:
        if not self.recognised:
            return "unrecognised"
        buffer = "pending_layer0_signals (#7872+)" if self.has_pending_buffer else "no pending buffer (pre-#7872)"
        registration = (
            "send loop waits for registration (#7724+)"
            if self.waits_for_registration
            else "finish_add_cache_task barrier (pre-#7724)"
        )
        op_call = f"{KV_SIGNAL_OP}(buf, {', '.join(self.op_arguments)})"
        return f"{op_call}; {buffer}; {registration}"


@dataclass
class PatchRecord:
    """The decision taken for one class: logged once, kept for ``status`` and the tests."""

    target: str
    decision: str  # "patched", "stood aside" or "already patched"
    reason: str
    mode: str
    fastdeploy_version: str
    features: str

    def describe(self) -> str:
        return (
            f"fastdeploy_pd_fix {__version__}: {self.decision} {self.target} "
            f"(mode={self.mode}, fastdeploy={self.fastdeploy_version}): {self.reason}; {self.features}"
        )


RECORDS: List[PatchRecord] = []
_patch_lock = threading.Lock()


def selected_mode() -> Tuple[str, Optional[str]]:
    """The mode from ``FD_PD_FIX_MODE`` and a warning when the value was not understood."""
    value = os.environ.get(ENV_MODE, ORDERED).strip().lower() or ORDERED
    if value in PATCH_MODES:
        return value, None
    return ORDERED, f"{ENV_MODE}={value!r} is not one of {', '.join(PATCH_MODES)}; using {ORDERED}"


def fastdeploy_version() -> str:
    """FastDeploy's version without importing it (importing fastdeploy pulls the whole engine)."""
    module = sys.modules.get("fastdeploy")
    version = getattr(module, "__version__", None)
    if version:
        return str(version)
    from importlib import metadata

    for distribution in ("fastdeploy-gpu", "fastdeploy"):
        try:
            return metadata.version(distribution)
        except metadata.PackageNotFoundError:
            continue
    return "unknown"


def _function_tree(function) -> ast.FunctionDef:
    source = textwrap.dedent(inspect.getsource(function))
    tree = ast.parse(source).body[0]
    # The source comes from the file on disk: if it changed since the module was compiled, it may not be this method.
    if not isinstance(tree, ast.FunctionDef) or tree.name != function.__name__:
        raise ValueError(f"the source on disk of {function.__qualname__} does not match the running code")
    return tree


def _is_self_expression(node: ast.AST) -> bool:
    """True for constants and ``self.attr`` chains: expressions we can evaluate with the instance alone."""
    for child in ast.walk(node):
        if isinstance(child, ast.Name) and child.id != "self":
            return False
        if not isinstance(child, (ast.Name, ast.Attribute, ast.Constant, ast.UnaryOp, ast.USub, ast.Load)):
            return False
    return True


def _find_op_call(tree: ast.FunctionDef) -> Tuple[Optional[ast.Call], Optional[str], str]:
    """The single ``get_output_kv_signal`` call of ``consume_signals``, its import module, or why not."""
    calls = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and (getattr(node.func, "id", None) == KV_SIGNAL_OP or getattr(node.func, "attr", None) == KV_SIGNAL_OP)
    ]
    if len(calls) != 1:
        return None, None, f"expected one {KV_SIGNAL_OP} call in consume_signals, found {len(calls)}"
    import_module = next(
        (
            node.module
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and any(alias.name == KV_SIGNAL_OP for alias in node.names)
        ),
        None,
    )
    return calls[0], import_module, ""


def analyse_class(cls) -> TargetAnalysis:
    """Check that ``cls`` is a ``CacheMessagerV1`` this plugin knows how to patch."""
    missing = [name for name in ("__init__",) + PATCHED_METHODS if not callable(getattr(cls, name, None))]
    if missing:
        return TargetAnalysis(False, f"missing methods {', '.join(missing)}")
    try:
        consume_tree = _function_tree(cls.consume_signals)
        register_tree = _function_tree(cls._add_cache_task_thread)
        init_tree = _function_tree(cls.__init__)
    except (OSError, TypeError, SyntaxError, IndexError, ValueError) as error:
        return TargetAnalysis(False, f"source of the methods is not readable ({error})")

    names = {node.id for node in ast.walk(consume_tree) if isinstance(node, ast.Name)}
    names |= {node.attr for node in ast.walk(consume_tree) if isinstance(node, ast.Attribute)}
    imports = {node.module or "" for node in ast.walk(consume_tree) if isinstance(node, ast.ImportFrom)}
    if any(UPSTREAMED_MODULE in name for name in names | imports):
        return TargetAnalysis(False, "FastDeploy already carries the rank-invariant release")

    call, import_module, problem = _find_op_call(consume_tree)
    if call is None:
        return TargetAnalysis(False, problem)
    if len(call.args) < 3 or call.keywords or not all(_is_self_expression(arg) for arg in call.args[1:]):
        return TargetAnalysis(False, f"unexpected {KV_SIGNAL_OP} call: {ast.unparse(call)}")

    stores_task = any(
        isinstance(node, ast.Subscript)
        and isinstance(node.ctx, ast.Store)
        and ast.unparse(node.value) == "self.idx_cache_task_dict"
        for node in ast.walk(register_tree)
    )
    if not stores_task:
        return TargetAnalysis(False, "_add_cache_task_thread does not store tasks by idx_cache_task_dict[...] = ...")

    has_pending_buffer = any(
        isinstance(node, ast.Attribute) and node.attr == "pending_layer0_signals" for node in ast.walk(init_tree)
    )
    return TargetAnalysis(
        True,
        "recognised",
        op_arguments=tuple(ast.unparse(arg) for arg in call.args[1:]),
        op_import_module=import_module,
        has_pending_buffer=has_pending_buffer,
        waits_for_registration=callable(getattr(cls, "_maybe_wait_for_cache_task", None)),
    )


def is_patched(cls) -> bool:
    return "_fd_pd_fix_originals" in vars(cls)


def original_method(cls, name: str) -> Callable:
    """The method as it was before patching (the current one when ``cls`` is not patched)."""
    return vars(cls).get("_fd_pd_fix_originals", {}).get(name) or getattr(cls, name)


def patch_class(cls, mode: Optional[str] = None) -> PatchRecord:
    """Patch ``cls`` in place if it is recognised; otherwise leave it untouched. Idempotent; never raises."""
    from fastdeploy_pd_fix import adapters

    target = f"{cls.__module__}.{cls.__qualname__}"
    mode_warning = None
    if mode is None:
        mode, mode_warning = selected_mode()
    with _patch_lock:
        if is_patched(cls):
            record = PatchRecord(target, "already patched", "nothing to do", cls._fd_pd_fix_mode, "", "")
            return record
        try:
            analysis = analyse_class(cls)
        except Exception as error:  # an unexpected shape must not break FastDeploy: stand aside
            analysis = TargetAnalysis(False, f"check failed: {error!r}")
        version = fastdeploy_version()
        if not analysis.recognised:
            record = PatchRecord(target, "stood aside", analysis.reason, mode, version, analysis.features())
        else:
            originals = {name: vars(cls).get(name) or getattr(cls, name) for name in PATCHED_METHODS}
            cls._fd_pd_fix_originals = originals
            cls._fd_pd_fix_mode = mode
            cls._fd_pd_fix_analysis = analysis
            cls.consume_signals = adapters.make_consume_signals(originals["consume_signals"])
            cls._add_cache_task_thread = adapters.make_add_cache_task_thread(originals["_add_cache_task_thread"])
            reason = "observing only, upstream release kept" if mode == OBSERVE else "layer-0 release replaced"
            reason += f" ({mode_warning})" if mode_warning else ""
            record = PatchRecord(target, "patched", reason, mode, version, analysis.features())
            cls._fd_pd_fix_record = record
        RECORDS.append(record)
    log = logger.warning if record.decision == "stood aside" or mode_warning else logger.info
    log(record.describe())
    return record


def unpatch_class(cls) -> None:
    """Restore the original methods (tests, A/B runs)."""
    with _patch_lock:
        originals = vars(cls).get("_fd_pd_fix_originals")
        if not originals:
            return
        for name, method in originals.items():
            setattr(cls, name, method)
        for attribute in ("_fd_pd_fix_originals", "_fd_pd_fix_mode", "_fd_pd_fix_analysis", "_fd_pd_fix_record"):
            delattr(cls, attribute)


def patch_module(module) -> Optional[PatchRecord]:
    """Patch ``module.CacheMessagerV1`` if the module defines it (post-import hook entry point)."""
    cls = getattr(module, TARGET_CLASS, None)
    if cls is None:
        return None
    return patch_class(cls)
