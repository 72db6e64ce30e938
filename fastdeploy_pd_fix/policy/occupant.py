"""One request on one slot, as the release policy knows it from the cache-info stream (release rules 2-4, 8).

:class:`~.release.OrderedRelease` keeps, per slot, the list of its :class:`Occupant` objects and binds each layer-0
task to the first open one that it continues.

Standard library only, relative imports only (``make-patch`` copies this package into FastDeploy).
"""

from __future__ import annotations

from typing import Optional, Tuple

from .decision import DEAD_REQUEST, ORPHAN_REQUEST, REGISTERED_REQUEST, Decision, describe_occupant


class Occupant:
    """One request on one slot, as far as the cache-info stream tells (rules 2-4, 8): registered, or announced by the
    engine as aborted before it registered (*dead*) or as computed without transfer (*orphan*).

    ``registration`` is the :class:`~.release.Registration` it registered with (None: announced only); its tasks
    are bound to it (rule 7)."""

    __slots__ = ("request_id", "registration", "need", "orphan", "aborted", "emitted_end", "last_end", "abandoned")

    def __init__(self, request_id: str, registration=None, need: Optional[int] = None):
        self.request_id = request_id
        self.registration = registration
        self.need = need if registration is None else registration.need_prefill_tokens  # None: dead, need unknown
        self.orphan = False
        self.aborted = False
        self.emitted_end: Optional[int] = None  # aborted: end of the last chunk the engine emitted (None: none)
        self.last_end: Optional[int] = None  # end of the last chunk bound to it; None: not started
        self.abandoned = False

    @property
    def run_end(self) -> Optional[int]:
        """Where its chunks end at the latest: its need, or what it emitted before its abort (None: nothing)."""
        return self.emitted_end if self.aborted else self.need

    @property
    def closed(self) -> bool:
        return self.abandoned or (self.aborted and self.emitted_end is None) or self.last_end == self.run_end

    @property
    def state(self) -> str:
        """What it is, as decisions name it: a registered request, an orphan or a dead request."""
        if self.orphan:
            return ORPHAN_REQUEST
        return DEAD_REQUEST if self.registration is None else REGISTERED_REQUEST

    def describe(self) -> str:
        return describe_occupant(self.state, self.request_id)

    def closed_early(self, kind: str, slot: int, task: Tuple[int, int, int]) -> Decision:
        """The decision (rule 4, ``kind``) to close it on ``slot`` before its end: ``task`` does not continue it."""
        _, chunk_offset, end = task
        return Decision(
            kind,
            self.request_id,
            slot,
            chunk=(chunk_offset, end),
            last_end=self.last_end,
            run_end=self.run_end,
            occupant=self.state,
        )

    def __getstate__(self):
        return tuple(getattr(self, name) for name in self.__slots__)

    def __setstate__(self, state):
        for name, value in zip(self.__slots__, state):
            setattr(self, name, value)
