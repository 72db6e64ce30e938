"""The engine slice on the real release/2.6 engine files (``../shared/upstream``, run unmodified from a temporary
checkout): the plugin's engine patch, applied by its start-up hook, makes the release's own ``add_request_in_p`` put
an orphan notice that every rank reads before the orphan's slot is registered again; without the plugin nothing is
announced and the release's own registrations are unchanged. With the release's own ``cache_messager.py`` ranks on
that engine, every scenario of ``slice_scenarios.SCENARIOS`` with the plugin off, in upstream mode and ordered: ordered
finishes all of them alike on every rank; what the other two show is asserted as observed."""

import copy
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from fastdeploy_pd_fix.tools import engine_slice, slice_scenarios
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


# Real messager ranks: the release/2.6 cache_messager.py, unmodified, as a script in two (or three) rank processes on
# the slice engine's own mailbox, with kv signals from the slice's worker, playing slice_scenarios.SCENARIOS with the
# plugin off (the release as is), in upstream mode (#8034's rule) and ordered. A run costs some 4-6 s on an idle
# machine (the engine process and the ranks start); an episode ~0.1 s (late-repeat 1.1 s: the release's own decode
# timeout); a hang MESSAGER_DEADLINE_S (4 s) after the last thing that happened. 14 runs, two at a time, one tree.

