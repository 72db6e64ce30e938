"""``fastdeploy-pd-fix preflight`` against real upstream ``cache_messager.py`` files (run unmodified, as scripts, in
two real rank processes with our stubs) and against the stand-in's release file, which preflight was not written
around (other imports, a required option, its own instrumentation).

The real files are test data in ``../shared/upstream`` relative to the repository (CI has them there); without that
folder the real-file tests are skipped with one reason. To keep the runtime to a few minutes, the tests play a
subset of the scenarios (:data:`RACE` and :data:`LIFECYCLE`, which between them use every schedule control:
``hold``, ``stall`` and ``drain``); ``fastdeploy-pd-fix preflight`` itself plays all of them by default.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from support.installed import require_plugin_installed
from support.upstream_files import (
    TARGET_FILES,
    UPSTREAM,
    UPSTREAM_FILES,
    needs_engine_files,
    needs_upstream,
    release_tree,
)

from fastdeploy_pd_fix.analysis import CANNOT_RACE, analyse_source
from fastdeploy_pd_fix.standin import STANDIN_ROOT
from fastdeploy_pd_fix.target import SCRIPT_PATH, TARGET_CLASS
from fastdeploy_pd_fix.tools import preflight, preflight_runs

pytestmark = pytest.mark.timeout(600)

RACE = ("s1", "s2", "s3")
LIFECYCLE = ("l2", "l3", "l9")  # hold, stall, drain
#: l3 on the real pre-#7872 files: when an aborted request's queued batch finishes, the release's own send loop
#: resets ``engine_cache_tasks[slot] = dict()``, which would wipe the progress of the slot's next request whose signal
#: already arrived (its batch then failed with KeyError 'prefilled_layer_idx' on every rank, found by preflight; the
#: stand-in's send loop does not reset that entry). core.messager_step.BoundProgressList skips that reset.
WIPES_NEXT_REQUEST = "l3"


def run_preflight(source: Path, scenarios, patch_non_racing=True):
    """``preflight --source``; by default with ``--patch-non-racing``, so that the forced races run on the releases
    that cannot race too (their messager shapes are what these tests prove the patch on)."""
    completed = subprocess.run(
        [sys.executable, "-m", "fastdeploy_pd_fix.tools.preflight", "--source", str(source), "--json"]
        + ["--scenarios", ",".join(scenarios)]
        + ["--patch-non-racing"] * patch_non_racing,
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert completed.stdout, completed.stderr
    return completed.returncode, json.loads(completed.stdout), completed.stderr


def describe(report) -> str:
    return json.dumps({key: value for key, value in report.items() if key != "scenarios"}, indent=1) + "".join(
        f"\n{name} {mode}: {record[mode]['outcome']} {record[mode]['error']} batches={record[mode]['batches']}\n"
        + "\n".join(line for lines in record[mode]["log_tail"].values() for line in lines)
        for name, record in report["scenarios"].items()
        for mode in preflight.MODES
    )


@pytest.fixture(scope="module")
def race_reports():
    require_plugin_installed()
    return {path.name: run_preflight(path, RACE) for path in UPSTREAM_FILES}


@needs_upstream
@pytest.mark.parametrize("name", [path.name for path in UPSTREAM_FILES])
def test_every_real_file_gets_the_right_verdict(race_reports, name):
    code, report, progress = race_reports[name]
    path = UPSTREAM / name
    assert report["sha256"] == preflight.preflight_tree.sha256(path), "the file checked is the file given"
    if path not in TARGET_FILES:
        assert code == preflight.EXIT_STANDS_ASIDE == 3, describe(report)
        assert report["verdict"].startswith(f"PLUGIN STANDS ASIDE: expected one class {TARGET_CLASS}, found 0")
        assert not report["scenarios"] and not progress.strip(), "nothing is run for a file the plugin leaves alone"
        return
    assert code == preflight.EXIT_PASS, describe(report)
    assert report["verdict"].startswith(f"PASS: with the plugin all {len(RACE)} scenarios finished"), report["verdict"]
    assert f": patched __main__.{TARGET_CLASS} (mode=ordered" in report["decision"]
    assert report["engine"]["line"] == "not checked: no engine files", "a lone file has no engine beside it"
    for scenario, record in report["scenarios"].items():
        assert record["ordered"]["patched"] and preflight_runs.run_good(record["ordered"]), describe(report)
        assert all("disabled by FD_PD_FIX=0" in lines[0] for lines in record["off"]["decisions"].values())
    assert report["scenarios"]["s2"]["off"]["outcome"] == "hang", "chunked early signals: the release hangs"
    assert len(progress.strip().splitlines()) == len(RACE) + 1, "one progress line per scenario (after the header)"


@needs_upstream
def test_the_2_0_file_without_cache_messager_v1_stands_aside():
    names = [path.name for path in UPSTREAM_FILES if path not in TARGET_FILES]
    assert "cache_messager@Xreki_d0a82f18.py" in names
    code, report, _ = run_preflight(UPSTREAM / "cache_messager@Xreki_d0a82f18.py", RACE)
    assert code == preflight.EXIT_STANDS_ASIDE
    assert report["decision"] == f"stands aside: expected one class {TARGET_CLASS}, found 0"


@needs_upstream
@pytest.mark.parametrize(
    "name", [path.name for path in TARGET_FILES if analyse_source(path.read_text(encoding="utf-8")).cannot_race]
)
def test_by_default_the_plugin_stands_aside_on_a_release_that_cannot_race(name):
    """Pre-#7724 files report every registration and their engine waits for the report: nothing is run."""
    code, report, progress = run_preflight(UPSTREAM / name, RACE, patch_non_racing=False)
    assert code == preflight.EXIT_STANDS_ASIDE, describe(report)
    assert report["decision"] == f"stands aside: {CANNOT_RACE}"
    assert "--patch-non-racing forces the races anyway" in report["verdict"]
    assert not report["scenarios"] and not progress.strip()


