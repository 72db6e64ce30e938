"""Scenarios for the stand-in: two rank-invariant streams and the order in which each rank's threads see them.

A scenario is a plain dict (written to JSON for the rank processes):

* ``signals``: layer-0 kv signals, each a list of ``[slot, chunk_token_offset, current_chunk_len]``;
* ``registrations``: ``get_cache_info`` reads, each a list of ``{"request_id", "slot", "need_prefill_tokens"}``
  (optional ``"parts"``: ``"prefill"`` or ``"decode"`` for one cache-info half only);
* ``schedules``: per rank, the order of ``sig<i>`` / ``reg<j>`` events (ranks beyond the list repeat the last one),
  with the send-thread controls ``stall`` / ``hold`` / ``go`` / ``drain`` where needed; ``reg<j>@barrier``: the
  next event may come once the read passed its ``cache_info_barrier``, before its tasks are stored;
* ``expected_without_fix``: outcome per release variant when no plugin is active (the same for every #7724 and
  kv-signal op variant), with the reason in ``why``;
* optional, for the engine's slot lifecycle: ``aborted`` (request ids the engine aborts) and ``owners`` (per signal,
  the request each task belongs to: the ground truth the send thread is checked against).

Each scenario declares its engine history (:mod:`fastdeploy_pd_fix.engine_history`) and its per-rank schedules;
``signals``, ``registrations`` (notices included) and ``owners`` are derived from the history.
Every rank must see every event once and each stream in its own order; :func:`validate_scenario` checks that.
s0-s3 are the race scenarios; l1-l13 the slot-lifecycle ones (:mod:`fastdeploy_pd_fix.standin.lifecycle`).
"""

import copy

from fastdeploy_pd_fix.engine_history.occupancy import prefill_request
from fastdeploy_pd_fix.engine_history.scenario import standin_streams
from fastdeploy_pd_fix.engine_history.streams import build
from fastdeploy_pd_fix.standin.fastdeploy.pd_fix_standin.contract import (
    CONTROLS,
    NOTICE_ENTRY,
    PARTS,
    RELEASES,
    is_notice_entry,
    parse_event,
)
from fastdeploy_pd_fix.standin.lifecycle import LIFECYCLE_SCENARIOS

__all__ = ["RELEASES", "SCENARIOS", "parse_event", "resolve_scenario", "validate_scenario"]


def _streams(*requests, signal_slots=None, cache_slots=None):
    """``signals`` and ``registrations`` (one read per request) of requests that start at 0 and complete: signals and
    cache info slot by slot unless ``signal_slots`` / ``cache_slots`` interleave them (see
    :func:`~fastdeploy_pd_fix.engine_history.streams.build`)."""
    return standin_streams(build("", requests, signal_slots, cache_slots), owners=False)


def _one_signal():
    """A and B, one chunk each on slots 0 and 1, in one kv signal; A registers first."""
    return _streams(prefill_request("A", 0, (4,)), prefill_request("B", 1, (4,)), signal_slots=[(0, 1)])


