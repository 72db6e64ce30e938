"""The patch manifest, and applying or removing the patch.

:data:`MANIFEST` is the patch manifest (vllm-ascend style): for each patched method, what is done to it, why, how,
the upstream pull requests and when to remove the patch. It is the single source: ``fastdeploy-pd-fix status``
prints it and this docstring only explains how to read it.

The target is ``CacheMessagerV1`` of ``fastdeploy/cache_manager/cache_messager.py``: a class of ``__main__`` when
FastDeploy runs the file as a script (one process per tensor-parallel rank), of
``fastdeploy.cache_manager.cache_messager`` when it is imported. :func:`patch_class` checks it with
:func:`fastdeploy_pd_fix.analysis.analyse_class`, stands aside (one warning line, class untouched) when the class is
not recognised, and otherwise replaces the two methods by the factories of :mod:`.runtime`. What it did is kept in
one frozen :class:`PatchState` on the class (the originals stay reachable there and as ``__wrapped__``).

The last three entries are the engine side (``ResourceManagerV1``, ``SplitwiseConnector``, in FastDeploy's engine
process): :mod:`.engine` applies them, with the same kind of checks, decision record and switch-off.

Switches (read by :mod:`fastdeploy_pd_fix.config`): ``FD_PD_FIX=0`` (or false/off/no) turns everything off (the
start-up hook installs nothing and nothing is patched). ``FD_PD_FIX_MODE`` selects what the patched methods do:
``ordered`` (default) the rank-invariant release; ``upstream`` reproduces #8034 for A/B runs; ``observe`` keeps the
running release's own methods and only adds the batch journal, watchdog and fault injection (to diagnose an unfixed
deployment).
"""

from __future__ import annotations

import logging
import sys
import threading
from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, List, Mapping, Optional

from fastdeploy_pd_fix import __version__, config
from fastdeploy_pd_fix.analysis import CANNOT_RACE, TargetAnalysis, analyse_class, unrecognised
from fastdeploy_pd_fix.plugin import runtime
from fastdeploy_pd_fix.target import CONNECTOR_CLASS, PATCHED_METHODS, RESOURCE_MANAGER_CLASS, TARGET_CLASS

logger = logging.getLogger("fastdeploy_pd_fix")

#: The one class attribute a patched class carries: its :class:`PatchState`.
STATE_ATTRIBUTE = "_fd_pd_fix_state"


@dataclass(frozen=True)
class PatchInfo:
    """One manifest entry; ``status`` prints ``target``, ``how``, ``upstream`` and ``remove_when``."""

    target: str
    how: str
    why: str
    details: str
    upstream: str
    remove_when: str


REMOVE_WHEN = "the running FastDeploy carries the rank-invariant release (make-patch)"
#: The engine-side entries (fastdeploy_pd_fix/plugin/engine.py): patched in the engine process, prefill role only.
ENGINE_REMOVE_WHEN = "the running FastDeploy announces aborted and transfer-less slot occupancies itself"
ENGINE_DETAILS = (
    "only when FD_PD_FIX is on, FD_PD_FIX_MODE is ordered and FD_PD_FIX_ENGINE_NOTICES is not off; puts nothing on "
    "other roles (nobody may read the mailbox there); any error in the plugin's part is logged once and the "
    "original runs without a notice (without the announcement the messagers release by upstream's rule)"
)