@needs_upstream
@pytest.mark.parametrize("name", [path.name for path in TARGET_FILES])
def test_lifecycle_scenarios_on_real_files(name):
    code, report, _ = run_preflight(UPSTREAM / name, LIFECYCLE)
    for scenario, record in report["scenarios"].items():
        ordered = record["ordered"]
        assert ordered["patched"] and ordered["identical"], describe(report)
        assert preflight_runs.run_good(ordered), describe(report)
    assert report["scenarios"]["l9"]["off"]["outcome"] == "hang", "a late repeated D-part overwrites the next task"
    assert report["scenarios"][WIPES_NEXT_REQUEST]["off"]["violations"] > 0, "unpatched: B's blocks sent as A's"
    assert code == preflight.EXIT_PASS, describe(report)


def test_a_release_it_has_never_seen_the_stand_in_file():
    source = STANDIN_ROOT / SCRIPT_PATH
    code, report, _ = run_preflight(source, RACE)
    assert code == preflight.EXIT_PASS, describe(report)
    assert "--engine_worker_queue_port" in report["required_options"]
    assert "fastdeploy.inter_communicator.engine_worker_queue" in report["stubbed_modules"]
    for scenario in RACE:
        assert report["scenarios"][scenario]["off"]["outcome"] == "hang", "the stand-in's #7872 hangs in s1-s3"


@needs_upstream
def test_observe_keeps_the_release_own_journal_for_diagnose(tmp_path):
    # The release's own runs in observe mode write the batch journal: diagnose names the seed's divergence in them.
    source = UPSTREAM / "cache_messager@gongshaotian_8a1e71d0.py"
    completed = subprocess.run(
        [sys.executable, "-m", "fastdeploy_pd_fix.tools.preflight", "--source", str(source), "--json"]
        + ["--scenarios", "s1", "--observe", "--keep", str(tmp_path / "kept")],
        capture_output=True,
        text=True,
        timeout=540,
    )
    report = json.loads(completed.stdout)
    assert completed.returncode == preflight.EXIT_PASS and report["baseline"] == "observe", describe(report)
    assert report["scenarios"]["s1"]["observe"]["outcome"] == "hang", describe(report)
    diagnosed = subprocess.run(
        [sys.executable, "-m", "fastdeploy_pd_fix", "diagnose", str(tmp_path / "kept" / "runs" / "observe")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert diagnosed.returncode == 1 and "first divergence at batch #1" in diagnosed.stdout, diagnosed.stdout


@needs_engine_files
def test_a_make_patched_release_2_6_tree_passes_on_its_own_fix(tmp_path):
    # make-patch on a checkout of release/2.6's files, then preflight on the patched tree: the release's own
    # layer0_release runs (the plugin stands aside), in the messagers and in the engine slice.
    checkout = tmp_path / "FastDeploy"
    release_tree(checkout)
    git = ["git", "-C", str(checkout), "-c", "user.email=ci@example.invalid", "-c", "user.name=ci"]
    subprocess.run(["git", "init", "-q", "-b", "release", str(checkout)], check=True)
    subprocess.run(git + ["add", "-A"], check=True)
    subprocess.run(git + ["commit", "-qm", "release/2.6 files"], check=True)
    made = subprocess.run(
        [sys.executable, "-m", "fastdeploy_pd_fix", "make-patch", "--repo", str(checkout), "--base", "release"]
        + ["--out", str(tmp_path / "patches")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert made.returncode == 0, made.stderr
    code, report, _ = run_preflight(checkout, ("s1", "s2"))
    assert code == preflight.EXIT_PASS, describe(report)
    assert report["verdict"].startswith("PASS: this release carries the fix"), report["verdict"]
    assert report["engine"]["line"].startswith("the release's own notices (layer0_release"), report["engine"]
    assert all(preflight_runs.run_good(record["off"]) for record in report["scenarios"].values()), describe(report)
    lone = tmp_path / "cache_messager.py"  # the patched file alone: its package is not beside it
    lone.write_bytes((checkout / SCRIPT_PATH).read_bytes())
    code, report, _ = run_preflight(lone, ("s1",))
    assert code == preflight.EXIT_USAGE and "carries the fix" in report["verdict"], report["verdict"]
