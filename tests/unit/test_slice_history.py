"""The engine slice's check that the release's engine played a scenario's engine history
(:func:`fastdeploy_pd_fix.tools.engine_slice.history_problems`), on hand-made runs: slots relative to the slots free
when the run started, chunk ends, and a release that keeps no ``stop_flags``."""

from fastdeploy_pd_fix.engine_history.occupancy import Occupancy
from fastdeploy_pd_fix.tools.engine_slice import history_problems
from fastdeploy_pd_fix.tools.slice_scenarios import admission, chunk_ends, orphan_request, routed_request

WAVES = [[orphan_request("O", 0, 70), routed_request("A", 1, 600)], [routed_request("B", 0, 30)]]
PLAYED = {"O": 0, "A": 1, "B": 0}


def run(slots=PLAYED, free=(0, 1, 2, 3), chunks=None):
    chunks = {"O": [70], "A": [512, 600], "B": [30]} if chunks is None else chunks
    return {"slots": dict(slots), "free_slots": None if free is None else list(free), "chunk_ends": chunks}


def test_a_scenario_request_is_its_occupancy_in_the_worker_s_chunks():
    assert chunk_ends(30) == (30,)
    assert chunk_ends(512) == (512,)
    assert chunk_ends(1100) == (512, 1024, 1100)
    assert [(spec["prompt"], spec["routed"], spec["ends"]) for wave in WAVES for spec in wave] == [
        (70, False, [70]),
        (600, True, [512, 600]),
        (30, True, [30]),
    ]
    never_computed = admission(Occupancy("V", 0, 0, (100,), aborted_after=0), fails_after_p_part=True)
    assert (never_computed["prompt"], never_computed["ends"], never_computed["fails_after_p_part"]) == (100, [], True)


def test_the_history_played_on_the_lowest_free_slots_is_no_problem():
    assert history_problems(run(), WAVES) == []


def test_history_slots_are_counted_among_the_slots_free_at_the_start():
    shifted = {request_id: slot + 1 for request_id, slot in PLAYED.items()}  # slot 0 leaked by an earlier scenario
    assert history_problems(run(shifted, free=(1, 2, 3)), WAVES) == []
    assert history_problems(run(shifted), WAVES) == [
        f"{request_id}: the engine admitted it on slot {slot + 1}, the scenario's history on slot {slot}, the lowest "
        "free then (free at the start: [0, 1, 2, 3]): the scenario did not play as written"
        for request_id, slot in PLAYED.items()
    ]


def test_a_history_slot_beyond_the_free_ones_and_other_chunks_are_problems():
    problems = history_problems(run(free=(0,), chunks={"O": [70], "A": [600], "B": [30]}), WAVES)
    assert problems == [
        "A: the engine admitted it on slot 1, the scenario's history on free slot #1 (free at the start: [0]): the "
        "scenario did not play as written",
        "A: computed in chunks ending at [600], the scenario's history at [512, 600]",
    ]


def test_without_stop_flags_slots_are_not_checked_and_unadmitted_requests_are_not_judged_by_slot():
    assert history_problems(run({"O": 3, "A": 5}, free=None), WAVES, computed=False) == []
    assert history_problems(run({"O": 0}), WAVES, computed=False) == []
