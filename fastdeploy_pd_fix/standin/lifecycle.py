"""Stand-in scenarios of the engine's slot lifecycle (docs/protocol.md, "The engine's slot lifecycle").

Each scenario is a plain dict like those of :mod:`fastdeploy_pd_fix.standin.scenarios`, with ``aborted`` (requests
the engine aborts: their slot goes to the next request at once), ``owners`` (the request each signal task belongs
to, which the stand-in's send thread checks every batch against) and, among the registration reads, the engine
notices the plugin's engine-side patch puts (an abort with its fence, an orphan at its admission; put only when
that patch is on: ordered mode, ``FD_PD_FIX_ENGINE_NOTICES`` not off). Each schedule keeps the fence: the slot's
next request's signals come after the abort's read. ``expected`` gives, per run mode, ``(outcome, ground-truth
violations)`` on the default stand-in variant (#7872, no #7724, three-argument op): ``off`` is the release's own
code, ``upstream`` and ``ordered`` the plugin's modes, :data:`WITHOUT_NOTICES` ordered mode with the engine-side
notices off, which releases by upstream's rule (release rule 10). The cases marked "limit" are those the two
streams alone cannot decide (design doc section 4); the notices decide them. Each scenario is an engine history
(:mod:`fastdeploy_pd_fix.engine_history`) with notices on, from which ``signals``, ``owners``, ``registrations`` and
``aborted`` are derived, and its per-rank schedules.

* l1: the issue's case: A aborted between chunks, its slot reused by B, C, D in turn.
* l2: A aborted between chunks; one rank reads A's emitted chunk only after B registered on the slot.
* l3: A aborted after its final chunk's signal; its batch still queued when B registers (``stall``).
* l4: as l3 with the batch taken by the send thread, not yet sent (``hold``); B needs fewer tokens than A sent.
* l5 (limit): A aborted before its first signal; B's first chunk looks like A's.
* l6 (limit): A aborted after its first chunk; B's prefix-cached first chunk starts exactly where A stopped.
* l7: prefix-cached first chunks (offset > 0) after an abort, two slots in one signal.
* l8: a D-part repeated at once (the request still open), and again after the request finished.
* l9: a late repeat of an aborted request's D-part after the slot's next request registered.
* l10 (limit): a request computed without registering (an orphan), its slot reused by B.
* l11 (limit): an orphan whose slot is not reused; a request on another slot behind it.
* l12: the P-part read after layer 0, the D-part later.
* l13 (limit): an aborted request's first D-part arrives after the slot's next request registered.
"""

from fastdeploy_pd_fix import config
from fastdeploy_pd_fix.engine_history.occupancy import IMMEDIATE_AND_LATE, LATE, Occupancy
from fastdeploy_pd_fix.engine_history.scenario import standin_streams
from fastdeploy_pd_fix.engine_history.streams import build

#: The run mode key of ordered mode with the engine-side notices switched off (``FD_PD_FIX_ENGINE_NOTICES=0``).
WITHOUT_NOTICES = "ordered-without-notices"
#: What that run needs in its environment beside ``config.environment_for("ordered")``.
WITHOUT_NOTICES_ENV = {config.ENV_ENGINE_NOTICES: "0"}


def _expected(off, upstream, ordered):
    """``expected`` per run mode: ``(outcome, ground-truth violations)``; ordered without notices releases by
    upstream's rule from its first cache-info read on (release rule 10), so it shows what upstream shows."""
    outcomes = {config.OFF: off, config.UPSTREAM: upstream, config.ORDERED: ordered, WITHOUT_NOTICES: upstream}
    return {mode: list(value) for mode, value in outcomes.items()}


def _streams(*occupancies, signal_slots=None, read_sizes=None):
    """``signals``, ``owners``, ``registrations`` (notices included) and ``aborted`` of an engine history: signals and
    cache info slot by slot unless ``signal_slots`` interleaves the signals (see :func:`~fastdeploy_pd_fix.
    engine_history.streams.build`); reads as :func:`~fastdeploy_pd_fix.engine_history.scenario.cut_reads` cuts them."""
    return standin_streams(build("", occupancies, signal_slots, notices=True), read_sizes)


def _schedules(*schedules):
    return [schedule.split() for schedule in schedules]