MODES = ("ordered", "off", "upstream")
#: What each mode showed per scenario, as observed: outcome and batches per rank (one list: the same on every rank);
#: in every mode the engine played the scenario's history (slots and chunks, :func:`engine_slice.history_problems`).
SEEN = {
    "waves": {
        "ordered": ("finished", [[[1, 100]], [[0, 30]]]),
        "off": ("finished", [[[1, 100]], [[0, 30]]]),
        "upstream": ("finished", [[[1, 100]], [[0, 30]]]),
    },
    "seed": {
        "ordered": ("finished", [[[0, 60], [1, 60]]]),
        "off": ("hang", {"0": [[[0, 60], [1, 60]]], "1": [[[0, 60]], [[1, 60]]]}),
        "upstream": ("finished", [[[0, 60]], [[1, 60]]]),
    },
    "seed-3": {
        "ordered": ("finished", [[[0, 60], [1, 60]]]),
        "off": ("hang", {"0": [[[0, 60], [1, 60]]], "1": [[[0, 60]], [[1, 60]]], "2": [[[0, 60], [1, 60]]]}),
        "upstream": ("finished", [[[0, 60]], [[1, 60]]]),
    },
    "chunked-early": {  # after fails-after-p-part in its run: slot 0 is leaked
        "ordered": ("finished", [[[1, 512]], [[1, 1024]], [[1, 1100]]]),
        "off": ("hang", {"0": [[[1, 512]], [[1, 1024]], [[1, 1100]]], "1": [[[1, 1024]], [[1, 1100]]]}),
        "upstream": ("hang", {"0": [[[1, 512]], [[1, 1024]], [[1, 1100]]], "1": [[[1, 1024]], [[1, 1100]]]}),
    },
    "cross-order": {
        "ordered": ("finished", [[[0, 512], [1, 60]], [[0, 600]]]),
        "off": ("hang", {"0": [[[0, 512], [1, 60]], [[0, 600]]], "1": [[[1, 60]], [[0, 512]], [[0, 600]]]}),
        "upstream": ("hang", {"0": [[[0, 512]], [[1, 60]]], "1": [[[1, 60]]]}),
    },
    "chunked-early-3": {
        "ordered": ("finished", [[[0, 512]], [[0, 1024]], [[0, 1100]]]),
        "off": (
            "hang",
            {
                "0": [[[0, 512]], [[0, 1024]], [[0, 1100]]],
                "1": [[[0, 1024]], [[0, 1100]]],
                "2": [[[0, 512]], [[0, 1024]], [[0, 1100]]],
            },
        ),
        "upstream": (
            "hang",
            {
                "0": [[[0, 512]], [[0, 1024]], [[0, 1100]]],
                "1": [[[0, 1024]], [[0, 1100]]],
                "2": [[[0, 512]], [[0, 1024]], [[0, 1100]]],
            },
        ),
    },
    "cross-order-3": {
        "ordered": ("finished", [[[0, 512], [1, 60]], [[0, 600]]]),
        "off": (
            "hang",
            {
                "0": [[[0, 512], [1, 60]], [[0, 600]]],
                "1": [[[1, 60]], [[0, 512]], [[0, 600]]],
                "2": [[[0, 512], [1, 60]], [[0, 600]]],
            },
        ),
        "upstream": ("hang", {"0": [[[0, 512]], [[1, 60]]], "1": [[[1, 60]]], "2": [[[0, 512]], [[1, 60]]]}),
    },
    "orphan-alone-unannounced": {  # engine notices off: ordered releases by upstream's rule (rule 10)
        "ordered": ("finished", [[[1, 60]], [[2, 60]], [[0, 30]]]),
        "off": ("finished", [[[1, 60], [2, 60]], [[0, 30]]]),
        "upstream": ("finished", [[[1, 60]], [[2, 60]], [[0, 30]]]),
    },
    "orphan-mixed": {
        "ordered": ("finished", [[[1, 60], [2, 512]], [[2, 700]], [[0, 30]]]),
        "off": ("finished", [[[1, 60], [2, 512]], [[2, 700]], [[0, 30]]]),
        "upstream": ("finished", [[[1, 60]], [[2, 512]], [[2, 700]], [[0, 30]]]),
    },
    "orphan-long": {
        "ordered": ("finished", [[[1, 60]], [[0, 512]], [[0, 1024]], [[0, 1536]], [[0, 1700]]]),
        "off": ("finished", [[[1, 60]], [[0, 1600]], [[0, 512]], [[0, 1024]], [[0, 1536]], [[0, 1700]]]),
        "upstream": ("finished", [[[1, 60]], [[0, 1600]], [[0, 512]], [[0, 1024]], [[0, 1536]], [[0, 1700]]]),
    },
    "orphan-alone": {
        "ordered": ("finished", [[[1, 60], [2, 60]], [[0, 30]]]),
        "off": ("finished", [[[1, 60], [2, 60]], [[0, 30]]]),
        "upstream": ("finished", [[[1, 60]], [[2, 60]], [[0, 30]]]),
    },
    "d-part-first": {
        "ordered": ("finished", [[[0, 100]]]),
        "off": ("finished", [[[0, 100]]]),
        "upstream": ("finished", [[[0, 100]]]),
    },
    "p-part-first": {
        "ordered": ("finished", [[[0, 100]]]),
        "off": ("finished", [[[0, 100]]]),
        "upstream": ("finished", [[[0, 100]]]),
    },
    "late-repeat": {
        "ordered": ("finished", [[[0, 100]], [[0, 100]]]),
        "off": ("finished", [[[0, 100]], [[0, 100]]]),
        "upstream": ("finished", [[[0, 100]], [[0, 100]]]),
    },
    "fails-after-p-part": {
        "ordered": ("finished", [[[1, 100], [2, 60]]]),
        "off": ("finished", [[[1, 100], [2, 60]]]),
        "upstream": ("finished", [[[1, 100]], [[2, 60]]]),
    },
}
#: The one ground-truth violation the release's rule shows deterministically (others depend on how far routed-j's
#: own signals reached the rank when it sent): the orphan's parked signal sent as routed-j's first batch.
ORPHAN_SENT_AS_J = "task (0, 1600): the chunk is orphan-q's, the send thread read routed-j's task"


@pytest.fixture(scope="module")
def slice_work(release_2_6, tmp_path_factory):
    """One slice tree for every run."""
    work = tmp_path_factory.mktemp("messagers")
    engine_slice.slice_tree(release_2_6, work)
    return work


def play(files, work, runs) -> dict:
    """Play ``runs`` (mode, scenario names), two at a time (a hang's wait overlaps another run's start-up):
    ``{(mode, scenario): episode}``; per run ``("ready" | "decisions", mode, names)``: its ranks' ready reports, the
    engine's patch decisions."""

    def run(mode, group):
        return engine_slice.run_with_messagers(files, work, mode, group, name=f"{group[0]}-{len(group)}")

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda run_key: run(*run_key), runs))
    played = {}
    for (mode, group), result in zip(runs, results):
        assert result["error"] is None, (mode, group, result["error"])
        played.update({(mode, name): episode for name, episode in result["episodes"].items()})
        for fact in ("ready", "decisions"):
            played[fact, mode, tuple(group)] = result[fact]
    return played


