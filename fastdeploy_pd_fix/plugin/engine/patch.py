"""The engine-side patch: slot-lifecycle notices into the cache-info stream (release rules R8 and R9).

The messagers see two streams (layer-0 kv signals, completed registrations) that cannot tell some engine histories
apart; the engine can. In FastDeploy's engine process, on the prefill role only, this patch puts the notices of
:mod:`fastdeploy_pd_fix.policy.notice` into the same ``put_cache_info`` mailbox as the P- and D-parts, so every
messager rank reads them at the same position of the stream. What is patched, why, and when to remove it is in
:data:`MANIFEST` (``fastdeploy-pd-fix status`` prints it):

* ``ResourceManagerV1.recycle_abort_task(request_id)`` frees an aborted request's slot. Before the original runs, the
  wrapper puts ``ABORT(slot, request_id, emitted_end)``, then ``FENCE(serial)``, as two batches
  (:func:`fastdeploy_pd_fix.adapters.engine_notices.abort_batches`). A put returns once every rank has read the
  previous batch, so the slot's next admission put (a P-part, or an ``ORPHAN``) returns
  only after every rank has read the fence, that is after every rank has handled the abort (R9).
* ``ResourceManagerV1.add_request_in_p(requests)`` hands admitted requests to the scheduler. Those without
  ``disaggregate_info`` had no P-part and are computed without transfer; before the original runs, the wrapper puts
  one batch with ``ORPHAN(slot, request_id, len(prompt_token_ids))`` for each of them.
* ``SplitwiseConnector.__init__`` stores the engine's mailbox and resource manager; the wrapper records the pair
  (:class:`Mailboxes`), because the resource manager has no reference to the mailbox, and, on the prefill role, makes
  the mailbox's first batch start with the engine's announcement
  (:class:`fastdeploy_pd_fix.adapters.engine_notices.AnnouncedPut`): every messager then logs, at its first read,
  whether the engine puts notices.

Each class is patched only when :func:`fastdeploy_pd_fix.config.engine_notices` is on (plugin on, ordered mode,
``FD_PD_FIX_ENGINE_NOTICES`` not off) and :func:`check_target` recognises it; otherwise it is left untouched, with
one log line. A wrapper never breaks the engine: whatever goes wrong in our part is logged (counted per kind) and the
original runs; no notice is sent then (without the engine's announcement the messagers release by upstream's rule,
release rule 10).

FastDeploy facts this relies on (read in public FastDeploy code; store ids of the ``search`` tool):

* ``resource_manager_v1.py`` (store id 56534741536) and ``Request`` (store id 55071290549): what
  :mod:`fastdeploy_pd_fix.adapters.engine_notices` reads (the notices' rules live there, shared with ``make-patch``);
  ``recycle_abort_task`` frees the slot under ``self.lock``; ``add_request_in_p`` appends to ``running``.
* ``splitwise_connector.py`` (store id 55108248927): ``__init__`` sets ``self.engine_worker_queue`` and
  ``self.resource_manager``; ``send_cache_info_to_messager`` skips tasks without ``disaggregate_info`` and puts the
  others with ``self.engine_worker_queue.put_cache_info``. Older releases take another argument list (store id
  54642821048), so the wrapper reads the attributes, not the arguments.
* ``EngineWorkerQueue.put_cache_info`` (store id 18481370361): under ``lock_info``, waits until every client has
  read the previous batch, then replaces it and returns (it does not wait for the new batch to be read).

Not confirmed: that a scheduled chunk always runs on the GPU (``emitted_end`` is exact only then); that no caller of
``recycle_abort_task`` holds a lock the messagers need (the two puts block the calling thread until every rank has
read); ``ResourceManagerV2`` (store id 59711216585) subclasses ``ResourceManagerV1`` and admits through
``super().add_request_in_p``, so the wrappers on V1's methods run for it too (tested on a subclass model), but what
it does to slots outside V1's methods is not announced; preemption on a prefill instance
(``reschedule_preempt_task``) is not announced.
"""

from __future__ import annotations

import functools
import inspect
import logging
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Callable, Dict, List, Mapping, Optional, Tuple

