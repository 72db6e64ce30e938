"""The stand-in reproduces upstream's behaviour without the plugin, on every release variant.

Every run has the plugin switched off (``FD_PD_FIX=0``): these tests check the stand-in, not the fix. The
multi-process runs are started once per module, concurrently, and the tests read their results. Interleavings are
forced by handshakes inside each rank (see ``fastdeploy/pd_fix_standin/script.py``), so outcomes are deterministic.
"""

import json
import os
import queue
import subprocess
import sys
import threading

import pytest

from fastdeploy_pd_fix import config
from fastdeploy_pd_fix.standin import STANDIN_ROOT
from fastdeploy_pd_fix.standin.fastdeploy.pd_fix_standin.script import (
    REGISTRATION,
    SIGNAL,
    ScriptedStreams,
    recycled_requests,
)
from fastdeploy_pd_fix.standin.harness import all_variants, run_many
from fastdeploy_pd_fix.standin.scenarios import RELEASES, SCENARIOS, resolve_scenario, validate_scenario
from fastdeploy_pd_fix.target import SCRIPT_PATH

# One module-scoped batch of ~30 multi-process runs (about 35 s on 2 idle cores); allow for a loaded machine.
pytestmark = pytest.mark.timeout(600)

DEADLINE_S = 2.5  # after every rank is ready; a finishing run needs about 0.1 s
VARIANTS = all_variants()


def variant_id(variant):
    return f"{variant['release']}-7724_{int(variant['with_7724'])}-op{variant['op_args']}"


def run_key(scenario, variant, **extra):
    return (scenario, variant_id(variant)) + tuple(sorted(extra.items()))


def planned_runs():
    """(key, run_scenario kwargs) of every multi-process run of this module, those that hang first (they last
    longest; the finishing ones fill the gaps)."""
    default_op = {"with_7724": False, "op_args": 3}
    seed_runs = [(run_key("s1", variant), dict(scenario="s1", **variant)) for variant in VARIANTS]
    chunked_runs = [
        (run_key(name, {"release": release, **default_op}), dict(scenario=name, release=release, **default_op))
        for name in ("s2", "s3")
        for release in RELEASES
    ]
    three_ranks = {"release": "8034", "with_7724": True, "op_args": 4}
    three_rank_run = (run_key("s1", three_ranks, nranks=3), dict(scenario="s1", nranks=3, **three_ranks))
    no_race_runs = [(run_key("s0", variant), dict(scenario="s0", **variant)) for variant in VARIANTS]
    return seed_runs + chunked_runs + [three_rank_run] + no_race_runs


@pytest.fixture(scope="module")
def results():
    plans = planned_runs()
    kwargs = [dict(plan, mode=config.OFF, deadline_s=DEADLINE_S) for _, plan in plans]
    broken_env = {"ENABLE_V1_KVCACHE_SCHEDULER": "not-a-number"}  # main() fails before ready
    kwargs.append(dict(scenario="s0", mode=config.OFF, env=broken_env, deadline_s=DEADLINE_S))
    outcomes = run_many(kwargs, parallel=6)
    by_key = {key: result for (key, _), result in zip(plans, outcomes)}
    by_key["broken"] = outcomes[-1]
    return by_key


def describe(result):
    return result.summary() + "".join(f"\n--- rank {rank} ---\n{text}" for rank, text in result.logs.items())


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_s0_finishes_with_identical_batches_on_every_variant(results, variant):
    result = results[run_key("s0", variant)]
    assert result.outcome == "finished", describe(result)
    assert result.returncodes == {0: 0, 1: 0}
    assert result.same_batches_on_all_ranks(), describe(result)
    assert result.finished == {0: ["A", "B"], 1: ["A", "B"]}
    expected_batches = [[[0, 4]], [[1, 4]]] if variant["release"] == "8034" else [[[0, 4], [1, 4]]]
    assert result.batches[0] == expected_batches


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_s1_seed_hangs_before_8034_and_finishes_with_it(results, variant):
    result = results[run_key("s1", variant)]
    expected = SCENARIOS["s1"]["expected_without_fix"][variant["release"]]
    assert result.outcome == expected, describe(result)
    if expected == "hang":
        assert result.returncodes == {0: None, 1: None}, "a hang is killed by the harness"
        assert not result.same_batches_on_all_ranks()
    else:
        assert result.batches == {0: [[[0, 4]], [[1, 4]]], 1: [[[0, 4]], [[1, 4]]]}