@pytest.fixture(scope="module")
def ordered_runs(release_2_6, slice_work):
    return play(release_2_6, slice_work, [("ordered", group) for group in slice_scenarios.ordered_groups()])


@pytest.fixture(scope="module")
def release_runs(release_2_6, slice_work):
    return play(release_2_6, slice_work, [(mode, group) for group in slice_scenarios.RUN_GROUPS for mode in MODES[1:]])


@pytest.fixture
def messager_runs(request):
    """``messager_runs[key]`` (keys as :func:`play`'s): from :func:`ordered_runs` or :func:`release_runs`, each set
    up by the first test that needs it (so that each fits its own test's timeout)."""

    class Runs:
        def __getitem__(self, key):
            mode = key[0] if key[0] in MODES else key[1]
            return request.getfixturevalue("ordered_runs" if mode == "ordered" else "release_runs")[key]

    return Runs()


def batches(episode):
    return {rank: reports["batch"] for rank, reports in episode["ranks"].items()}


def parts_read(episode, rank="0"):
    """The cache-info parts (request id, P or D) a rank read, in order, notices left out."""
    return [(request_id, part) for read in episode["ranks"][rank]["read"] for request_id, part in read if part in "PD"]


def test_every_scenario_is_played_in_every_mode():
    grouped = [name for group in slice_scenarios.RUN_GROUPS for name in group]
    assert sorted(grouped) == sorted(slice_scenarios.SCENARIOS) == sorted(SEEN)
    assert [name for group in slice_scenarios.ordered_groups() for name in group] == grouped


@pytest.mark.parametrize("name", sorted(SEEN))
@pytest.mark.parametrize("mode", MODES)
def test_each_scenario_shows_what_was_observed(messager_runs, mode, name):
    episode = messager_runs[mode, name]
    outcome, expected = SEEN[name][mode]
    assert episode["outcome"] == outcome, episode["error"]
    assert engine_slice.history_problems(episode, slice_scenarios.SCENARIOS[name]["waves"]) == []
    nranks = slice_scenarios.SCENARIOS[name].get("nranks", slice_scenarios.NRANKS)
    expected = expected if isinstance(expected, dict) else {str(rank): expected for rank in range(nranks)}
    assert batches(episode) == expected
    if outcome == "hang":
        assert "reported finished by get_finished_req" in episode["error"]
        assert len({json.dumps(sequence) for sequence in expected.values()}) > 1  # the ranks' batches differ


@pytest.mark.parametrize("name", sorted(SEEN))
def test_ordered_finishes_every_scenario_with_identical_batches_and_no_violation(messager_runs, name):
    assert engine_slice.judge_messagers(messager_runs["ordered", name], name) == []


@pytest.mark.parametrize("mode", ("off", "upstream"))
def test_the_release_rule_sends_an_orphans_parked_signal_as_the_next_request_on_its_slot(messager_runs, mode):
    episode = messager_runs[mode, "orphan-long"]
    for rank, reports in episode["ranks"].items():
        violations = [violation for _, _, found in reports["send"] for violation in found]
        assert any(violation.endswith(ORPHAN_SENT_AS_J) for violation in violations), (rank, violations)
        assert all("task (0, 1600)" in violation for violation in violations), (rank, violations)
    assert episode["reported"] == [["routed-k", "finished"], ["routed-j", "finished"]]


@pytest.mark.parametrize("mode", ("off", "upstream"))
def test_the_release_finishes_without_violation_where_it_finishes_and_no_orphan_signal_is_sent(messager_runs, mode):
    for name, seen in SEEN.items():
        if seen[mode][0] == "finished" and name != "orphan-long":
            assert engine_slice.judge_messagers(messager_runs[mode, name], name) == [], (mode, name)


@pytest.mark.parametrize("mode", MODES)
def test_the_release_puts_the_d_part_first_and_with_cache_tasks_the_p_part_first(messager_runs, mode):
    for name, request_id, order in (("d-part-first", "routed-r", "DP"), ("p-part-first", "routed-s", "PD")):
        episode = messager_runs[mode, name]
        for rank in episode["ranks"]:
            assert parts_read(episode, rank) == [(request_id, part) for part in order]


