"""The engine slice on the real release/2.6 engine files (``../shared/upstream``, run unmodified from a temporary
checkout): the plugin's engine patch, applied by its start-up hook, makes the release's own ``add_request_in_p`` put
an orphan notice that every rank reads before the orphan's slot is registered again; without the plugin nothing is
announced and the release's own registrations are unchanged."""

import copy
import json
import subprocess
import sys

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
        (lambda result: result["slots"].update({"routed-1": 5}), "routed-1: registered as [(0, 100)], expected once"),
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
