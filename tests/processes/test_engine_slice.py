"""The engine slice on the real release/2.6 engine files (``../shared/upstream``, run unmodified from a temporary
checkout): the plugin's engine patch, applied by its start-up hook, makes the release's own ``add_request_in_p`` put
an orphan notice that every rank reads before the orphan's slot is registered again; without the plugin nothing is
announced and the release's own registrations are unchanged."""

import copy
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from fastdeploy_pd_fix.tools import engine_slice
from tests.support.upstream_files import needs_engine_files, release_tree

pytestmark = needs_engine_files


@pytest.fixture(scope="module")
def package_dir(tmp_path_factory):
    return release_tree(tmp_path_factory.mktemp("release-2.6"))


@pytest.fixture(scope="module")
def release_2_6(package_dir):
    files, why = engine_slice.find_engine_files(package_dir)
    assert files is not None, why
    return files


@pytest.fixture(scope="module")
def slice_runs(release_2_6, tmp_path_factory):
    work = tmp_path_factory.mktemp("slice")
    return {plugin_on: engine_slice.run_slice(release_2_6, work, plugin_on=plugin_on) for plugin_on in (True, False)}


def test_the_release_files_are_found_by_what_they_define(release_2_6):
    assert release_2_6.roles == {
        "resource_manager": "fastdeploy.engine.sched.resource_manager_v1",
        "connector": "fastdeploy.splitwise.splitwise_connector",
        "prepare": "fastdeploy.engine.common_engine_prepare_mixin",
        "queue": "fastdeploy.inter_communicator.engine_worker_queue",
        "request": "fastdeploy.engine.request",
    }
    assert "fastdeploy.envs" in release_2_6.files


def test_with_the_plugin_every_rank_reads_the_orphan_notice_before_its_slot_is_registered_again(slice_runs):
    result = slice_runs[True]
    assert engine_slice.judge(result) == []
    assert any(
        "patched fastdeploy.engine.sched.resource_manager_v1.ResourceManagerV1" in d for d in result["decisions"]
    )
    slots = result["slots"]
    assert slots["routed-2"] == slots["orphan-1"]  # the orphan's slot went to the next routed request
    stream = result["ranks"][0]
    kinds = [
        item.get("kind") or ("P" if "current_id" in item else "D")
        for item in stream
        if "fd-pd-fix" not in item["request_id"]
    ]
    assert kinds.count("orphan") == 1 and kinds.count("P") == 2 and kinds.count("D") == 2


def test_without_the_plugin_nothing_is_announced_and_the_release_registers_as_before(slice_runs):
    off = slice_runs[False]
    assert engine_slice.judge(off, notices_expected=False) == []
    assert off["decisions"] == []
    # The same run judged as if notices were expected fails: the check can tell the two apart on real code.
    assert any("orphan-1: notices []" in problem for problem in engine_slice.judge(off))
    on_registrations = [item for item in slice_runs[True]["ranks"][0] if "current_id" in item]
    off_registrations = [item for item in off["ranks"][0] if "current_id" in item]
    assert on_registrations == off_registrations


def test_the_engine_line_names_each_engine_patch(package_dir, tmp_path):
    report = engine_slice.check_engine(package_dir, tmp_path)
    assert report["problems"] == []
    assert report["methods"] == {
        "ResourceManagerV1.recycle_abort_task": "not checked",
        "ResourceManagerV1.add_request_in_p": "exercised",
        "SplitwiseConnector.__init__": "exercised",
    }


def test_a_release_without_prepare_threads_is_not_checked_and_says_why(tmp_path):
    package_dir = release_tree(tmp_path, release="release 2.5")
    report = engine_slice.check_engine(package_dir, tmp_path / "work")
    assert not report["checked"]
    assert report["line"].startswith("not checked: no class with _fetch_request_prefill in ")


def test_of_two_mailbox_classes_the_one_the_messager_imports_is_run(tmp_path):
    package_dir = release_tree(tmp_path)
    other = package_dir / "inter_communicator" / "engine_cache_queue.py"
    other.write_text(
        "class EngineCacheQueue:\n    def put_cache_info(self, x): ...\n    def get_cache_info(self): ...\n"
    )
    files, why = engine_slice.find_engine_files(package_dir)
    assert files is not None and files.roles["queue"] == "fastdeploy.inter_communicator.engine_worker_queue", why
    (package_dir / "cache_manager" / "cache_messager.py").unlink()  # without the messager's import: ambiguous
    files, why = engine_slice.find_engine_files(package_dir)
    assert files is None and why.startswith("2 classes with put_cache_info, get_cache_info in "), why
    assert why.endswith("(EngineCacheQueue, EngineWorkerQueue) and the cache messager imports 0 of them"), why


def test_a_lone_cache_messager_file_has_no_engine_files(tmp_path):
    assert engine_slice.check_engine(None, tmp_path)["line"] == "not checked: no engine files"


@pytest.mark.parametrize(
    "break_it, complaint",
    [
        (lambda result: result["ranks"][1].pop(0), "the ranks read different streams"),
        (lambda result: result["slots"].update({"routed-1": 5}), "routed-1: registered as [(1, 100)], expected once"),
        (lambda result: result["rank_errors"].__setitem__(1, "BrokenBarrierError()"), "rank 1: BrokenBarrierError()"),
        (lambda result: [stream.pop(0) for stream in result["ranks"]], "engine announcements [], expected one, first"),
    ],
)
def test_judge_reports_what_a_broken_run_would_show(slice_runs, break_it, complaint):
    broken = copy.deepcopy(slice_runs[True])
    break_it(broken)
    assert any(problem.startswith(complaint) for problem in engine_slice.judge(broken))