SCENARIOS = {
    "s0": {
        "description": "no race: both requests register before their signal on every rank",
        **_one_signal(),
        "schedules": [["reg0", "reg1", "sig0"], ["reg0", "reg1", "sig0"]],
        "expected_without_fix": {"pre7872": "finished", "7872": "finished", "8034": "finished"},
        "why": "every rank sees the same registered set when the signal arrives, so batches are identical",
    },
    "s1": {
        "description": "the seed (#8034): one signal [A final, B final]; B registers after it on rank 1 only",
        **_one_signal(),
        "schedules": [["reg0", "reg1", "sig0"], ["reg0", "sig0", "reg1"]],
        "expected_without_fix": {"pre7872": "hang", "7872": "hang", "8034": "finished"},
        "why": (
            "pre7872: rank 0 [(A),(B)], rank 1 [(A)] and B dropped; 7872: rank 0 [(A),(B)], rank 1 [(A)] then "
            "[(B)] (begin,finish,finish vs begin,finish,begin,finish); 8034: [(A)],[(B)] on both"
        ),
    },
    "s2": {
        "description": "chunked prefill, early signals: A (need 8) in two chunks; rank 1 sees both before A registers",
        **_streams(prefill_request("A", 0, (4, 8))),
        "schedules": [["reg0", "sig0", "sig1"], ["sig0", "sig1", "reg0"]],
        "expected_without_fix": {"pre7872": "hang", "7872": "hang", "8034": "hang"},
        "why": (
            "rank 0 [(A,4)],[(A,8)] (begin,begin,finish); rank 1 keeps only the latest pending signal: [(A,8)] "
            "(begin,finish) on 7872/8034, nothing at all on pre7872"
        ),
    },
    "s3": {
        "description": "order across requests: A (need 8, two chunks) and B (need 4); B registers first",
        **_streams(
            prefill_request("A", 0, (4, 8)),
            prefill_request("B", 1, (4,)),
            signal_slots=[(0, 1), 0],
            cache_slots=[1, 1, 0, 0],  # B's P-part and D-part, then A's
        ),
        "schedules": [["reg0", "sig0", "reg1", "sig1"], ["reg0", "reg1", "sig0", "sig1"]],
        "expected_without_fix": {"pre7872": "finished", "7872": "hang", "8034": "hang"},
        "why": (
            "7872: rank 0 [(B,4)],[(A,4)],[(A,8)] vs rank 1 [(A,4),(B,4)],[(A,8)]; 8034: rank 0 [(B,4)],[(A,4)],"
            "[(A,8)] vs rank 1 [(A,4)],[(B,4)],[(A,8)]. pre7872 does NOT hang: rank 0 drops A's first chunk and "
            "sends [(B,4)],[(A,8)], rank 1 [(A,4),(B,4)],[(A,8)]; both wait begin,finish,begin,finish. The batch "
            "sequences still differ (invariant 1 is broken), only the barrier counts happen to match"
        ),
    },
}


SCENARIOS.update(LIFECYCLE_SCENARIOS)


#: The keys of a notice entry, per kind.
NOTICE_ENTRY_KEYS = {
    "abort": {NOTICE_ENTRY, "request_id", "slot", "emitted_end"},
    "orphan": {NOTICE_ENTRY, "request_id", "slot", "need_prefill_tokens"},
}


def validate_scenario(scenario):
    """Raise ValueError unless every rank's schedule shows every event once, each stream in its own order."""
    for key in ("signals", "registrations", "schedules"):
        if not isinstance(scenario.get(key), list) or not scenario[key]:
            raise ValueError(f"scenario needs a non-empty list {key!r}")
    for signal in scenario["signals"]:
        for task in signal:
            if len(task) != 3 or not all(isinstance(value, int) and value >= 0 for value in task):
                raise ValueError(f"bad signal task {task!r}: expected [slot, offset, length] of ints >= 0")
    for read in scenario["registrations"]:
        for request in read:
            if is_notice_entry(request):
                keys = NOTICE_ENTRY_KEYS.get(request[NOTICE_ENTRY])
                if keys is None or set(request) != keys:
                    raise ValueError(f"bad notice entry {request!r}: expected keys {sorted(keys or ())}")
                continue
            keys = {"request_id", "slot", "need_prefill_tokens"}
            if not keys <= set(request) <= keys | {"parts"} or request.get("parts", PARTS[0]) not in PARTS:
                raise ValueError(f"bad registration {request!r}")
    owners = scenario.get("owners")
    if owners is not None and [len(tasks) for tasks in owners] != [len(signal) for signal in scenario["signals"]]:
        raise ValueError("owners must name one request (or null) per task of every signal")
    if not all(isinstance(request_id, str) for request_id in scenario.get("aborted", [])):
        raise ValueError("aborted must be a list of request ids")
    expected = {
        "sig": [("sig", index) for index in range(len(scenario["signals"]))],
        "reg": [("reg", index) for index in range(len(scenario["registrations"]))],
    }
    for rank, schedule in enumerate(scenario["schedules"]):
        events = [event for event in map(parse_event, schedule) if event[0] not in CONTROLS]
        for kind, in_order in expected.items():
            if [event for event in events if event[0] == kind] != in_order:
                raise ValueError(f"schedule of rank {rank} {schedule!r}: every {kind} once, in stream order")


def resolve_scenario(scenario):
    """A scenario given by name (key of :data:`SCENARIOS`) or as a dict, as a validated deep copy."""
    if isinstance(scenario, str):
        if scenario not in SCENARIOS:
            raise KeyError(f"unknown scenario {scenario!r}; known: {', '.join(SCENARIOS)}")
        resolved = copy.deepcopy(SCENARIOS[scenario])
        resolved.setdefault("name", scenario)
    else:
        resolved = copy.deepcopy(dict(scenario))
        resolved.setdefault("name", "custom")
    validate_scenario(resolved)
    return resolved