from fastdeploy_pd_fix import __version__, config
from fastdeploy_pd_fix.adapters.engine_notices import (
    FENCE_SERIALS,
    PREFILL_ROLE,
    AnnouncedPut,
    abort_batches,
    orphan_batch,
    splitwise_role,
)
from fastdeploy_pd_fix.adapters.messager_log import CountSummary
from fastdeploy_pd_fix.analysis import CANNOT_RACE, analyse_source
from fastdeploy_pd_fix.plugin import LOG_PREFIX
from fastdeploy_pd_fix.plugin.patching import (
    PATCHED,
    RECORDS,
    STOOD_ASIDE,
    ClassPatcher,
    PatchInfo,
    PatchPlan,
    PatchRecord,
    class_name,
    fastdeploy_version,
)
from fastdeploy_pd_fix.policy.notice import ABORT, FENCE, NOTICE_KEY, decode
from fastdeploy_pd_fix.target import (
    CONNECTOR_CLASS,
    CONNECTOR_MAILBOX,
    CONNECTOR_METHODS,
    CONNECTOR_MODULE,
    CONNECTOR_RESOURCE_MANAGER,
    MAILBOX_PUT,
    RESOURCE_MANAGER_CLASS,
    RESOURCE_MANAGER_METHODS,
    RESOURCE_MANAGER_MODULE,
    SCRIPT_PATH,
    UPSTREAMED_PACKAGE,
)

logger = logging.getLogger("fastdeploy_pd_fix")

#: The class attribute a patched engine class carries: its :class:`~fastdeploy_pd_fix.plugin.patching.PatchState`.
STATE_ATTRIBUTE = "_fd_pd_fix_engine_state"
PATCHER = ClassPatcher(STATE_ATTRIBUTE)
#: The attribute a connector's resource manager gets: the mailbox that connector puts into.
MAILBOX_ATTRIBUTE = "_fd_pd_fix_mailbox"
#: Source text that shows a class already announces slot lifecycles itself (the notice marker key, or the package
#: ``make-patch`` adds to FastDeploy).
UPSTREAM_MARKERS = (NOTICE_KEY, UPSTREAMED_PACKAGE)
#: Who announces engine notices in the stream (the messagers log it).
ANNOUNCER = f"fastdeploy_pd_fix {__version__}"

ENGINE_REMOVE_WHEN = "the running FastDeploy announces aborted and transfer-less slot occupancies itself"
ENGINE_DETAILS = (
    "only when FD_PD_FIX is on, FD_PD_FIX_MODE is ordered and FD_PD_FIX_ENGINE_NOTICES is not off; puts nothing on "
    "other roles (nobody may read the mailbox there); any error in the plugin's part is logged once and the "
    "original runs without a notice (without the announcement the messagers release by upstream's rule)"
)