def test_judge_reports_an_orphan_notice_read_after_its_slot_was_registered_again(slice_runs):
    broken = copy.deepcopy(slice_runs[True])
    for stream in broken["ranks"]:
        notice = next(item for item in stream if item.get("kind") == "orphan")
        stream.remove(notice)
        stream.insert(len(stream) - 1, notice)  # after routed-2's registration, before the end of the stream
    assert engine_slice.judge(broken) == ["orphan-1: its slot's next registration was read before its orphan notice"]


def test_preflight_on_a_whole_release_2_6_tree_passes_with_the_engine_patches_exercised(package_dir):
    completed = subprocess.run(
        [sys.executable, "-m", "fastdeploy_pd_fix.tools.preflight", "--source", str(package_dir.parent)]
        + ["--scenarios", "s1", "--json"],
        capture_output=True,
        text=True,
        timeout=540,
    )
    report = json.loads(completed.stdout)
    assert completed.returncode == 0, (report["verdict"], report.get("engine"))
    assert report["verdict"].startswith("PASS: with the plugin all 1 scenarios finished with identical batches")
    assert "on every rank and the engine slice passed" in report["verdict"]
    assert report["engine"]["methods"]["ResourceManagerV1.add_request_in_p"] == "exercised"
    assert report["engine"]["methods"]["SplitwiseConnector.__init__"] == "exercised"
    assert "running the engine slice on" in completed.stderr


# Real messager ranks: the release/2.6 cache_messager.py, unmodified, as a script in two rank processes on the slice
# engine's own mailbox, with kv signals from the slice's worker.


@pytest.fixture(scope="module")
def messager_runs(release_2_6, tmp_path_factory):
    runs = [(name, plugin_on) for name in ("MESSAGER_WAVES", "SEED_RACE") for plugin_on in (True, False)]
    works = {run: tmp_path_factory.mktemp(f"{run[0]}-{'on' if run[1] else 'off'}") for run in runs}  # a tree each

    def run(name, plugin_on):
        scenario = getattr(engine_slice, name)
        return engine_slice.run_with_messagers(release_2_6, works[name, plugin_on], plugin_on, scenario, name=name)

    with ThreadPoolExecutor(max_workers=2) as pool:  # the hang's deadline overlaps another run's start-up
        results = list(pool.map(lambda run_key: run(*run_key), runs))
    return dict(zip(runs, results))


def batches(result):
    return {rank: reports["batch"] for rank, reports in result["ranks"].items()}


def test_with_the_plugin_real_messagers_finish_the_waves_on_the_orphans_slot(release_2_6, messager_runs):
    assert release_2_6.messager is not None and release_2_6.messager.name == "cache_messager.py"
    result = messager_runs["MESSAGER_WAVES", True]
    assert engine_slice.judge_messagers(result) == [], result
    assert result["slots"] == {"orphan-1": 0, "routed-1": 1, "routed-2": 0}
    assert result["reported"] == [["routed-1", "finished"], ["routed-2", "finished"]]
    for reports in result["ranks"].values():
        [(_, decisions)] = reports["ready"]
        assert any("patched __main__.CacheMessagerV1 (mode=ordered" in line for line in decisions)
        assert reports["batch"] == [[[1, 100]], [[0, 30]]]
        assert [read for _, read, _ in reports["send"]] == [["routed-1"], ["routed-2"]]
        assert reports["finished"] == ["routed-1", "routed-2"]


def test_without_the_plugin_the_release_finishes_the_waves_too(messager_runs):
    """Observed: the orphan's early layer-0 signal waits in pending_layer0_signals and is dropped when routed-2
    registers on its slot (70 tokens > routed-2's 30), so release/2.6 sends the same batches here."""
    result = messager_runs["MESSAGER_WAVES", False]
    assert engine_slice.judge_messagers(result) == [], result
    assert result["decisions"] == [] and all(reports["ready"][0][1] == [] for reports in result["ranks"].values())
    assert batches(result) == {"0": [[[1, 100]], [[0, 30]]], "1": [[[1, 100]], [[0, 30]]]}


def test_the_seed_race_forced_by_handshakes_hangs_the_release_and_not_the_plugin(messager_runs):
    off, on = messager_runs["SEED_RACE", False], messager_runs["SEED_RACE", True]
    assert off["outcome"] == "hang" and "reported finished by get_finished_req" in off["error"]
    assert batches(off) == {"0": [[[0, 60], [1, 60]]], "1": [[[0, 60]], [[1, 60]]]}
    assert off["reported"] == [["routed-a", "finished"]]  # routed-b's finish_send_cache_barrier never meets
    assert engine_slice.judge_messagers(on, engine_slice.SEED_RACE) == [], on
    assert batches(on) == {"0": [[[0, 60], [1, 60]]], "1": [[[0, 60], [1, 60]]]}


@pytest.mark.parametrize(
    "break_it, complaint",
    [
        (lambda result: result["ranks"]["1"]["batch"].pop(), "the ranks took different batches"),
        (lambda result: result["ranks"]["0"]["send"][0][2].append("batch #1 ..."), "rank 0: batch #1 ..."),
        (lambda result: result["reported"].__setitem__(0, ["routed-1", "write cache error"]), "routed-1: transfer"),
        (lambda result: result.update(outcome="hang", error="slice stuck: x"), "hang: slice stuck: x"),
    ],
)
def test_judge_messagers_reports_what_a_broken_run_would_show(messager_runs, break_it, complaint):
    broken = copy.deepcopy(messager_runs["MESSAGER_WAVES", True])
    break_it(broken)
    assert any(problem.startswith(complaint) for problem in engine_slice.judge_messagers(broken))