MANIFEST = (
    PatchInfo(
        target=f"{TARGET_CLASS}.consume_signals",
        how="replaced: rank-invariant layer-0 release, same kv-signal op call and progress updates",
        why=(
            "upstream turns layer-0 kv signals into transfer batches depending on whether the registration thread "
            "has already stored the task. That timing differs between tensor-parallel ranks, so ranks put "
            "different batch sequences into cache_prefilled_engine_ids_queue and block each other forever at "
            "begin_send_cache_barrier / finish_send_cache_barrier. #7872 (buffering) and #8034 (one batch per "
            "request) fix single-chunk cases; chunked prefill and cross-request order still deadlock."
        ),
        details=(
            "a loop that calls get_output_kv_signal with exactly the argument expressions of the running "
            "release's own call (found in its syntax tree) and hands each buffer to core.messager_step: parsed "
            "once through numpy, validated, engine_cache_tasks updated under engine_cache_task_thread_lock as "
            "upstream does, layer-0 tasks given to the release policy of core.release. Not on a release that "
            "cannot race (2.4, 2.5, develop before #7724: the engine waits for every rank's registration report), "
            "where it stands aside unless FD_PD_FIX_PATCH_NON_RACING=1."
        ),
        upstream="#7872, #7896, #8034, #8035 (partial fixes)",
        remove_when=REMOVE_WHEN,
    ),
    PatchInfo(
        target=f"{TARGET_CLASS}._add_cache_task_thread",
        how="wrapped: original loop unchanged, registrations observed through idx_cache_task_dict",
        why=(
            "the release policy must see every registration, in registration order, and the send thread must read "
            "the task each batch was bound to: an aborted request's batch may still be queued when the engine has "
            "given its slot to the next request."
        ),
        details=(
            "before the original loop runs, activation attaches core.messager_step (MessagerStep.attach): "
            "idx_cache_task_dict becomes a "
            "BoundTaskDict, which reports each item assignment to the policy and shows the send loop (its thread "
            "and any worker thread it sends from, #7931), for the slots of the batch it took from "
            "cache_prefilled_engine_ids_queue, that batch's own task (its cleanup "
            "del leaves a newer request's entry in place); then it runs the original loop unchanged, so every "
            "engine-facing call of the running release "
            "(get_cache_info, cache_info_barrier, the pre-#7724 finish_add_cache_task report and barrier) stays "
            "exactly as it is. The original's recovery of pending_layer0_signals (#7872+) finds nothing, because "
            "the patched consume_signals never fills that buffer."
        ),
        upstream="#7724 changed its engine-facing calls; every variant's calls are kept as they are",
        remove_when=REMOVE_WHEN,
    ),
    PatchInfo(
        target=f"{RESOURCE_MANAGER_CLASS}.recycle_abort_task",
        how="wrapped: puts ABORT(slot, request, emitted_end) and then FENCE into the cache-info mailbox, then runs",
        why=(
            "an aborted request's slot is given to the next request, and the messagers cannot tell from their two "
            "streams which of the slot's layer-0 signals belong to which request (an abort before the first chunk "
            "looks like the next request). The fence makes the next occupant's admission put return only after "
            "every rank has handled the abort (release rules R8, R9)."
        ),
        details=(
            "emitted_end is the request's prefill_end_index (end of its last scheduled chunk; None when it is 0); "
            "no notice for a request the original will not free (not in requests or to_be_aborted_req_id_set). "
            + ENGINE_DETAILS
        ),
        upstream="none yet",
        remove_when=ENGINE_REMOVE_WHEN,
    ),
    PatchInfo(
        target=f"{RESOURCE_MANAGER_CLASS}.add_request_in_p",
        how="wrapped: puts ORPHAN(slot, request, len(prompt_token_ids)) for each request without a P-part, then runs",
        why=(
            "a request without disaggregate_info is computed on its slot without a transfer and without a "
            "registration; its layer-0 signals must not be bound to the slot's other requests."
        ),
        details="one batch for all orphans of the call, put before the original appends them to running. "
        + ENGINE_DETAILS,
        upstream="none yet",
        remove_when=ENGINE_REMOVE_WHEN,
    ),
    PatchInfo(
        target=f"{CONNECTOR_CLASS}.__init__",
        how="wrapped: records the connector's engine_worker_queue for its resource_manager, after the original",
        why="the resource manager has no reference to the cache-info mailbox; the connector is built with both.",
        details=(
            "the mailbox goes onto the resource manager instance as _fd_pd_fix_mailbox; a resource manager built "
            "with no connector uses the process's only mailbox, and none when there are several"
        ),
        upstream="none yet",
        remove_when=ENGINE_REMOVE_WHEN,
    ),
)


