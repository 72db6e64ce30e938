"""The engine slice's scenarios (:mod:`fastdeploy_pd_fix.tools.engine_slice`): :data:`WAVES` for its mailbox
readers, :data:`SCENARIOS` for real messager ranks, and the groups of them that share one slice run
(:data:`RUN_GROUPS`, :func:`ordered_groups`). Data only, and what decides which scenarios can share a run.

Each scenario's requests are an engine history of the model (:mod:`fastdeploy_pd_fix.engine_history`), handed to the
release's real engine with the stimulus that makes it play that history (:func:`admission`); the slice checks that the
engine did: each request on its slot, computed in its chunks.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

from fastdeploy_pd_fix.engine_history.occupancy import Occupancy, prefill_request

#: Messager ranks reading the mailbox.
NRANKS = 2
#: Tokens of a request the slice's worker computes per step (a longer prompt is prefilled in chunks).
CHUNK_TOKENS = 512


def admission(occupancy: Occupancy, **stimulus) -> dict:
    """One request of a scenario's engine history, as the slice hands it to the scheduler: ``id``, ``prompt`` (its
    need) and ``routed`` (it registers); the history's ``slot`` and the ``ends`` of the chunks it is computed in (its
    emitted ones), which the engine must reproduce (:func:`~fastdeploy_pd_fix.tools.engine_slice.history_problems`:
    the history's slot ``n`` is the ``n``-th lowest slot free when the scenario starts, as the release takes the
    lowest free one); and the ``stimulus`` keys of :data:`SCENARIOS`."""
    return {
        "id": occupancy.request_id,
        "prompt": occupancy.need,
        "routed": occupancy.registers,
        "slot": occupancy.slot,
        "ends": list(occupancy.ends[: occupancy.emitted]),
        **stimulus,
    }


def chunk_ends(prompt: int) -> Tuple[int, ...]:
    """The ends of the chunks the slice's worker computes a prompt in, :data:`CHUNK_TOKENS` per step."""
    return tuple(range(CHUNK_TOKENS, prompt, CHUNK_TOKENS)) + (prompt,)


def routed_request(request_id: str, slot: int, prompt: int, **stimulus) -> dict:
    """A request that registers, computed from token 0 in the worker's chunks, as :func:`admission` hands it over."""
    return admission(prefill_request(request_id, slot, chunk_ends(prompt)), **stimulus)


def orphan_request(request_id: str, slot: int, prompt: int, **stimulus) -> dict:
    """A request computed without registering (no ``disaggregate_info``), as :func:`admission` hands it over."""
    return admission(prefill_request(request_id, slot, chunk_ends(prompt), registers=False), **stimulus)


#: The scenario: each wave is one scheduler batch, taken by whichever prepare thread asks first. Wave 1 admits an
#: orphan and a routed request together (slots 0 and 1); the orphan finishes (it is not transferred), and wave 2's
#: routed request takes its slot, the lowest free one whether or not routed-1's transfer has finished by then.
WAVES = [
    [orphan_request("orphan-1", 0, 70, finish=True), routed_request("routed-1", 1, 100)],
    [routed_request("routed-2", 0, 30)],
]


def variant(scenario: dict, suffix: str, ranks_like: Tuple[int, ...] = (), **changes) -> dict:
    """``scenario`` with ``suffix`` after each of its request ids (ids are unique across scenarios) and ``changes``
    over its keys; ``ranks_like``: on that many ranks, rank ``i`` forced into the order of ``scenario``'s rank
    ``ranks_like[i]``."""
    renamed = {spec["id"]: spec["id"] + suffix for wave in scenario["waves"] for spec in wave}
    waves = [
        [{**spec, **{key: renamed[spec[key]] for key in ("id", "answer_after") if key in spec}} for spec in wave]
        for wave in scenario["waves"]
    ]
    interleaving = [
        [f"reg:{renamed[event[4:]]}" if event.startswith("reg:") else event for event in events]
        for events in scenario.get("interleaving", [])
    ]
    if ranks_like:
        interleaving = [interleaving[rank] for rank in ranks_like]
        changes = {"nranks": len(ranks_like), **changes}
    return {**scenario, "waves": waves, **({"interleaving": interleaving} if interleaving else {}), **changes}


