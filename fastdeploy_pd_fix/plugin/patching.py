"""The one patch state machine of the plugin, and the form of its manifest, for both processes it patches.

A class is either unpatched or patched. :class:`ClassPatcher` takes it from one state to the other: patching asks
the process's decision (``decide``: recognised? switched on?), and only when it says "patched" replaces the methods
it names, keeping the originals in one frozen :class:`PatchState` on the class (also reachable as each wrapper's
``__wrapped__``); unpatching restores them. Both are idempotent and thread-safe, a decision never raises, and every
decision is a :class:`PatchRecord`, logged once and kept in :data:`RECORDS` for ``fastdeploy-pd-fix status``.

Each process documents its patches where they live, as data (:class:`PatchInfo`: what, how, why, upstream PR, when
to remove), vllm-ascend style: :mod:`fastdeploy_pd_fix.plugin.messager.patch` (``CacheMessagerV1`` in each cache
messager process) and :mod:`fastdeploy_pd_fix.plugin.engine.patch` (``ResourceManagerV1`` and
``SplitwiseConnector`` in the engine process). ``fastdeploy-pd-fix status`` prints both manifests.

Switches (read by :mod:`fastdeploy_pd_fix.config`): ``FD_PD_FIX=0`` (or false/off/no) turns everything off (the
start-up hook installs nothing and nothing is patched). ``FD_PD_FIX_MODE`` selects what the patched methods do:
``ordered`` (default) the rank-invariant release; ``upstream`` reproduces #8034 for A/B runs; ``observe`` keeps the
running release's own methods and only adds the batch journal, watchdog and fault injection (to diagnose an unfixed
deployment). ``FD_PD_FIX_ENGINE_NOTICES=0`` leaves the engine side out.
"""

from __future__ import annotations

import logging
import sys
import threading
from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, List, Mapping, Optional, Tuple

from fastdeploy_pd_fix import __version__

logger = logging.getLogger("fastdeploy_pd_fix")

PATCHED, STOOD_ASIDE, ALREADY_PATCHED = "patched", "stood aside", "already patched"


@dataclass(frozen=True)
class PatchInfo:
    """One manifest entry; ``status`` prints ``target``, ``how``, ``upstream`` and ``remove_when``."""

    target: str
    how: str
    why: str
    details: str
    upstream: str
    remove_when: str


@dataclass(frozen=True)
class PatchRecord:
    """The decision taken for one class: logged once, kept for ``status`` and the tests."""

    target: str
    decision: str  # PATCHED, STOOD_ASIDE or ALREADY_PATCHED
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
    """Everything a patch put on a class, as one class attribute: the original methods, the decision record, and
    what the wrappers run on (``context``: the messager's :class:`~fastdeploy_pd_fix.analysis.TargetAnalysis`, or
    the engine class's :class:`~fastdeploy_pd_fix.plugin.engine.patch.EngineTarget`)."""

    originals: Mapping[str, Callable]
    record: PatchRecord
    context: object

    @property
    def mode(self) -> str:
        return self.record.mode


@dataclass(frozen=True)
class PatchPlan:
    """What to put on a class the decision patches: ``wrap(state)`` gives the wrapper of each method of
    ``methods`` (the state holds the originals)."""

    methods: Tuple[str, ...]
    context: object
    wrap: Callable[[PatchState], Mapping[str, Callable]]


#: Every decision of this process, in order.
RECORDS: List[PatchRecord] = []


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


class ClassPatcher:
    """Patch and unpatch classes of one kind; the state of a patched class is its attribute ``state_attribute``."""

    def __init__(self, state_attribute: str):
        self.state_attribute = state_attribute
        self._lock = threading.Lock()

    def state(self, cls) -> Optional[PatchState]:
        """The :class:`PatchState` of ``cls``, or None when ``cls`` itself is not patched."""
        return vars(cls).get(self.state_attribute)

    def patch(self, cls, decide: Callable[[], Tuple[PatchRecord, Optional[PatchPlan], bool]]) -> PatchRecord:
        """Patch ``cls`` as ``decide()`` says: ``(record, plan, warn)``, ``plan`` None to stand aside (the class is
        left untouched), ``warn`` to log the record as a warning rather than as information. Returns the record; a
        patched class gets ``already patched`` and stays as it is."""
        with self._lock:
            state = self.state(cls)
            if state is not None:
                return PatchRecord(state.record.target, ALREADY_PATCHED, "nothing to do", state.mode, "", "")
            record, plan, warn = decide()
            if plan is not None:
                originals = {name: vars(cls).get(name) or getattr(cls, name) for name in plan.methods}
                state = PatchState(MappingProxyType(originals), record, plan.context)
                setattr(cls, self.state_attribute, state)
                for name, wrapper in plan.wrap(state).items():
                    setattr(cls, name, wrapper)
            RECORDS.append(record)
        (logger.warning if warn else logger.info)(record.describe())
        return record

    def unpatch(self, cls) -> Optional[PatchState]:
        """Restore the original methods of ``cls`` (tests, A/B runs); returns the state it had (None: not patched)."""
        with self._lock:
            state = self.state(cls)
            if state is None:
                return None
            for name, method in state.originals.items():
                setattr(cls, name, method)
            delattr(cls, self.state_attribute)
        return state


def class_name(cls) -> str:
    """``module.QualifiedName``, as decision records name a class."""
    return f"{cls.__module__}.{cls.__qualname__}"
