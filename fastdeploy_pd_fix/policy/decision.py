"""What the release policy decides beside its batches, as typed values: drops, and decisions with one rendering each.

:class:`~.release.OrderedRelease` reports in :attr:`~.release.Released.drops` every layer-0 task it drops
(:class:`Drop`), and in :attr:`~.release.Released.decisions` every part or notice it does not count and every
occupant it closes before its end (release rules 2, 4 and 8). A :class:`Decision` says what was decided
(:attr:`Decision.kind`, one of :data:`DECISION_KINDS`) and about what (slot, request, chunk, token positions);
:meth:`Decision.describe` is its log line, and :func:`parse_decision` reads such a line back: both are made from one
template per kind (:data:`TEMPLATES`), so a log reader gets the very value the policy reported.

Standard library only, relative imports only (``make-patch`` copies this package into FastDeploy).
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

#: A registration not counted: its request id was counted before (rule 2: a repeated or late cache-info part).
COUNTED_BEFORE = "counted_before"
#: An orphan notice not counted: its request id was counted before (rules 2, 8).
ORPHAN_COUNTED_BEFORE = "orphan_counted_before"
#: A started occupant closed because a chunk on its slot does not continue it: aborted unannounced (rule 4).
ABANDONED = "abandoned"
#: An aborted occupant closed where its abort notice said it stopped: the chunk at hand is a later request's (rule 4).
CLOSED_AT_ABORT = "closed_at_abort"
#: An abort notice naming another slot than the one its request occupies: it is applied to the request (rule 8).
ABORT_ON_OTHER_SLOT = "abort_on_other_slot"
#: An abort notice whose ``emitted_end`` is before the tokens already bound to its request: raised to them (rule 8).
ABORT_BEFORE_BOUND = "abort_before_bound"
DECISION_KINDS = (
    COUNTED_BEFORE,
    ORPHAN_COUNTED_BEFORE,
    ABANDONED,
    CLOSED_AT_ABORT,
    ABORT_ON_OTHER_SLOT,
    ABORT_BEFORE_BOUND,
)

#: What the request a decision is about was at that moment (:attr:`Decision.occupant`): a registered request, an
#: orphan (announced computed without transfer), a dead request (announced aborted before it registered), or a
#: request no longer open (repeats only).
REGISTERED_REQUEST, ORPHAN_REQUEST, DEAD_REQUEST, CLOSED_REQUEST = "registered", "orphan", "dead", "closed"

#: The log line of each kind. ``{who}`` is the occupant (:data:`WHO`), ``{state}`` what a request counted before is
#: (:data:`STATE`); every other field is the :class:`Decision` field of that name (the chunk as its two ends).
TEMPLATES: Dict[str, str] = {
    COUNTED_BEFORE: (
        "registration for slot {slot} ignored: request {request_id} was counted before and is {state} (a repeated "
        "or late cache-info part)"
    ),
    ORPHAN_COUNTED_BEFORE: "orphan notice for request {request_id} ignored: it was counted before",
    ABANDONED: (
        "{who} on slot {slot} abandoned after {last_end} of {run_end} tokens: chunk [{chunk_offset}, {chunk_end}) "
        "does not continue it (aborted, its slot reused)"
    ),
    CLOSED_AT_ABORT: (
        "{who} on slot {slot} closed at {last_end} of emitted_end={run_end}: chunk [{chunk_offset}, {chunk_end}) is a "
        "later request's"
    ),
    ABORT_ON_OTHER_SLOT: "abort notice for request {request_id} names slot {named_slot}; it occupies slot {slot}",
    ABORT_BEFORE_BOUND: (
        "abort notice for request {request_id}: emitted_end={run_end} is before the {last_end} tokens already bound "
        "to it"
    ),
}
#: An occupant as the lines name it, per :attr:`Decision.occupant` (also in drop reasons, :func:`describe_occupant`).
WHO = {
    REGISTERED_REQUEST: "request {request_id}",
    ORPHAN_REQUEST: "orphan {request_id}",
    DEAD_REQUEST: "request {request_id} aborted before registering",
}
#: What a request counted before is, per :attr:`Decision.occupant`.
STATE = {
    REGISTERED_REQUEST: "still open",
    CLOSED_REQUEST: "already closed",
    ORPHAN_REQUEST: "announced as an orphan",
    DEAD_REQUEST: "announced as aborted before registering",
}


@dataclass(frozen=True)
class Drop:
    """A layer-0 task that was abandoned instead of released, and why."""

    slot: int
    prefilled_token_num: int
    reason: str


@dataclass(frozen=True)
class Decision:
    """One decision of the policy other than a batch or a drop. A field its kind's line does not name is None (or
    ``""``): what the line says is all there is, so that :func:`parse_decision` gives back the same value."""

    kind: str
    request_id: str
    #: The slot the request occupies (for :data:`COUNTED_BEFORE`: the registration's slot).
    slot: Optional[int] = None
    #: The task at hand, ``(chunk_offset, prefilled_token_num)``: the chunk ``[chunk_offset, prefilled_token_num)``.
    chunk: Optional[Tuple[int, int]] = None
    #: End of the last chunk bound to the request (None: none).
    last_end: Optional[int] = None
    #: Where the request's chunks end at the latest: its ``need_prefill_tokens``, or the ``emitted_end`` its abort
    #: notice gives (None: nothing emitted).
    run_end: Optional[int] = None
    #: :data:`ABORT_ON_OTHER_SLOT`: the slot the notice names.
    named_slot: Optional[int] = None
    #: What the request was (:data:`REGISTERED_REQUEST`, :data:`ORPHAN_REQUEST`, :data:`DEAD_REQUEST`,
    #: :data:`CLOSED_REQUEST`); "" when the line does not say.
    occupant: str = ""

    def __post_init__(self):
        if self.kind not in TEMPLATES:
            raise ValueError(f"unknown decision kind {self.kind!r}; expected one of {', '.join(DECISION_KINDS)}")
        template = TEMPLATES[self.kind]
        occupants = WHO if "{who}" in template else STATE if "{state}" in template else {"": None}
        if self.occupant not in occupants:
            raise ValueError(f"{self.kind} decision: occupant must be one of {list(occupants)}, got {self.occupant!r}")

    def describe(self) -> str:
        """The log line of this decision."""
        chunk_offset, chunk_end = self.chunk if self.chunk is not None else (None, None)
        return TEMPLATES[self.kind].format(
            request_id=self.request_id,
            slot=self.slot,
            chunk_offset=chunk_offset,
            chunk_end=chunk_end,
            last_end=self.last_end,
            run_end=self.run_end,
            named_slot=self.named_slot,
            who=describe_occupant(self.occupant, self.request_id) if self.occupant in WHO else None,
            state=STATE.get(self.occupant),
        )


def describe_occupant(occupant: str, request_id: str) -> str:
    """How the lines name a request that is ``occupant`` (:data:`WHO`)."""
    return WHO[occupant].format(request_id=request_id)


_INT, _OPTIONAL_INT, _TEXT = r"\d+", r"\d+|None", r".*"
#: What each template field matches in a line.
_FIELD_PATTERNS = {
    "request_id": _TEXT,
    "who": _TEXT,
    "state": "|".join(re.escape(text) for text in STATE.values()),
    "slot": _INT,
    "named_slot": _INT,
    "chunk_offset": _INT,
    "chunk_end": _INT,
    "last_end": _OPTIONAL_INT,
    "run_end": _OPTIONAL_INT,
}


def _line_pattern(template: str) -> "re.Pattern[str]":
    """The regular expression of the lines ``template`` renders: its text as is, each field a named group."""
    parts = []
    for literal, name, _, _ in string.Formatter().parse(template):
        parts.append(re.escape(literal))
        if name is not None:
            parts.append(f"(?P<{name}>{_FIELD_PATTERNS[name]})")
    return re.compile("".join(parts), re.DOTALL)


_LINE_PATTERNS = {kind: _line_pattern(template) for kind, template in TEMPLATES.items()}
_WHO_PATTERNS = {occupant: _line_pattern(who) for occupant, who in WHO.items()}
_OCCUPANT_OF_STATE = {text: occupant for occupant, text in STATE.items()}


def _number(text: Optional[str]) -> Optional[int]:
    return None if text in (None, "None") else int(text)


def _occupant_named(who: str) -> Optional[Tuple[str, str]]:
    """``(occupant, request_id)`` of an occupant as :func:`describe_occupant` names it, or None."""
    # "request X aborted before registering" is tried before "request X".
    for occupant in (DEAD_REQUEST, ORPHAN_REQUEST, REGISTERED_REQUEST):
        match = _WHO_PATTERNS[occupant].fullmatch(who)
        if match is not None:
            return occupant, match["request_id"]
    return None


def parse_decision(line: str) -> Optional[Decision]:
    """The decision whose :meth:`Decision.describe` is ``line`` (the text after the log prefix), or None."""
    for kind, pattern in _LINE_PATTERNS.items():
        match = pattern.fullmatch(line)
        if match is None:
            continue
        fields = match.groupdict()
        occupant, request_id = _OCCUPANT_OF_STATE.get(fields.get("state"), ""), fields.get("request_id")
        if "who" in fields:
            named = _occupant_named(fields["who"])
            if named is None:
                continue
            occupant, request_id = named
        chunk = None
        if "chunk_offset" in fields:
            chunk = (int(fields["chunk_offset"]), int(fields["chunk_end"]))
        return Decision(
            kind,
            request_id,
            slot=_number(fields.get("slot")),
            chunk=chunk,
            last_end=_number(fields.get("last_end")),
            run_end=_number(fields.get("run_end")),
            named_slot=_number(fields.get("named_slot")),
            occupant=occupant,
        )
    return None