@dataclass(frozen=True)
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


@dataclass(frozen=True)
class PatchState:
    """Everything the patch put on a class, as one attribute: the original methods, the mode, the analysis the
    patched methods run on, and the decision record."""

    originals: Mapping[str, Callable]
    mode: str
    analysis: TargetAnalysis
    record: PatchRecord


RECORDS: List[PatchRecord] = []
_patch_lock = threading.Lock()


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


def patch_state(cls) -> Optional[PatchState]:
    """The :class:`PatchState` of ``cls``, or None when ``cls`` itself is not patched."""
    return vars(cls).get(STATE_ATTRIBUTE)


def is_patched(cls) -> bool:
    return patch_state(cls) is not None


def original_method(cls, name: str) -> Callable:
    """The method as it was before patching (the current one when ``cls`` is not patched)."""
    state = patch_state(cls)
    return (state and state.originals.get(name)) or getattr(cls, name)


def patch_class(cls, mode: Optional[str] = None) -> PatchRecord:
    """Patch ``cls`` in place if it is recognised; otherwise leave it untouched. Idempotent; never raises."""
    target = f"{cls.__module__}.{cls.__qualname__}"
    warnings = [config.switch()[1]]  # an FD_PD_FIX value not understood (the plugin stays on)
    if mode is None:
        mode, mode_warning = config.selected_mode()
        warnings.append(mode_warning)
    config_warning = "; ".join(filter(None, warnings))  # logged once, with this decision line
    with _patch_lock:
        state = patch_state(cls)
        if state is not None:
            return PatchRecord(target, "already patched", "nothing to do", state.mode, "", "")
        try:
            analysis = analyse_class(cls)
        except Exception as error:  # an unexpected shape must not break FastDeploy: stand aside
            analysis = unrecognised(f"check failed: {error!r}")
        version = fastdeploy_version()
        patch_anyway, patch_anyway_warning = config.patch_non_racing()
        config_warning = "; ".join(filter(None, [config_warning, patch_anyway_warning]))
        if not analysis.recognised or (analysis.cannot_race and not patch_anyway):
            reason = (analysis.reason if not analysis.recognised else CANNOT_RACE) + (
                f" ({config_warning})" if config_warning else ""
            )
            record = PatchRecord(target, "stood aside", reason, mode, version, analysis.features())
        else:
            reason = "observing only, upstream release kept" if mode == config.OBSERVE else "layer-0 release replaced"
            reason += f" ({config_warning})" if config_warning else ""
            record = PatchRecord(target, "patched", reason, mode, version, analysis.features())
            originals = {name: vars(cls).get(name) or getattr(cls, name) for name in PATCHED_METHODS}
            state = PatchState(MappingProxyType(originals), mode, analysis, record)
            setattr(cls, STATE_ATTRIBUTE, state)
            cls.consume_signals = runtime.make_consume_signals(originals["consume_signals"], state)
            cls._add_cache_task_thread = runtime.make_add_cache_task_thread(originals["_add_cache_task_thread"], state)
        RECORDS.append(record)
    log = logger.warning if record.decision == "stood aside" or config_warning else logger.info
    log(record.describe())
    return record


def unpatch_class(cls) -> None:
    """Restore the original methods (tests, A/B runs)."""
    with _patch_lock:
        state = patch_state(cls)
        if state is None:
            return
        for name, method in state.originals.items():
            setattr(cls, name, method)
        delattr(cls, STATE_ATTRIBUTE)


def patch_module(module) -> Optional[PatchRecord]:
    """Patch ``module.CacheMessagerV1`` if the module defines it (post-import hook entry point)."""
    cls = getattr(module, TARGET_CLASS, None)
    if cls is None:
        return None
    return patch_class(cls)