@pytest.mark.parametrize("with_7724", [False, True])
@pytest.mark.parametrize("op_args", [3, 4])
def test_s1_hang_on_7872_shows_the_protocol_divergence(results, with_7724, op_args):
    """Rank 0 batches A and B together, rank 1 gets A alone and recovers B later: [(A),(B)] vs [(A)], [(B)]."""
    result = results[run_key("s1", {"release": "7872", "with_7724": with_7724, "op_args": op_args})]
    assert result.outcome == "hang", describe(result)
    assert result.batches == {0: [[[0, 4], [1, 4]]], 1: [[[0, 4]], [[1, 4]]]}
    # Both finished A together; then rank 0 waits at finish_send (B) while rank 1 waits at begin_send ([(B)]).
    assert result.finished == {0: ["A"], 1: ["A"]}


@pytest.mark.parametrize("scenario", ["s2", "s3"])
@pytest.mark.parametrize("release", RELEASES)
def test_chunked_and_cross_request_scenarios(results, scenario, release):
    result = results[run_key(scenario, {"release": release, "with_7724": False, "op_args": 3})]
    assert result.outcome == SCENARIOS[scenario]["expected_without_fix"][release], describe(result)
    # Even where s3 does not hang (pre7872), the ranks sent different batch sequences.
    assert not result.same_batches_on_all_ranks(), describe(result)


def test_s2_on_8034_keeps_only_the_latest_early_signal(results):
    result = results[run_key("s2", {"release": "8034", "with_7724": False, "op_args": 3})]
    assert result.batches == {0: [[[0, 4]], [[0, 8]]], 1: [[[0, 8]]]}


def test_more_ranks_repeat_the_last_schedule(results):
    result = results[run_key("s1", {"release": "8034", "with_7724": True, "op_args": 4}, nranks=3)]
    assert result.outcome == "finished", describe(result)
    assert set(result.batches) == {0, 1, 2} and result.same_batches_on_all_ranks()


def test_a_failing_rank_is_an_error_not_a_finish(results):
    result = results["broken"]
    assert result.outcome == "error", describe(result)
    assert "before it was ready" in result.error
    # Every rank has the broken setting; the first one to fail ends the run, and the harness kills the others,
    # possibly before they print their traceback: the failing rank, whichever it was, shows the reason.
    assert any("not-a-number" in log for log in result.logs.values()), result.logs


def test_scenarios_are_valid_and_bad_schedules_are_rejected():
    for name in SCENARIOS:
        resolve_scenario(name)
    bad = dict(SCENARIOS["s1"], schedules=[["reg1", "reg0", "sig0"]])
    with pytest.raises(ValueError, match="stream order"):
        validate_scenario(bad)
    with pytest.raises(ValueError, match="every sig once"):
        validate_scenario(dict(SCENARIOS["s1"], schedules=[["reg0", "reg1"]]))


def test_a_recycled_slot_is_registered_only_after_its_previous_request_finished():
    registrations = [
        [{"request_id": "A", "slot": 0}, {"request_id": "B", "slot": 1}],
        [{"request_id": "C", "slot": 0}],
    ]
    assert recycled_requests(registrations) == [[], ["A"]]
    streams = ScriptedStreams()
    streams.activate([(REGISTRATION, 0), (REGISTRATION, 1)], [], [["r0"], ["r1"]], recycled_requests(registrations))
    assert streams.next_cache_infos() == ["r0"]
    assert streams.next_cache_infos() == [], "slot 0 still belongs to A on this rank"
    streams.note_finished("B")
    assert streams.next_cache_infos() == []
    streams.note_finished("A")
    assert streams.next_cache_infos() == ["r1"]


def test_gating_delivers_each_event_after_the_previous_one_is_acknowledged():
    streams = ScriptedStreams()
    assert streams.next_cache_infos() == [], "nothing before activation"
    streams.activate([(REGISTRATION, 0), (SIGNAL, 0), (REGISTRATION, 1)], [[[0, 0, 4]]], [["r0"], ["r1"]])
    assert streams.next_kv_signal(block=False) is None, "sig0 waits for reg0"
    assert streams.next_cache_infos() == ["r0"]
    assert streams.next_kv_signal(block=False) is None, "reg0 not acknowledged yet"

    delivered = []
    reader = threading.Thread(target=lambda: delivered.append(streams.next_kv_signal(block=True)))
    reader.start()
    assert streams.next_cache_infos() == [], "acknowledges reg0; reg1 waits for sig0"
    reader.join(timeout=10)
    assert delivered == [[[0, 0, 4]]]
    assert streams.next_cache_infos() == [], "sig0 not acknowledged yet"
    assert streams.next_kv_signal(block=False) is None, "acknowledges sig0"
    assert streams.next_cache_infos() == ["r1"]