#: Scenarios of real messager ranks (:func:`~fastdeploy_pd_fix.tools.engine_slice.run_with_messagers`), played as
#: episodes of one slice run where they cannot poison each other. Keys (see ``slice_messagers.play_episode``):
#: ``waves`` as above, each request an occupancy of the scenario's engine history (:func:`admission`), optionally with
#: the stimulus ``"holds"`` (an orphan keeping its slot until the transfers of the waves before ended: the next wave
#: with ``after_transfers``, or the episode's end), ``"fails_after_p_part"`` (the release's prepare thread raises
#: right after the request's P-part: its slot and registration leak), ``"answer_after": <request id>`` (the decode
#: instance answers once that request was admitted) or ``"decode": "late-repeat"`` (see ``slice_prefill.LATE_REPEAT``);
#: per wave ``compute_after`` (True: compute what was admitted, default; False: not; a number: that many steps),
#: ``wait_for`` (``"admitted"``, default, or ``"allocated"``: a slot, the request may still wait for its decode answer)
#: and ``after_transfers`` (the earlier waves' transfers end first). A new request takes the lowest free slot, so a
#: wave after a transfer that may have ended needs ``after_transfers`` for its slots to be known. ``interleaving``: per
#: rank (ranks beyond the list repeat its last) the order in which its threads see events, forced by handshakes:
#: ``"reg:<request id>"`` storing that request's registration (only the last registration before a compute may be
#: held: a held rank reads no further put), ``"sig:<n>"`` consuming the episode's n-th layer-0 signal (the worker's
#: n-th step: its kv signals list the slots in order); ``nranks`` (default :data:`NRANKS`); ``environment``: variables
#: of the whole run (scenarios that set one differently cannot share a run); ``deadline_s`` (default
#: ``engine_slice.MESSAGER_DEADLINE_S``). Request ids are unique across scenarios: a variant of a scenario
#: (:func:`variant`) renames its requests.
SCENARIOS = {
    # An orphan and a routed request in one step; the orphan's slot reused by the next routed request after the
    # orphan's layer-0 signal reached every rank. routed-1 is registered before that signal is consumed: left free,
    # upstream's rule releases its task at that signal or only after routed-2's, as the threads happen to run.
    "waves": {"waves": WAVES, "interleaving": [["reg:routed-1", "sig:0", "reg:routed-2", "sig:1"]]},
    # The seed race (#7872's deadlock): routed-a and routed-b registered in two mailbox reads and computed in one step
    # (one layer-0 signal for both); rank 0 stores both registrations before it consumes the signal, rank 1 consumes
    # it between them.
    "seed": {
        "waves": [
            [routed_request("routed-a", 0, 60)],
            [routed_request("routed-b", 1, 60)],
        ],
        "compute_after": [False, True],
        "interleaving": [
            ["reg:routed-a", "reg:routed-b", "sig:0"],
            ["reg:routed-a", "sig:0", "reg:routed-b"],
        ],
    },
    # Chunked with early signals (s2): routed-c's prompt takes three chunks; rank 1 consumes the layer-0 signals of
    # the first two before it stores the registration, rank 0 stores it first.
    "chunked-early": {
        "waves": [[routed_request("routed-c", 0, 1100)]],
        "interleaving": [
            ["reg:routed-c", "sig:0", "sig:1", "sig:2"],
            ["sig:0", "sig:1", "reg:routed-c", "sig:2"],
        ],
    },
    # Order across requests (s3): routed-x (two chunks) takes slot 0 and waits for its decode answer, which comes only
    # once routed-y (slot 1) was admitted, so they register y then x; their first chunks share a signal, listed by
    # slot (x, y). Rank 0 stores both registrations before that signal, rank 1 only y.
    "cross-order": {
        "waves": [
            [routed_request("routed-x", 0, 600, answer_after="routed-y")],
            [routed_request("routed-y", 1, 60)],
        ],
        "wait_for": ["allocated", "admitted"],
        "compute_after": [False, True],
        "interleaving": [
            ["reg:routed-y", "reg:routed-x", "sig:0", "sig:1"],
            ["reg:routed-y", "sig:0", "reg:routed-x", "sig:1"],
        ],
    },
    # An orphan mixed into a step with two registered requests (one chunked); its slot (the lowest free once it
    # was computed) then goes to a routed request whose prompt is shorter than the orphan's.
    "orphan-mixed": {
        "waves": [
            [
                orphan_request("orphan-p", 0, 60),
                routed_request("routed-g", 1, 60),
                routed_request("routed-h", 2, 700),
            ],
            [routed_request("routed-i", 0, 30)],
        ],
        "interleaving": [["reg:routed-g", "reg:routed-h", "sig:0", "sig:1", "reg:routed-i", "sig:2"]],
    },
    # An orphan holding slot 0 for four steps (four chunks, the first beside a routed request on slot 1), then freed
    # for a routed request whose prompt is longer than the orphan's.
    "orphan-long": {
        "waves": [
            [orphan_request("orphan-q", 0, 1600), routed_request("routed-k", 1, 60)],
            [routed_request("routed-j", 0, 1700)],
        ],
        "interleaving": [
            ["reg:routed-k", "sig:0", "sig:1", "sig:2", "sig:3", "reg:routed-j", "sig:4", "sig:5", "sig:6", "sig:7"]
        ],
    },
    # The release's own order of a request's parts (the D-part first: the prepare thread waits for the decode answer
    # before it puts the P-part); rank 1 consumes the signal before it stores the registration.
    "d-part-first": {
        "waves": [[routed_request("routed-r", 0, 100)]],
        "interleaving": [["reg:routed-r", "sig:0"], ["sig:0", "reg:routed-r"]],
    },
    # The other order: with FD_ENABLE_CACHE_TASK=1 prefill does not wait for decode, and the decode answer comes once
    # the request was admitted, so the D-part completes the registration.
    "p-part-first": {
        "environment": {"FD_ENABLE_CACHE_TASK": "1"},
        "waves": [[routed_request("routed-s", 0, 100, answer_after="routed-s")]],
        "interleaving": [["reg:routed-s", "sig:0"], ["sig:0", "reg:routed-s"]],
    },
    # A late repeated D-part: decode answers routed-t's first ask only after the prefill timed out (1 s), asked again
    # and had the second answer; the late one comes once routed-t's transfer ended and it was freed, before routed-u
    # registers on the same slot.
    "late-repeat": {
        "environment": {"FD_PREFILL_WAIT_DECODE_RESOURCE_SECONDS": "1"},
        "waves": [
            [routed_request("routed-t", 0, 100, decode="late-repeat")],
            [routed_request("routed-u", 0, 100)],
        ],
        "after_transfers": [False, True],
    },
    # An orphan alone in a step, keeping its slot while routed requests on other slots go on; once their transfers
    # ended and it was freed, a routed request with a shorter prompt takes its slot.
    "orphan-alone": {
        "waves": [
            [orphan_request("orphan-o", 0, 100, holds=True)],
            [routed_request("routed-e", 1, 60), routed_request("routed-f", 2, 60)],
            [routed_request("routed-z", 0, 30)],
        ],
        "after_transfers": [False, False, True],
        "interleaving": [["sig:0", "reg:routed-e", "reg:routed-f", "sig:1", "reg:routed-z", "sig:2"]],
    },
    # The prepare thread raises right after routed-v's P-part: its slot and registration leak, it is never computed
    # (in the history: it emits no chunk); the requests after it take other slots (both registered before their
    # common signal). Leaves its slot taken: after it in a run, slots
    # are numbered from 1.
    "fails-after-p-part": {
        "waves": [
            [admission(Occupancy("routed-v", 0, 0, chunk_ends(100), aborted_after=0), fails_after_p_part=True)],
            [routed_request("routed-w", 1, 100), routed_request("routed-w2", 2, 60)],
        ],
        "interleaving": [["reg:routed-w", "reg:routed-w2", "sig:0"]],
    },
}

