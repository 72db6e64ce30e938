"""``fastdeploy-pd-fix diagnose`` on the rank logs of real upstream ``cache_messager.py`` files, run by the preflight
machinery (the file unmodified, as a script, in two rank processes with our stubs) with the runs' folders kept.

Per real file with a ``CacheMessagerV1`` (``../shared/upstream``; skipped with one reason without it), one scenario
is played twice: with the plugin patching (``ordered``) and in ``observe`` mode, where the release's own code runs
and the plugin only writes the batch journal (with ``FD_PD_FIX=0`` there is no journal to read). The logs are named
by the release itself and found by diagnose by their lines; the test asserts which names they had.

The scenario is :data:`DIVERGING`, not the seed race s1: on these pre-#7872 files unpatched s1 finishes with
identical batches (the release drops an early signal differently), and s2 hangs with rank 1 queuing nothing at all
(a rank that is behind is not a divergence: diagnose names the silent rank and exits 2). In l12 rank 1 reads A's
registration after A's first layer-0 signal: the release drops that chunk on rank 1 only, so rank 0 queues A's
first chunk as batch #1 where rank 1 queues A's second: a divergence at batch #1, which the plugin prevents.
"""

import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
from support.installed import require_plugin_installed
from support.upstream_files import TARGET_FILES, UPSTREAM

from fastdeploy_pd_fix import config
from fastdeploy_pd_fix.standin import STANDIN_ROOT
from fastdeploy_pd_fix.target import SCRIPT_PATH
from fastdeploy_pd_fix.tools import diagnose, preflight, preflight_runs, preflight_tree
from fastdeploy_pd_fix.tools.diagnose_logs import find_logs

pytestmark = pytest.mark.timeout(300)

needs_targets = pytest.mark.skipif(not TARGET_FILES, reason=f"no real CacheMessagerV1 file in {UPSTREAM.resolve()}")
DIVERGING = "l12"
MODES = (config.ORDERED, config.OBSERVE)
#: The messager log names releases have used (diagnose does not rely on them: it finds the logs by their lines).
SCHEMES = {
    "cache_messager_rank{R}.log": re.compile(r"cache_messager_rank\d+\.log"),
    "cache_messager_{rank_id}.log": re.compile(r"cache_messager_\d+\.log"),
    "cache_messager_device{N}.log": re.compile(r"cache_messager_device\d+\.log"),
    "cache_messager_tprank{R}.log": re.compile(r"cache_messager_tprank\d+\.log"),
}
#: Schemes read off the files we know (``logger = get_logger(...)`` in their ``main``); a new file is only checked
#: for using one scheme for both ranks.
KNOWN_SCHEMES = {
    "cache_messager@PaddlePaddle_37363c28.py": "cache_messager_rank{R}.log",
    "cache_messager@liyonghua0910_5e520501.py": "cache_messager_rank{R}.log",
    "cache_messager@RichardWooSJTU_0ceff838.py": "cache_messager_device{N}.log",
}


def messager_logs(log_dir: Path):
    """``{file name: naming scheme}`` of the files diagnose takes for messager logs in a run's ``log/`` folder (a
    name of no known scheme: itself)."""
    found = {}
    for log in find_logs(log_dir).ranks:
        name = log.path.name
        found[name] = next((scheme for scheme, pattern in SCHEMES.items() if pattern.fullmatch(name)), name)
    return found


def play_kept(source: Path, work: Path) -> dict:
    """Both modes of :data:`DIVERGING` on ``source``'s preflight tree, the runs' folders kept: mode -> record."""
    tree = preflight_tree.build_tree(source, work / "tree")
    records = preflight_runs.play(
        tree,
        [DIVERGING],
        preflight.DEFAULT_DEADLINE_S,
        len(MODES),
        work / "runs",
        lambda line: None,
        MODES,
        True,
        True,  # pre-#7724 files too: the plugin would stand aside there
    )
    return records[DIVERGING]


@pytest.fixture(scope="module")
def kept_runs(tmp_path_factory):
    require_plugin_installed()
    work = tmp_path_factory.mktemp("preflight-diagnose")
    with ThreadPoolExecutor(max_workers=len(TARGET_FILES)) as pool:
        futures = {path.name: pool.submit(play_kept, path, work / path.stem) for path in TARGET_FILES}
        return {name: future.result() for name, future in futures.items()}


def first_difference(batches: dict):
    """The 1-based number of the first batch the harness saw differ between the ranks, and each rank's batch there
    as the journal writes it; from the ranks' queues, independently of their logs."""
    sequences = [batches[rank] for rank in sorted(batches)]
    for index in range(min(map(len, sequences))):
        if len({repr(sequence[index]) for sequence in sequences}) > 1:
            return index + 1, [str([tuple(pair) for pair in sequence[index]]) for sequence in sequences]
    return None, []