LIFECYCLE_SCENARIOS = {
    "l1": {
        "description": "the issue's case: A (need 256) aborted after its first chunk, slot 3 reused by B, C, D",
        **_streams(
            Occupancy("A", 3, 0, (128, 256), aborted_after=1),
            Occupancy("B", 3, 0, (64,)),
            Occupancy("C", 3, 0, (64, 128)),
            Occupancy("D", 3, 0, (32,)),
        ),
        "schedules": _schedules("reg0 sig0 drain reg1 reg2 sig1 reg3 sig2 sig3 reg4 sig4"),
        "expected": _expected(off=("finished", 0), upstream=("finished", 0), ordered=("finished", 0)),
        "why": (
            "every mode finishes B, C, D (#7872's own code: the issue measured this); the old ordered rules dropped "
            "B's only task and hung; now A is abandoned when B's chunk [0, 64) does not continue it"
        ),
    },
    "l2": {
        "description": "A aborted between chunks; rank 1 reads A's emitted chunk after B registered on slot 0",
        **_streams(Occupancy("A", 0, 0, (2, 8), aborted_after=1), Occupancy("B", 0, 0, (4,))),
        "schedules": _schedules("reg0 hold sig0 reg1 reg2 sig1 go", "reg0 reg1 reg2 hold sig0 sig1 go"),
        "expected": _expected(off=("finished", 2), upstream=("finished", 2), ordered=("finished", 0)),
        "why": (
            "both ranks send A's batch after B registered: the dict read sends B's blocks for A's chunk; ordered "
            "binds A's chunk to A and the send thread reads A's task (rule 7)"
        ),
    },
    "l3": {
        "description": "A aborted after its final chunk's signal; that batch is still queued when B registers",
        **_streams(Occupancy("A", 0, 0, (4,), aborted_after=1), Occupancy("B", 0, 0, (6,))),
        "schedules": _schedules("stall reg0 sig0 reg1 reg2 sig1 go", "stall reg0 reg1 reg2 sig0 sig1 go"),
        "expected": _expected(off=("finished", 2), upstream=("finished", 2), ordered=("finished", 0)),
        "why": (
            "the queued batch of A's final chunk is sent with B's task by the dict read; ordered sends it with A's "
            "own task (finishing the dead A, harmless) and B after it"
        ),
    },
    "l4": {
        "description": "A aborted after its final chunk's signal; the send thread holds that batch when B registers",
        **_streams(Occupancy("A", 0, 0, (4,), aborted_after=1), Occupancy("B", 0, 0, (3,))),
        "schedules": _schedules("hold reg0 sig0 reg1 reg2 go drain sig1"),
        "expected": _expected(off=("finished", 4), upstream=("finished", 4), ordered=("finished", 0)),
        "why": (
            "the dict read sends A's final chunk as B's (B needs 3 <= 4): B is reported finished with blocks B never "
            "computed, B's own chunk is never sent; ordered sends A's chunk with A's task, then B's"
        ),
    },
    "l5": {
        "description": "limit: A registered and aborted before its first signal; B's only chunk is the same triple",
        **_streams(Occupancy("A", 0, 0, (4,), aborted_after=0), Occupancy("B", 0, 0, (4,))),
        "schedules": _schedules("reg0 reg1 reg2 sig0"),
        "expected": _expected(off=("finished", 0), upstream=("finished", 0), ordered=("finished", 0)),
        "why": (
            "limit: on the two streams alone B's only chunk [0, 4) fits the unstarted A; the dict read sends B's "
            "task and finishes; ordered reads A's abort and binds the chunk to B"
        ),
    },
    "l6": {
        "description": "limit: A aborted after [0, 2); B's prefix-cached first chunk [2, 4) continues A by content",
        **_streams(Occupancy("A", 0, 0, (2, 8), aborted_after=1), Occupancy("B", 0, 2, (4,))),
        "schedules": _schedules("reg0 sig0 drain reg1 reg2 sig1"),
        "expected": _expected(off=("finished", 0), upstream=("finished", 0), ordered=("finished", 0)),
        "why": (
            "limit: on the two streams alone B's chunk [2, 4) continues A by content; the dict read sends B's task "
            "and finishes; ordered reads A's abort (emitted_end 2) and binds the chunk to B"
        ),
    },
    "l7": {
        "description": "prefix-cached first chunks after an abort: B [2, 6) on A's slot 0, C [3, 6) on slot 1",
        **_streams(
            Occupancy("A", 0, 0, (4, 8), aborted_after=1),
            Occupancy("B", 0, 2, (6,)),
            Occupancy("C", 1, 3, (6,)),
            signal_slots=[0, (0, 1)],
            read_sizes=[2, 1, 4],  # B and C register in one read
        ),
        "schedules": _schedules("reg0 hold sig0 reg1 reg2 sig1 go", "reg0 reg1 reg2 hold sig0 sig1 go"),
        "expected": _expected(off=("finished", 2), upstream=("finished", 2), ordered=("finished", 0)),
        "why": (
            "as l2 with prefix-cached first chunks: B [2, 6) does not continue A (ended at 4), so A is abandoned; "
            "#8034 semantics split the joint signal into two batches"
        ),
    },
    "l8": {
        "description": "A's D-part repeated at once (A open) and again after A finished; B reuses slot 0",
        **_streams(Occupancy("A", 0, 0, (4, 8), repeat=IMMEDIATE_AND_LATE), Occupancy("B", 0, 0, (4,))),
        "schedules": _schedules("reg0 reg1 sig0 sig1 reg2 reg3 sig2", "reg0 sig0 reg1 sig1 reg2 sig2 reg3"),
        "expected": _expected(off=("finished", 0), upstream=("finished", 0), ordered=("finished", 0)),
        "why": (
            "the immediate repeat completes A again (ignored by ordered: A was counted before); the one after A "
            "finished finds nothing in cache_info and registers nothing"
        ),
    },
    "l9": {
        "description": "A aborted; its D-part repeated late, after B registered on slot 0 (stored over B's task)",
        **_streams(Occupancy("A", 0, 0, (4, 8), aborted_after=1, repeat=LATE), Occupancy("B", 0, 0, (6,))),
        "schedules": _schedules("reg0 sig0 drain reg1 reg2 reg3 sig1", "reg0 sig0 drain reg1 reg2 hold sig1 reg3 go"),
        "expected": _expected(off=("hang", 4), upstream=("hang", 4), ordered=("finished", 0)),
        "why": (
            "the late repeat stores the aborted A's task over B's: the dict read sends B's chunk with A's task (need "
            "8), B never finishes; ordered ignores A's repeat and the send thread reads B's bound task"
        ),
    },
    "l10": {
        "description": "limit: O computed on slot 0 without registering; B then registers on slot 0",
        **_streams(Occupancy("O", 0, 0, (4,), registers=False), Occupancy("B", 0, 0, (4,))),
        "schedules": _schedules("reg0 sig0 reg1 drain sig1"),
        "expected": _expected(off=("finished", 4), upstream=("finished", 4), ordered=("finished", 0)),
        "why": (
            "limit, alike in every mode without notices (the issue's measurement): O's chunk is bound to B and sent "
            "with B's blocks before B computed them; B is reported finished; ordered reads O's orphan notice and "
            "drops O's chunk"
        ),
    },
    "l11": {
        "description": "limit: O computed on slot 0 without registering, slot 0 not reused; A on slot 1 after it",
        **_streams(Occupancy("O", 0, 0, (4,), registers=False), Occupancy("A", 1, 0, (4,))),
        "schedules": _schedules("reg0 sig0 reg1 sig1"),
        "expected": _expected(off=("finished", 0), upstream=("finished", 0), ordered=("finished", 0)),
        "why": (
            "limit: on the two streams alone O's chunk waits for a registration of slot 0 that never comes; every "
            "mode sends A: ordered drops O's chunk on its orphan notice, without notices it releases by upstream's "
            "rule (rule 10), whose pending buffer keeps O's chunk aside"
        ),
    },
    "l12": {
        "description": "A's P-part read after its first layer-0 signal on rank 1, its D-part later",
        **_streams(Occupancy("A", 0, 0, (4, 8)), read_sizes=[1, 1]),  # the P-part and the D-part in two reads
        "schedules": _schedules("reg0 sig0 reg1 sig1", "sig0 reg0 sig1 reg1"),
        "expected": _expected(off=("hang", 0), upstream=("hang", 0), ordered=("finished", 0)),
        "why": (
            "the pending buffer keeps only A's latest chunk on the rank whose registration completes late (as s2); "
            "ordered binds both chunks in order"
        ),
    },
    "l13": {
        "description": "limit: A aborted after [0, 2); its first D-part arrives after B registered on slot 0",
        **_streams(Occupancy("A", 0, 0, (2, 8), aborted_after=1, dpart=LATE), Occupancy("B", 0, 0, (4,))),
        "schedules": _schedules("reg0 sig0 reg1 reg2 drain reg3 sig1"),
        "expected": _expected(off=("hang", 8), upstream=("hang", 8), ordered=("finished", 0)),
        "why": (
            "limit, alike in every mode without notices: A's chunk is sent with B's task, then B's chunk with A's (A "
            "registered after B); B never finishes; ordered reads A's abort before B's registration"
        ),
    },
}
