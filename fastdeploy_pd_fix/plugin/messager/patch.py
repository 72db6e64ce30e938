"""The cache messager's patch: ``CacheMessagerV1.consume_signals`` replaced, ``_add_cache_task_thread`` wrapped.

:data:`MANIFEST` says, for each patched method, what is done to it, why, how, the upstream pull requests and when
to remove the patch; ``fastdeploy-pd-fix status`` prints it and this docstring only explains how to read it.

The target is ``CacheMessagerV1`` of ``fastdeploy/cache_manager/cache_messager.py``: a class of ``__main__`` when
FastDeploy runs the file as a script (one process per tensor-parallel rank), of
``fastdeploy.cache_manager.cache_messager`` when it is imported. :func:`patch_class` checks it with
:func:`fastdeploy_pd_fix.analysis.analyse_class` and stands aside (one warning line, class untouched) when the class
is not recognised, or when its release cannot race (unless ``FD_PD_FIX_PATCH_NON_RACING=1``); otherwise it replaces
the two methods by the factories of :mod:`.runtime`, through the plugin's one patch state machine
(:class:`fastdeploy_pd_fix.plugin.patching.ClassPatcher`).
"""

from __future__ import annotations

from typing import Callable, Optional

from fastdeploy_pd_fix import config
from fastdeploy_pd_fix.analysis import CANNOT_RACE, analyse_class, unrecognised
from fastdeploy_pd_fix.plugin.messager import runtime
from fastdeploy_pd_fix.plugin.patching import (
    PATCHED,
    STOOD_ASIDE,
    ClassPatcher,
    PatchInfo,
    PatchPlan,
    PatchRecord,
    PatchState,
    class_name,
    fastdeploy_version,
)
from fastdeploy_pd_fix.target import PATCHED_METHODS, TARGET_CLASS

#: The one class attribute a patched ``CacheMessagerV1`` carries: its :class:`PatchState`.
STATE_ATTRIBUTE = "_fd_pd_fix_state"
PATCHER = ClassPatcher(STATE_ATTRIBUTE)

REMOVE_WHEN = "the running FastDeploy carries the rank-invariant release (make-patch)"

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
            "release's own call (found in its syntax tree) and hands each buffer to adapters.messager_step: parsed "
            "once through numpy, validated, engine_cache_tasks updated under engine_cache_task_thread_lock as "
            "upstream does, layer-0 tasks given to the release policy of policy.release. Not on a release that "
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
            "before the original loop runs, activation attaches adapters.messager_step (MessagerStep.attach): "
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
)


def patch_state(cls) -> Optional[PatchState]:
    """The :class:`PatchState` of ``cls``, or None when ``cls`` itself is not patched."""
    return PATCHER.state(cls)


def is_patched(cls) -> bool:
    return PATCHER.state(cls) is not None


def original_method(cls, name: str) -> Callable:
    """The method as it was before patching (the current one when ``cls`` is not patched)."""
    state = PATCHER.state(cls)
    return (state and state.originals.get(name)) or getattr(cls, name)


def _wrap(state: PatchState):
    return {
        "consume_signals": runtime.make_consume_signals(state.originals["consume_signals"], state),
        "_add_cache_task_thread": runtime.make_add_cache_task_thread(state.originals["_add_cache_task_thread"], state),
    }


def patch_class(cls, mode: Optional[str] = None) -> PatchRecord:
    """Patch ``cls`` in place if it is recognised; otherwise leave it untouched. Idempotent; never raises."""
    warnings = [config.switch()[1]]  # an FD_PD_FIX value not understood (the plugin stays on)
    if mode is None:
        mode, mode_warning = config.selected_mode()
        warnings.append(mode_warning)

    def decide():
        try:
            analysis = analyse_class(cls)
        except Exception as error:  # an unexpected shape must not break FastDeploy: stand aside
            analysis = unrecognised(f"check failed: {error!r}")
        patch_anyway, patch_anyway_warning = config.patch_non_racing()
        warning = "; ".join(filter(None, warnings + [patch_anyway_warning]))  # logged once, with this decision
        if not analysis.recognised or (analysis.cannot_race and not patch_anyway):
            decision, reason, plan = STOOD_ASIDE, analysis.reason if not analysis.recognised else CANNOT_RACE, None
        else:
            decision = PATCHED
            reason = "observing only, upstream release kept" if mode == config.OBSERVE else "layer-0 release replaced"
            plan = PatchPlan(PATCHED_METHODS, analysis, _wrap)
        reason += f" ({warning})" if warning else ""
        record = PatchRecord(class_name(cls), decision, reason, mode, fastdeploy_version(), analysis.features())
        return record, plan, decision == STOOD_ASIDE or bool(warning)

    return PATCHER.patch(cls, decide)


def unpatch_class(cls) -> None:
    """Restore the original methods (tests, A/B runs)."""
    PATCHER.unpatch(cls)


def patch_module(module) -> Optional[PatchRecord]:
    """Patch ``module.CacheMessagerV1`` if the module defines it (post-import hook entry point)."""
    cls = getattr(module, TARGET_CLASS, None)
    if cls is None:
        return None
    return patch_class(cls)