@needs_targets
@pytest.mark.parametrize("name", [path.name for path in TARGET_FILES])
def test_diagnose_on_a_real_files_kept_logs(kept_runs, name):
    records = kept_runs[name]
    schemes = set()
    for mode in MODES:
        log_dir = Path(records[mode]["run_dir"]) / "log"
        logs = messager_logs(log_dir)
        assert len(logs) == 2, f"{mode}: one messager log per rank, named by the release: {sorted(logs)}"
        schemes |= set(logs.values())
        assert all(f"(mode={mode}" in lines[0] for lines in records[mode]["decisions"].values()), records[mode]
    assert len(schemes) == 1, f"one naming scheme per release: {schemes}"
    if name in KNOWN_SCHEMES:
        assert schemes == {KNOWN_SCHEMES[name]}

    patched = records[config.ORDERED]
    assert patched["patched"] and preflight_runs.run_good(patched), patched
    code, report = diagnose.diagnose(Path(patched["run_dir"]) / "log")
    assert code == diagnose.NO_DIVERGENCE, report
    counts = ", ".join(f"rank {rank}: {len(patched['batches'][rank])} batches" for rank in ("0", "1"))
    assert report == f"none: the ranks' batch sequences agree ({counts})", report

    observed = records[config.OBSERVE]
    number, batches = first_difference(observed["batches"])
    assert observed["outcome"] == "hang" and number == 1, f"unpatched {DIVERGING} diverges at once: {observed}"
    code, report = diagnose.diagnose(Path(observed["run_dir"]) / "log")
    assert code == diagnose.DIVERGENCE, report
    assert report.splitlines()[0].startswith(f"first divergence at batch #{number} ("), report
    assert report.splitlines()[1:3] == [f"  rank {rank}: {batch}" for rank, batch in enumerate(batches)], report


@needs_targets
def test_the_real_files_cover_more_than_one_naming_scheme(kept_runs):
    seen = {
        scheme
        for records in kept_runs.values()
        for record in records.values()
        for scheme in messager_logs(Path(record["run_dir"]) / "log").values()
    }
    assert len(seen) > 1, f"every real file names its logs the same way: {seen}"


class FakeResult(SimpleNamespace):
    def same_batches_on_all_ranks(self):
        return True

    def ground_truth_violations(self):
        return 0


def test_keep_keeps_every_runs_logs_and_without_it_nothing_stays(tmp_path, monkeypatch):
    """``preflight --keep DIR`` keeps each run's folder (it used to remove it once read, keeping only the tree);
    without ``--keep`` the work folder goes. The rank processes are replaced by a run that only writes logs."""
    from fastdeploy_pd_fix.standin import harness

    def fake_run_scenario(scenario, *, mode, workdir, **_):
        run_dir = Path(workdir) / f"{scenario}-{mode}"
        (run_dir / "log").mkdir(parents=True)
        for rank in (0, 1):
            decision = f"fastdeploy_pd_fix 0.1.0: patched __main__.CacheMessagerV1 (mode={mode}): active"
            (run_dir / "log" / f"cache_messager_rank{rank}.log").write_text(f"INFO {decision}\n", encoding="utf-8")
        return FakeResult(
            outcome="finished",
            batches={0: [], 1: []},
            finished={0: True, 1: True},
            elapsed_s=0.0,
            startup_s=0.0,
            error="",
            workdir=run_dir,
        )

    monkeypatch.setattr(harness, "run_scenario", fake_run_scenario)
    source = str(STANDIN_ROOT / SCRIPT_PATH)
    report = preflight.preflight(source, ("s0",), keep=str(tmp_path / "kept"), progress=lambda line: None)
    assert report["kept"] == str(tmp_path / "kept")
    for mode in preflight.MODES:
        run_dir = Path(report["scenarios"]["s0"][mode]["run_dir"])
        assert (
            run_dir.parent == tmp_path / "kept" / "runs" / mode
            and (run_dir / "log" / "cache_messager_rank1.log").exists()
        )

    temporary = tmp_path / "temporary"
    temporary.mkdir()
    monkeypatch.setattr(preflight.tempfile, "tempdir", str(temporary))
    report = preflight.preflight(source, ("s0",), progress=lambda line: None)
    assert "kept" not in report and "run_dir" not in report["scenarios"]["s0"][preflight.ON]
    assert report["exit_code"] == preflight.EXIT_PASS and not list(temporary.iterdir()), "the work folder is removed"