MANIFEST = (
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


#: What the engine side did in this process, one line a minute at most when it changed.
SUMMARY = CountSummary(logger.info, LOG_PREFIX)
_warned: Dict[str, int] = {}
_warned_lock = threading.Lock()


def warn_counted(key: str, message: str) -> None:
    """Log ``message`` the 1st, 10th, 100th, ... time ``key`` comes up in this process, with the count: a wrapper runs
    on every admission, so every time would flood the engine's log, and only once would hide weeks of lost notices."""
    with _warned_lock:
        count = _warned[key] = _warned.get(key, 0) + 1
    if count == 10 ** (len(str(count)) - 1):
        logger.warning(
            f"{LOG_PREFIX}{message} ({count} time{'s' if count > 1 else ''} in this process; logged again "
            f"at the {10 * count}th)"
        )


class Mailboxes:
    """The cache-info mailboxes of this process's splitwise connectors, and the resource manager each one serves."""

    def __init__(self):
        self._lock = threading.Lock()
        self._mailboxes: List[object] = []

    def capture(self, connector) -> None:
        """Record ``connector``'s mailbox, once its ``__init__`` has run. Never raises."""
        try:
            mailbox = getattr(connector, CONNECTOR_MAILBOX, None)
            if not callable(getattr(mailbox, MAILBOX_PUT, None)):
                warn_counted(
                    "connector without mailbox",
                    f"{type(connector).__name__} has no {CONNECTOR_MAILBOX}.{MAILBOX_PUT}: engine notices not sent",
                )
                return
            with self._lock:
                if not any(known is mailbox for known in self._mailboxes):
                    self._mailboxes.append(mailbox)
            resource_manager = getattr(connector, CONNECTOR_RESOURCE_MANAGER, None)
            if resource_manager is not None:
                try:
                    setattr(resource_manager, MAILBOX_ATTRIBUTE, mailbox)
                except (AttributeError, TypeError):  # no instance dict: the process's only mailbox serves it
                    pass
            put = getattr(mailbox, MAILBOX_PUT)
            if splitwise_role(resource_manager) == PREFILL_ROLE and not isinstance(put, AnnouncedPut):
                setattr(mailbox, MAILBOX_PUT, AnnouncedPut(put, ANNOUNCER))
        except Exception as error:
            warn_counted(f"capture {type(error).__name__}", f"mailbox not captured from the connector: {error!r}")

    def mailbox_for(self, resource_manager):
        """The mailbox of the connector built with ``resource_manager``; else the process's only one; else None
        (no connector built yet, or several and none built with it)."""
        mailbox = getattr(resource_manager, MAILBOX_ATTRIBUTE, None)
        if mailbox is not None:
            return mailbox
        with self._lock:
            return self._mailboxes[0] if len(self._mailboxes) == 1 else None

    def forget(self) -> None:
        """Forget every mailbox, and give each its own ``put_cache_info`` back."""
        with self._lock:
            for mailbox in self._mailboxes:
                put = getattr(mailbox, MAILBOX_PUT, None)
                if isinstance(put, AnnouncedPut):
                    setattr(mailbox, MAILBOX_PUT, put.__wrapped__)
            self._mailboxes.clear()


MAILBOXES = Mailboxes()


def _mailbox_or_warn(resource_manager):
    mailbox = MAILBOXES.mailbox_for(resource_manager)
    if mailbox is None:
        warn_counted(
            "no mailbox",
            f"no cache-info mailbox known for this {type(resource_manager).__name__} (no {CONNECTOR_CLASS} built with "
            "it): engine notices not sent",
        )
    return mailbox


def _put(resource_manager, batches) -> None:
    """Put each batch in order (each put waits until every rank has read the previous batch), then log them."""
    if splitwise_role(resource_manager) is None:
        warn_counted("no role", "splitwise role not found on the resource manager: engine notices not sent")
    if not batches:
        return
    mailbox = _mailbox_or_warn(resource_manager)
    if mailbox is None:
        return
    for batch in batches:
        getattr(mailbox, MAILBOX_PUT)(batch)
    for notice in (decode(item) for batch in batches for item in batch):
        SUMMARY.add(f"{notice.kind} notices put")
        if notice.kind != FENCE:
            logger.info(
                f"{LOG_PREFIX}engine notice put: {notice.describe()}" + (", fenced" if notice.kind == ABORT else "")
            )


def announce_abort(resource_manager, request_id) -> None:
    """Put ``ABORT`` then ``FENCE`` if the original ``recycle_abort_task`` is about to free ``request_id``'s slot."""
    _put(resource_manager, abort_batches(resource_manager, request_id, next(FENCE_SERIALS)))


def announce_orphans(resource_manager, requests) -> None:
    """Put one batch with an ``ORPHAN`` for each request of ``requests`` without ``disaggregate_info``."""
    batch = orphan_batch(resource_manager, requests)
    _put(resource_manager, [batch] if batch else [])


def announcing_first(announce: Callable[[object, object], None]) -> Callable:
    """A wrapper factory for a method ``(self, argument, ...)``: ``announce(self, argument)`` runs first, guarded
    (whatever goes wrong in it is logged, counted per kind: :func:`warn_counted`), then the original, always."""

    def make_wrapper(original):
        where = original.__name__

        @functools.wraps(original)
        def wrapper(self, argument, *args, **kwargs):
            try:
                announce(self, argument)
            except Exception as error:  # never break the engine because of the plugin
                SUMMARY.add(f"{where} notices not sent")
                warn_counted(
                    f"{where} {type(error).__name__}",
                    f"{where}: notice not sent, the original runs: {error!r}",
                )
            return original(self, argument, *args, **kwargs)

        wrapper.__fd_pd_fix__ = True
        return wrapper

    return make_wrapper


def make_connector_init(original):
    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        MAILBOXES.capture(self)

    __init__.__fd_pd_fix__ = True
    return __init__


@dataclass(frozen=True)
class EngineTarget:
    """One engine class: where it lives, the methods we wrap (with their leading parameters) and the wrappers."""

    module: str
    class_name: str
    methods: Mapping[str, Tuple[str, ...]]
    factories: Mapping[str, Callable]


RESOURCE_MANAGER = EngineTarget(
    RESOURCE_MANAGER_MODULE,
    RESOURCE_MANAGER_CLASS,
    MappingProxyType(RESOURCE_MANAGER_METHODS),
    MappingProxyType(
        {
            "recycle_abort_task": announcing_first(announce_abort),
            "add_request_in_p": announcing_first(announce_orphans),
        }
    ),
)
CONNECTOR = EngineTarget(
    CONNECTOR_MODULE,
    CONNECTOR_CLASS,
    MappingProxyType(CONNECTOR_METHODS),
    MappingProxyType({"__init__": make_connector_init}),
)
TARGETS = {target.module: target for target in (RESOURCE_MANAGER, CONNECTOR)}


def patch_state(cls):
    """The :class:`~fastdeploy_pd_fix.plugin.patching.PatchState` of ``cls`` (its ``context`` the
    :class:`EngineTarget`), or None when ``cls`` itself is not patched."""
    return PATCHER.state(cls)


def notices_off_reason() -> Optional[str]:
    """Why the engine sends no notices in this environment; None when it does."""
    if config.engine_notices()[0]:
        return None
    if config.switched_off():
        return f"{config.ENV_SWITCH}={config.switch_value()} switches the plugin off"
    mode = config.selected_mode()[0]
    if mode != config.ORDERED:
        return f"{config.ENV_MODE}={mode}: only ordered mode reads notices"
    return f"{config.ENV_ENGINE_NOTICES} is off"


def check_target(cls, target: EngineTarget) -> Optional[str]:
    """Why ``cls`` is not recognised as ``target``, or None: each method is a Python function with the expected
    leading parameters, and the class source (needed to tell) does not show notices of its own."""
    for name, leading in target.methods.items():
        method = getattr(cls, name, None)
        if not inspect.isfunction(method):
            return f"{name} is missing or not a Python function"
        parameters = tuple(inspect.signature(method).parameters)
        if parameters[: len(leading)] != leading:
            return f"{name}({', '.join(parameters)}) does not start with ({', '.join(leading)})"
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError) as error:
        return f"source not readable, so no telling whether it announces slot lifecycles itself: {error!r}"
    marker = next((marker for marker in UPSTREAM_MARKERS if marker in source), None)
    if marker is not None:
        return f"it already announces slot lifecycles (its source mentions {marker})"
    return None