def test_drain_waits_for_a_batch_taken_from_the_queue_but_not_yet_reported_taken():
    """The window between the send loop's ``get`` and its ``record_batch``: the queue is empty, yet a batch is in
    flight, so ``drain`` must not pass (l6 once sent B's task for A's chunk through that window)."""
    batches = queue.Queue()
    streams = ScriptedStreams()
    streams.activate([(SIGNAL, 0), ("drain", None), (REGISTRATION, 0)], [[[0, 0, 2]]], [["r0"]], send_queue=batches)
    assert streams.next_kv_signal(block=False) == [[0, 0, 2]]
    batches.put([(0, 2)])  # the release queues the signal's batch
    assert streams.next_kv_signal(block=False) is None, "acknowledges sig0"
    batches.get()  # the send loop took it, and has not reported it yet
    assert streams.next_cache_infos() == [], "the batch taken is not sent yet"
    streams.took_batch()
    assert streams.next_cache_infos() == [], "the batch is being sent"
    streams.batch_done()
    assert streams.next_cache_infos() == ["r0"]
    streams.batch_done()  # preflight's tap reports each return to the queue, also without a batch taken
    assert batches.unfinished_tasks == 0


STRUCTURE_PROBE = """
import ast, importlib, inspect, json, os, textwrap
import fastdeploy.pd_fix_standin.variant as variant
import fastdeploy.inter_communicator.engine_worker_queue as queue_module
report = {}
for release in ("pre7872", "7872", "8034"):
    for with_7724 in ("0", "1"):
        for op_args in ("3", "4"):
            os.environ.update(FD_STANDIN_RELEASE=release, FD_STANDIN_7724=with_7724, FD_STANDIN_OP_ARGS=op_args)
            importlib.reload(variant)
            importlib.reload(queue_module)
            name = f"probe_{release}_{with_7724}_{op_args}"
            spec = importlib.util.spec_from_file_location(name, os.environ["PROBE_SCRIPT"])
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            cls = module.CacheMessagerV1
            def tree(method):
                return ast.parse(textwrap.dedent(inspect.getsource(method)))
            calls = [ast.unparse(node) for node in ast.walk(tree(cls.consume_signals)) if isinstance(node, ast.Call)
                     and getattr(node.func, "id", None) == "get_output_kv_signal"]
            stores = [ast.unparse(node) for node in ast.walk(tree(cls._add_cache_task_thread))
                      if isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Store)]
            report[name] = {
                "op_calls": calls,
                "stores": stores,
                "pending_in_init": "pending_layer0_signals" in inspect.getsource(cls.__init__),
                "maybe_wait": hasattr(cls, "_maybe_wait_for_cache_task"),
                "finish_add_barrier": "finish_add_cache_task_barrier" in inspect.getsource(cls._add_cache_task_thread),
                "queue_has_finish_add": hasattr(queue_module.EngineWorkerQueue, "put_finished_add_cache_task_req"),
                "old_class": not hasattr(module.CacheMessager, "consume_signals"),
            }
print(json.dumps(report))
"""


def test_each_variant_has_the_shape_of_its_release():
    """What the plugin reads from the class: one op call, the task store, the buffer, the #7724 features."""
    env = dict(os.environ, PYTHONPATH=str(STANDIN_ROOT), **config.environment_for(config.OFF))
    env["PROBE_SCRIPT"] = str(STANDIN_ROOT / SCRIPT_PATH)
    env["FD_LOG_DIR"] = "/nonexistent-never-written"
    completed = subprocess.run(
        [sys.executable, "-c", STRUCTURE_PROBE], env=env, capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0, completed.stderr
    report = json.loads(completed.stdout.splitlines()[-1])
    for release in RELEASES:
        for with_7724 in (0, 1):
            for op_args in (3, 4):
                shape = report[f"probe_{release}_{with_7724}_{op_args}"]
                expected_call = (
                    "get_output_kv_signal(kv_signal_data, self.rank_id, 0)"
                    if op_args == 3
                    else "get_output_kv_signal(kv_signal_data, self.rank_id, self.gpu_id, 1)"
                )
                assert shape["op_calls"] == [expected_call]
                assert shape["stores"] == ["self.idx_cache_task_dict[current_id]"]
                assert shape["pending_in_init"] == (release != "pre7872")
                assert shape["maybe_wait"] == bool(with_7724)
                assert shape["finish_add_barrier"] == (not with_7724)
                assert shape["queue_has_finish_add"] == (not with_7724)
                assert shape["old_class"]


def test_a_relative_workdir_keeps_the_run_files(tmp_path, monkeypatch):
    # The rank processes run in other directories: a relative --workdir must still name the caller's folder.
    from fastdeploy_pd_fix.standin.harness import run_scenario

    monkeypatch.chdir(tmp_path)
    result = run_scenario(SCENARIOS["s0"], mode=config.OFF, workdir="runs")
    assert result.outcome == "finished", result.summary()
    assert result.workdir and os.path.isabs(result.workdir) and result.workdir.startswith(str(tmp_path / "runs"))