@pytest.mark.parametrize("mode", MODES)
def test_a_late_repeated_d_part_is_read_after_the_transfer_and_the_next_request_on_the_slot_finishes(
    messager_runs, mode
):
    episode = messager_runs[mode, "late-repeat"]
    for rank in episode["ranks"]:
        assert parts_read(episode, rank) == [
            ("routed-t", "D"),
            ("routed-t", "P"),
            ("routed-t", "D"),  # the decode answer to the first ask, after routed-t's transfer ended
            ("routed-u", "D"),
            ("routed-u", "P"),
        ]
    assert episode["reported"] == [["routed-t", "finished"], ["routed-u", "finished"]]


@pytest.mark.parametrize("mode", MODES)
def test_a_prepare_thread_failing_after_the_p_part_leaks_slot_and_registration_and_later_requests_finish(
    messager_runs, mode
):
    episode = messager_runs[mode, "fails-after-p-part"]
    assert ("routed-v", "P") in parts_read(episode)  # registered on every rank, never computed nor reported
    assert [request_id for request_id, _ in episode["reported"]] == ["routed-w", "routed-w2"]
    assert messager_runs[mode, "chunked-early"]["slots"] == {"routed-c": 1}  # slot 0 still held by routed-v


def test_off_the_seed_race_hangs_with_routed_b_never_reported(messager_runs):
    assert messager_runs["off", "seed"]["reported"] == [["routed-a", "finished"]]
    assert messager_runs["off", "seed-3"]["reported"] == [["routed-a3", "finished"]]


def test_the_plugin_patches_the_messager_in_ordered_and_upstream_and_nothing_off(messager_runs):
    for group in slice_scenarios.RUN_GROUPS:
        off_ready = messager_runs["ready", "off", tuple(group)]
        assert messager_runs["decisions", "off", tuple(group)] == []
        assert all(reports[0][1] == [] for reports in off_ready.values())
        for reports in messager_runs["ready", "upstream", tuple(group)].values():
            assert any("patched __main__.CacheMessagerV1 (mode=upstream" in line for line in reports[0][1])
    for group in slice_scenarios.ordered_groups():
        for reports in messager_runs["ready", "ordered", tuple(group)].values():
            assert any("patched __main__.CacheMessagerV1 (mode=ordered" in line for line in reports[0][1])


def test_without_engine_notices_the_real_messagers_hand_over_to_upstreams_rule(messager_runs, slice_work):
    """Rule 10 on release/2.6's own code: the engine side off, every rank's first cache-info read carries no
    announcement, each messager says so and releases by upstream's rule; the orphan's signal holds nobody."""
    episode = messager_runs["ordered", "orphan-alone-unannounced"]
    assert engine_slice.judge_messagers(episode, "orphan-alone-unannounced") == []
    logs = [
        path.read_text(errors="replace") for path in (slice_work / "orphan-alone-unannounced-1-ordered").rglob("*.log")
    ]
    warned = [log for log in logs if "engine notices: OFF" in log]
    assert len(warned) == slice_scenarios.NRANKS, logs
    assert all("release goes on by upstream's rule (#8034) instead of ordered" in log for log in warned)


@pytest.mark.parametrize(
    "break_it, complaint",
    [
        (lambda episode: episode["ranks"]["1"]["batch"].pop(), "the ranks took different batches"),
        (lambda episode: episode["ranks"]["0"]["send"][0][2].append("batch #1 ..."), "rank 0: batch #1 ..."),
        (lambda episode: episode["reported"].__setitem__(0, ["routed-1", "write cache error"]), "routed-1: transfer"),
        (lambda episode: episode.update(outcome="hang", error="slice stuck: x"), "hang: slice stuck: x"),
        (
            lambda episode: episode["slots"].update({"routed-2": 1}),
            "routed-2: the engine admitted it on slot 1, the scenario's history on slot 0, the lowest free then",
        ),
        (
            lambda episode: episode["chunk_ends"]["routed-1"].append(200),
            "routed-1: computed in chunks ending at [100, 200], the scenario's history at [100]",
        ),
        (lambda episode: episode["free_slots"].clear(), "orphan-1: the engine admitted it on slot 0, the scenario's"),
    ],
)
def test_judge_messagers_reports_what_a_broken_run_would_show(messager_runs, break_it, complaint):
    broken = copy.deepcopy(messager_runs["ordered", "waves"])
    break_it(broken)
    assert any(problem.startswith(complaint) for problem in engine_slice.judge_messagers(broken, "waves"))
