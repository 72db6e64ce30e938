"""The engine's slot lifecycle on the stand-in (real rank processes): l1-l13 without the plugin, in upstream mode, in
ordered mode (with the engine-side notices) and in ordered mode without them, with the send thread's ground-truth
checks; and in ordered mode on three ranks.

Every scenario runs once per run mode on the default #7872 variant, all concurrently in one module fixture; each test
reads the results. Outcomes and violation counts are the scenarios' documented ``expected`` values; the tests add
what each case shows beyond them (identical sequences and violations on every rank, the log lines the rules write,
the watchdog's report).
"""

import pytest
from support.installed import require_plugin_installed
from support.release_events import logged_decisions

from fastdeploy_pd_fix import config
from fastdeploy_pd_fix.policy.decision import CLOSED_REQUEST, COUNTED_BEFORE, REGISTERED_REQUEST, Decision
from fastdeploy_pd_fix.standin.fastdeploy.pd_fix_standin import contract
from fastdeploy_pd_fix.standin.fastdeploy.pd_fix_standin.ground_truth import GroundTruth, normal_flow_owners
from fastdeploy_pd_fix.standin.fastdeploy.pd_fix_standin.script import ScriptedStreams, recycled_requests
from fastdeploy_pd_fix.standin.harness import run_many
from fastdeploy_pd_fix.standin.lifecycle import LIFECYCLE_SCENARIOS, WITHOUT_NOTICES, WITHOUT_NOTICES_ENV
from fastdeploy_pd_fix.standin.scenarios import SCENARIOS, resolve_scenario

pytestmark = pytest.mark.timeout(600)

MODES = (config.OFF, config.UPSTREAM, config.ORDERED)
#: Run mode key -> (plugin mode, extra environment).
RUNS = {mode: (mode, {}) for mode in MODES}
RUNS[WITHOUT_NOTICES] = (config.ORDERED, WITHOUT_NOTICES_ENV)
THREE_RANKS = "ordered, 3 ranks"
#: Ordered on the stand-in variant whose send loop reads each slot's task in a worker thread (develop's #7931 shape).
PARALLEL_SEND = "ordered, parallel send"
DEADLINE_S = 2.0  # after every rank is ready; a finishing run needs well under a second
WATCHDOG_S = "0.5"


@pytest.fixture(scope="module")
def results():
    require_plugin_installed()
    keys, jobs = [], []
    for name in LIFECYCLE_SCENARIOS:
        for run, (mode, env) in RUNS.items():
            keys.append((name, run))
            jobs.append(
                dict(scenario=name, mode=mode, deadline_s=DEADLINE_S, env={"FD_PD_FIX_WATCHDOG_S": WATCHDOG_S, **env})
            )
        keys.append((name, THREE_RANKS))
        jobs.append(dict(scenario=name, mode=config.ORDERED, nranks=3, deadline_s=DEADLINE_S))
        keys.append((name, PARALLEL_SEND))
        jobs.append(
            dict(scenario=name, mode=config.ORDERED, deadline_s=DEADLINE_S, env={contract.ENV_PARALLEL_SEND: "1"})
        )
    return dict(zip(keys, run_many(jobs, parallel=6)))


def describe(result):
    return result.summary() + "".join(f"\n--- rank {rank} ---\n{text}" for rank, text in result.logs.items())


def messager_log(result, rank):
    return result.logs[rank].split("\n----- stdout/stderr of rank", 1)[0]


@pytest.mark.parametrize("run", RUNS)
@pytest.mark.parametrize("name", sorted(LIFECYCLE_SCENARIOS, key=lambda name: int(name[1:])))
def test_outcome_and_ground_truth_as_documented(results, name, run):
    result = results[(name, run)]
    outcome, violations = LIFECYCLE_SCENARIOS[name]["expected"][run]
    assert (result.outcome, result.ground_truth_violations()) == (outcome, violations), describe(result)
    if run != config.OFF:
        mode = RUNS[run][0]
        assert all(f"(mode={mode}" in log for log in result.logs.values()), "the plugin patched every rank"


def sent_alike_without_violation(result, name, nranks=2):
    assert result.outcome == "finished" and result.same_batches_on_all_ranks(), describe(result)
    assert result.violations == {rank: [] for rank in range(nranks)}, describe(result)
    # one batch per signal, in signal order; a signal of an orphan or a dead request releases none
    one_batch_per_signal = iter(
        [[slot, offset + length] for slot, offset, length in signal] for signal in LIFECYCLE_SCENARIOS[name]["signals"]
    )
    assert all(batch in one_batch_per_signal for batch in result.batches[0]), describe(result)