# Variants: the seed, chunked-early and cross-order races on three ranks, the third storing its registrations as
# rank 0 does.
SCENARIOS["seed-3"] = variant(SCENARIOS["seed"], "3", ranks_like=(0, 1, 0))
SCENARIOS["chunked-early-3"] = variant(SCENARIOS["chunked-early"], "3", ranks_like=(0, 1, 0))
SCENARIOS["cross-order-3"] = variant(SCENARIOS["cross-order"], "3", ranks_like=(0, 1, 0))
# orphan-alone with the engine side switched off (FD_PD_FIX_ENGINE_NOTICES=0): no announcement heads the first
# cache-info read, so ordered hands over to upstream's rule there (release rule 10) and the orphan's signal, read
# before any registration, holds nothing.
SCENARIOS["orphan-alone-unannounced"] = variant(
    SCENARIOS["orphan-alone"], "2", environment={"FD_PD_FIX_ENGINE_NOTICES": "0"}
)

#: The episodes of :data:`SCENARIOS` that run together in one slice run with the plugin off or in ``upstream`` mode,
#: in this order (every mode plays them in the same order, so a scenario has the same slots in every mode): each
#: group ends with the only one that may hang there; none before it leaves state that a later one could read (each
#: orphan's slot is reused by a request shorter than the orphan, which drops its parked signal; the leaked slot of
#: ``fails-after-p-part`` shifts the slots of ``chunked-early``). ``ordered`` must finish them all: it plays the groups
#: of one rank count and environment in one run (:func:`ordered_groups`).
RUN_GROUPS = [
    ["waves", "orphan-mixed", "orphan-long", "d-part-first", "seed"],
    ["cross-order"],
    ["late-repeat", "orphan-alone", "fails-after-p-part", "chunked-early"],
    ["seed-3"],
    ["chunked-early-3"],
    ["cross-order-3"],
    ["p-part-first"],
    ["orphan-alone-unannounced"],
]


def ordered_groups(groups=RUN_GROUPS) -> List[List[str]]:
    """``groups`` merged where they share rank count and environment (in order): the runs of ``ordered`` mode."""
    merged: List[List[str]] = []
    for group in groups:
        key = run_key(group, SCENARIOS)
        same = next((run for run in merged if run_key(run, SCENARIOS) == key), None)
        if same is None:
            merged.append(list(group))
        else:
            same.extend(group)
    return merged


def run_key(names: List[str], scenarios: Dict[str, dict]) -> Tuple[int, Tuple[Tuple[str, str], ...]]:
    """``(rank count, environment)`` of a run of the scenarios ``names``: one rank count, the union of their
    environments (a scenario without one accepts any); ValueError where they differ."""
    environment: Dict[str, str] = {}
    for scenario in (scenarios[name] for name in names):
        for key, value in scenario.get("environment", {}).items():
            if environment.setdefault(key, value) != value:
                raise ValueError(f"scenarios {names} set {key} differently: they cannot share a run")
    counts = {scenarios[name].get("nranks", NRANKS) for name in names}
    if len(counts) != 1:
        raise ValueError(f"scenarios {names} differ in rank count: they cannot share a run")
    return counts.pop(), tuple(sorted(environment.items()))