def messager_cannot_race(cls) -> bool:
    """Whether the release's own ``cache_messager.py``, beside the engine module of ``cls`` in the same FastDeploy
    package (read, not imported), reports every registration, so that its engine waits and nothing races: its
    messagers stand aside (:attr:`fastdeploy_pd_fix.analysis.TargetAnalysis.cannot_race`), and so does the engine
    side, whose notices nobody would read. False when the file cannot be found or read (not knowing is not a
    reason to stand aside)."""
    module_file = getattr(sys.modules.get(cls.__module__), "__file__", None)
    depth = len(cls.__module__.split("."))
    if not module_file or depth < 2:
        return False
    package = Path(module_file).resolve().parents[depth - 2]
    return _script_cannot_race(package.parent / SCRIPT_PATH)


@functools.lru_cache(maxsize=None)
def _script_cannot_race(script: Path) -> bool:
    """:func:`messager_cannot_race` of one ``cache_messager.py``, read and parsed once per process (the resource
    manager and the connector of one package both ask)."""
    try:
        return analyse_source(script.read_text(encoding="utf-8")).cannot_race
    except (OSError, UnicodeDecodeError):
        return False


def patch_engine_class(cls, target: EngineTarget) -> PatchRecord:
    """Wrap ``target``'s methods of ``cls`` when notices are on and ``cls`` is recognised; otherwise leave it
    untouched. Idempotent; never raises; logs one decision line."""
    mode, mode_warning = config.selected_mode()
    warning = "; ".join(filter(None, [config.switch()[1], mode_warning, config.engine_notices()[1]]))

    def decide():
        off = notices_off_reason()
        try:
            unrecognised = None if off else check_target(cls, target)
            if not (off or unrecognised or config.patch_non_racing()[0]) and messager_cannot_race(cls):
                off = f"its cache messagers stand aside: {CANNOT_RACE}"
        except Exception as error:  # an unexpected shape must not break FastDeploy: stand aside
            unrecognised = f"check failed: {error!r}"
        reason = off or unrecognised or "engine notices patched in (" + ", ".join(target.methods) + ")"
        decision = STOOD_ASIDE if off or unrecognised else PATCHED
        features = "engine notices " + ("off" if off else "on (prefill role only)")
        record = PatchRecord(
            class_name(cls),
            decision,
            reason + (f" ({warning})" if warning else ""),
            mode,
            fastdeploy_version(),
            features,
        )
        plan = None
        if decision == PATCHED:
            plan = PatchPlan(tuple(target.methods), target, lambda state: _wrap(target, state.originals))
        return record, plan, bool(unrecognised or warning)

    return PATCHER.patch(cls, decide)


def _wrap(target: EngineTarget, originals) -> Dict[str, Callable]:
    return {method: factory(originals[method]) for method, factory in target.factories.items()}


def unpatch_engine_class(cls) -> None:
    """Restore the original methods (tests, A/B runs); unpatching the connector forgets its captured mailboxes."""
    state = PATCHER.unpatch(cls)
    if state is not None and state.context is CONNECTOR:
        MAILBOXES.forget()


def patch_engine_module(module) -> Optional[PatchRecord]:
    """Post-import hook entry point: patch the target class of ``module`` (one of the engine modules)."""
    target = TARGETS.get(getattr(module, "__name__", None))
    if target is None:
        return None
    cls = getattr(module, target.class_name, None)
    if not isinstance(cls, type):
        record = PatchRecord(
            f"{target.module}.{target.class_name}", STOOD_ASIDE, "no such class", config.selected_mode()[0], "", ""
        )
        RECORDS.append(record)
        logger.warning(record.describe())
        return record
    return patch_engine_class(cls, target)