@pytest.mark.parametrize("name", sorted(LIFECYCLE_SCENARIOS))
def test_ordered_with_notices_finishes_every_case_alike_on_every_rank_without_violation(results, name):
    sent_alike_without_violation(results[(name, config.ORDERED)], name)


@pytest.mark.parametrize("name", sorted(LIFECYCLE_SCENARIOS))
def test_ordered_with_notices_on_three_ranks(results, name):
    sent_alike_without_violation(results[(name, THREE_RANKS)], name, nranks=3)


@pytest.mark.parametrize("name", sorted(LIFECYCLE_SCENARIOS))
def test_ordered_with_notices_when_the_send_loop_reads_tasks_from_worker_threads(results, name):
    # l3 and l4 send an aborted request's batch after the slot's next request registered: the worker threads must
    # read the batch's own task, not the dict's newer entry (a ground-truth violation then).
    sent_alike_without_violation(results[(name, PARALLEL_SEND)], name)


@pytest.mark.parametrize("name", sorted(LIFECYCLE_SCENARIOS))
def test_ordered_without_notices_sends_what_upstream_sends(results, name):
    """Rule 10: a messager that reads no engine announcement releases by upstream's rule: the same batches and the
    same ground-truth violations as upstream mode, never held behind an orphan."""
    without, upstream = results[(name, WITHOUT_NOTICES)], results[(name, config.UPSTREAM)]
    assert (without.outcome, without.batches, without.violations) == (
        upstream.outcome,
        upstream.batches,
        upstream.violations,
    ), describe(without)


def test_notices_are_put_only_in_ordered_mode_and_handled_before_the_next_request(results):
    line = "engine notice: abort of request A on slot 0 (emitted_end=None)"
    assert all(line in messager_log(results[("l5", config.ORDERED)], rank) for rank in (0, 1))
    # Every messager says, at its first cache-info read, whether the engine announced its notices.
    announced = "engine notices: on (engine notices announced by the stand-in engine"
    assert all(announced in messager_log(results[("l5", config.ORDERED)], rank) for rank in (0, 1))
    assert "engine notices: OFF: the first cache-info batch does not start" in messager_log(
        results[("l5", WITHOUT_NOTICES)], 0
    )
    assert "engine notices: off (not announced; upstream reads none)" in messager_log(
        results[("l5", config.UPSTREAM)], 0
    )
    for run in (config.UPSTREAM, WITHOUT_NOTICES):
        assert "engine notice: " not in messager_log(results[("l5", run)], 0), run
    l10 = messager_log(results[("l10", config.ORDERED)], 0)
    assert "dropped layer-0 task slot=0 prefilled_token_num=4 from kv signal: chunk [0, 4) belongs to orphan O" in l10
    l13 = messager_log(results[("l13", config.ORDERED)], 0)
    assert "belongs to request A aborted before registering" in l13
    assert Decision(COUNTED_BEFORE, "A", 0, occupant=CLOSED_REQUEST) in logged_decisions(l13.splitlines())


def test_l1_the_issues_abort_then_reuse_finishes_with_and_without_the_plugin(results):
    for mode in MODES:
        result = results[("l1", mode)]
        assert result.finished == {0: ["B", "C", "D"], 1: ["B", "C", "D"]}, describe(result)
    assert results[("l1", config.ORDERED)].finished == {0: ["B", "C", "D"], 1: ["B", "C", "D"]}


@pytest.mark.parametrize("name", ["l2", "l3", "l7"])
def test_dict_read_sends_the_next_requests_task_for_an_aborted_requests_chunk(results, name):
    for mode in (config.OFF, config.UPSTREAM):
        result = results[(name, mode)]
        end = result.batches[0][0][0][1]
        expected = [f"batch #1 task (0, {end}): the chunk is A's, the send thread read B's task"]
        assert result.violations[0] == result.violations[1] == expected, describe(result)


def test_l3_l4_ordered_sends_the_aborted_requests_batch_with_its_own_task(results):
    for name in ("l3", "l4"):
        assert results[(name, config.ORDERED)].finished == {0: ["A", "B"], 1: ["A", "B"]}
    off = results[("l4", config.OFF)]
    assert off.finished == {0: ["B"], 1: ["B"]} and off.batches[0] == [[[0, 4]]], "B finished with A's chunk"
    assert "sends B's blocks up to token 4 before that chunk was computed" in off.violations[0][1]


