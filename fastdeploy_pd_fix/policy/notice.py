"""Slot-lifecycle notices: what the engine tells every messager rank through the cache-info stream.

The two streams a messager sees (layer-0 kv signals, completed registrations) cannot tell some engine histories apart
(a request aborted before its first chunk and the slot's next request; a request computed without registering). The
engine can: the plugin's engine-side patch puts a notice into the same ``put_cache_info`` mailbox as the P- and
D-parts, so every rank reads it at the same position of the stream (release rules 8 and 9):

``abort``  ``(slot, request_id, emitted_end)``: the engine freed the request's slot without a completed transfer;
           ``emitted_end`` is the end of its last chunk whose layer-0 kv signal was or will be emitted (None: none).
``orphan`` ``(slot, request_id, need_prefill_tokens)``: the request is computed on the slot without a transfer.
``fence``  nothing: put right after an ``abort``, so that the engine's next put (the slot's next request) returns
           only after every rank has read the fence, that is after every rank has handled the abort.
``engine`` ``(announcer)``: the first item of the engine's first put, so that every rank knows, at the same stream
           position, whether the engine puts notices at all (:class:`.engine_notices.AnnouncedPut`).

On the wire a notice is a cache-info item (a dict) carrying :data:`NOTICE_KEY`. Its ``request_id`` is a name of its
own (:func:`item_request_id`), so that a messager without the plugin, which stores any unknown item as a D-part
(``cache_info[request_id] = item``), neither fails on it nor mixes it up with the request it is about.

Standard library only, relative imports only (``make-patch`` copies this package into FastDeploy).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

#: The marker key of a notice item; its value is the notice format version.
NOTICE_KEY = "fastdeploy_pd_fix_notice"
NOTICE_VERSION = 1
ABORT, ORPHAN, FENCE, ENGINE = "abort", "orphan", "fence", "engine"
NOTICE_KINDS = (ABORT, ORPHAN, FENCE, ENGINE)
#: Kinds without a slot or a value.
MARKER_KINDS = (FENCE, ENGINE)


@dataclass(frozen=True)
class Notice:
    """One slot-lifecycle notice. ``value`` is ``emitted_end`` (abort, None: nothing emitted) or
    ``need_prefill_tokens`` (orphan); a fence has no slot, value, and only a serial as ``request_id``; an engine
    announcement neither, and the announcer's name as ``request_id``."""

    kind: str
    request_id: str
    slot: Optional[int] = None
    value: Optional[int] = None

    def __post_init__(self):
        if self.kind not in NOTICE_KINDS:
            raise ValueError(f"unknown notice kind {self.kind!r}; expected one of {', '.join(NOTICE_KINDS)}")
        if not isinstance(self.request_id, str) or not self.request_id:
            raise ValueError(f"{self.kind} notice: request_id must be a non-empty string, got {self.request_id!r}")
        if self.kind in MARKER_KINDS:
            if self.slot is not None or self.value is not None:
                raise ValueError(f"a {self.kind} notice has no slot and no value")
            return
        _check_count(f"{self.kind} notice slot", self.slot)
        if self.kind == ORPHAN or self.value is not None:
            _check_count(f"{self.kind} notice value", self.value)
        if self.kind == ORPHAN and self.value == 0:
            raise ValueError("orphan notice: need_prefill_tokens must be positive")

    def describe(self) -> str:
        if self.kind == FENCE:
            return f"fence {self.request_id}"
        if self.kind == ENGINE:
            return f"engine notices announced by {self.request_id}"
        what = "emitted_end" if self.kind == ABORT else "need_prefill_tokens"
        return f"{self.kind} of request {self.request_id} on slot {self.slot} ({what}={self.value})"


def _check_count(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")


def abort_notice(slot: int, request_id: str, emitted_end: Optional[int]) -> Notice:
    return Notice(ABORT, str(request_id), slot, emitted_end)


def orphan_notice(slot: int, request_id: str, need_prefill_tokens: int) -> Notice:
    return Notice(ORPHAN, str(request_id), slot, need_prefill_tokens)


def fence_notice(serial) -> Notice:
    """A fence; ``serial`` (anything with a ``str``) only makes its item's request_id unique."""
    return Notice(FENCE, str(serial))


def engine_notice(announcer: str) -> Notice:
    """The engine side's announcement; ``announcer`` names it (the plugin and its version, or FastDeploy's own)."""
    return Notice(ENGINE, str(announcer))


def item_request_id(notice: Notice) -> str:
    """The ``request_id`` of the notice's cache-info item: never a real request's id."""
    return f"{NOTICE_KEY}:{notice.kind}:{notice.request_id}"


def encode(notice: Notice) -> dict:
    """The cache-info item (a plain dict, as ``put_cache_info`` carries) for ``notice``."""
    return {
        "request_id": item_request_id(notice),
        NOTICE_KEY: NOTICE_VERSION,
        "kind": notice.kind,
        "target_request_id": notice.request_id,
        "slot": notice.slot,
        "value": notice.value,
    }


def is_notice(item) -> bool:
    """Whether a cache-info item is a notice (whatever its version or shape)."""
    return isinstance(item, Mapping) and NOTICE_KEY in item


def decode(item) -> Notice:
    """The notice an item carries; ValueError when it is not one this version understands."""
    if not is_notice(item):
        raise ValueError(f"not a notice: {item!r}")
    version = item[NOTICE_KEY]
    if version != NOTICE_VERSION:
        raise ValueError(f"notice format version {version!r} is not {NOTICE_VERSION} (plugin versions differ)")
    try:
        return Notice(item["kind"], item["target_request_id"], item["slot"], item["value"])
    except KeyError as missing:
        raise ValueError(f"notice lacks {missing}: {item!r}") from None


def split_notices(items: Sequence) -> Tuple[list, List[Notice], List[str]]:
    """``(other items in order, notices in order, problems)`` of one ``get_cache_info`` result. A malformed notice
    is a problem and is left out of both lists: the registration loop must never see a notice item."""
    others, notices, problems = [], [], []
    for item in items:
        if not is_notice(item):
            others.append(item)
            continue
        try:
            notices.append(decode(item))
        except (TypeError, ValueError) as error:
            problems.append(f"notice item ignored: {error}")
    return others, notices, problems