def test_without_notices_an_orphan_holds_nothing(results):
    """l11: an orphan on slot 0 whose slot is not reused, a routed request on slot 1 behind it. Without notices the
    old ordered rule held the routed request for as long as the orphan kept its slot (the watchdog's stall); rule 10
    hands over to upstream's rule at the first cache-info read, and the routed request is sent on every rank (the
    orphan's signal stays in upstream's pending buffer, which the watchdog does not count as a wait)."""
    l11 = results[("l11", WITHOUT_NOTICES)]
    assert l11.outcome == "finished" and l11.same_batches_on_all_ranks(), describe(l11)
    assert l11.batches == {0: [[[1, 4]]], 1: [[[1, 4]]]} and l11.finished == {0: ["A"], 1: ["A"]}, describe(l11)
    for rank in (0, 1):
        assert "release goes on by upstream's rule (#8034) instead of ordered" in messager_log(l11, rank)


def test_repeats_are_ignored_once_counted(results):
    l8 = messager_log(results[("l8", config.ORDERED)], 0)
    assert Decision(COUNTED_BEFORE, "A", 0, occupant=REGISTERED_REQUEST) in logged_decisions(l8.splitlines())
    l9 = results[("l9", config.ORDERED)]
    assert l9.finished == {0: ["B"], 1: ["B"]}
    repeats = [item for item in logged_decisions(messager_log(l9, 0).splitlines()) if item.kind == COUNTED_BEFORE]
    assert [item.request_id for item in repeats] == ["A"]
    assert "the chunk is B's, the send thread read A's task" in results[("l9", config.OFF)].violations[0][0]


def test_lifecycle_scenarios_are_registered_and_valid():
    assert {f"l{number}" for number in range(1, 14)} <= set(SCENARIOS)
    for name in LIFECYCLE_SCENARIOS:
        scenario = resolve_scenario(name)
        assert set(scenario["expected"]) == set(RUNS), name


def test_aborted_requests_hand_their_slot_on_at_once_and_repeats_hand_nothing_on():
    registrations = [
        [{"request_id": "A", "slot": 0}],
        [{"request_id": "B", "slot": 0}],
        [{"request_id": "A", "slot": 0, "parts": "decode"}],
        [{"request_id": "C", "slot": 0}],
    ]
    assert recycled_requests(registrations) == [[], ["A"], [], ["B"]]
    assert recycled_requests(registrations, aborted=["A"]) == [[], [], [], ["B"]]


def test_ground_truth_prefers_the_read_requests_chunk_and_checks_computation():
    scenario = {
        "signals": [[[0, 0, 4]], [[0, 0, 4]]],
        "owners": [["O"], ["B"]],
        "registrations": [[{"request_id": "B", "slot": 0, "need_prefill_tokens": 4}]],
    }
    truth = GroundTruth(scenario, block_size=64)
    b_task = {"request_id": "B", "need_prefill_tokens": 4, "src_block_ids": truth.blocks_of("B")}
    truth.note_delivered(0)
    assert truth.check_batch([(0, 4)], [b_task]) == [
        "batch #1 task (0, 4): the chunk is O's, the send thread read B's task",
        "batch #1 task (0, 4): sends B's blocks up to token 4 before that chunk was computed",
    ]
    truth = GroundTruth(scenario, block_size=64)
    truth.note_delivered(0)
    truth.note_delivered(1)
    assert truth.check_batch([(0, 4)], [b_task]) == [], "B's own identical chunk was delivered: counted as B's"
    truth = GroundTruth(scenario, block_size=64)
    truth.note_delivered(1)
    assert truth.check_batch([(0, 4)], [dict(b_task, src_block_ids=[7])]) == [
        "batch #1 task (0, 4): B's task read has need and blocks (4, [7]), registered were (4, [1000])"
    ]


def test_normal_flow_owners_follow_registration_order_per_slot():
    registrations = [
        [{"request_id": "A", "slot": 0, "need_prefill_tokens": 8}],
        [{"request_id": "B", "slot": 0, "need_prefill_tokens": 4}],
    ]
    signals = [[[0, 0, 4], [1, 0, 4]], [[0, 4, 4]], [[0, 0, 4]]]
    assert normal_flow_owners(signals, registrations) == [["A", None], ["A"], ["B"]]


def test_controls_stall_and_hold_the_send_thread_until_go():
    import queue

    batches = queue.Queue()
    streams = ScriptedStreams()
    streams.activate([("stall", None), ("hold", None), ("reg", 0), ("go", None)], [], [["r0"]], send_queue=batches)
    batches.put("batch")
    assert streams._stalled and streams._held
    assert streams.next_cache_infos() == ["r0"]
    assert streams._stalled, "go comes only after reg0 was acknowledged"
    assert streams.next_cache_infos() == []
    assert not streams._stalled and not streams._held
    streams.wait_to_take()
    streams.wait_to_send()
