"""The installed plugin against the stand-in run as a script in separate rank processes (real manager barriers).

Every stand-in release variant (pre-#7872, #7872, #8034; with and without #7724; both kv-signal op signatures) is
patched, and in ``ordered`` mode every race scenario finishes with the same batch sequence on every rank.
"""

import pytest
from support.installed import require_plugin_installed

from fastdeploy_pd_fix.standin.harness import all_variants, run_many
from fastdeploy_pd_fix.standin.scenarios import SCENARIOS
from fastdeploy_pd_fix.tools.diagnose import diagnose

RACES = ("s1", "s2", "s3")
VARIANTS = all_variants()


@pytest.fixture(scope="module", autouse=True)
def plugin_installed():
    require_plugin_installed()


def variant_id(variant):
    return f"{variant['release']}-{'7724' if variant['with_7724'] else 'pre7724'}-op{variant['op_args']}"


def run_matrix(scenarios, env, variants=VARIANTS, **kwargs):
    jobs = [dict(scenario=name, env=env, **variant, **kwargs) for variant in variants for name in scenarios]
    return list(zip(jobs, run_many(jobs)))


def patched_line(result, mode):
    return all(f"patched __main__.CacheMessagerV1 (mode={mode}" in log for log in result.logs.values())


def test_ordered_mode_finishes_every_scenario_on_every_variant_with_identical_sequences():
    # Every variant runs s3 (both threads race across two requests); s0-s2 rotate over the variants so that each
    # scenario meets every release, both registration styles and both op signatures, in half the runs of a full grid.
    rotation = ("s0", "s1", "s2")
    jobs = [
        dict(scenario=name, env={"FD_PD_FIX_MODE": "ordered"}, **variant)
        for index, variant in enumerate(VARIANTS)
        for name in ("s3", rotation[index % 3])
    ]
    failures = []
    for job, result in zip(jobs, run_many(jobs)):
        label = f"{job['scenario']} on {variant_id(job)}"
        if (
            result.outcome != "finished"
            or not result.same_batches_on_all_ranks()
            or not patched_line(result, "ordered")
        ):
            failures.append(f"{label}: {result.summary()}")
        signals = SCENARIOS[job["scenario"]]["signals"]
        one_batch_per_signal = [[[slot, offset + length] for slot, offset, length in signal] for signal in signals]
        if result.batches[0] != one_batch_per_signal:
            failures.append(f"{label}: not one batch per kv signal in signal order: {result.batches[0]}")
    assert not failures, "\n".join(failures)


def test_ordered_mode_with_three_ranks():
    ((_, result),) = run_matrix(("s3",), {"FD_PD_FIX_MODE": "ordered"}, variants=[VARIANTS[0]], nranks=3)
    assert result.outcome == "finished" and result.same_batches_on_all_ranks() and len(result.batches) == 3


def test_upstream_mode_fixes_s1_and_hangs_on_s2_s3_as_documented():
    variants = [  # each release, both registration styles, both op signatures
        {"release": "pre7872", "with_7724": False, "op_args": 3},
        {"release": "7872", "with_7724": True, "op_args": 4},
        {"release": "8034", "with_7724": True, "op_args": 3},
    ]
    outcomes = {
        (job["scenario"], variant_id(job)): result
        for job, result in run_matrix(RACES, {"FD_PD_FIX_MODE": "upstream"}, variants=variants)
    }
    for (scenario, variant), result in outcomes.items():
        assert patched_line(result, "upstream"), variant
        expected = "finished" if scenario == "s1" else "hang"
        assert result.outcome == expected, f"{scenario} on {variant}: {result.summary()}"
        if expected == "hang":
            assert not result.same_batches_on_all_ranks()


def test_off_switch_leaves_the_release_unpatched_and_it_hangs():
    for job, result in run_matrix(
        RACES, {"FD_PD_FIX": "0"}, variants=[{"release": "7872", "with_7724": False, "op_args": 3}]
    ):
        assert result.outcome == "hang", result.summary()
        assert all("disabled by FD_PD_FIX=0" in log and "patched __main__" not in log for log in result.logs.values())


def test_observe_mode_keeps_upstream_behaviour_and_diagnose_finds_the_divergence(tmp_path):
    env = {"FD_PD_FIX_MODE": "observe", "FD_PD_FIX_WATCHDOG_S": "0.5"}
    ((_, hung),) = run_matrix(("s1",), env, variants=[VARIANTS[2]], workdir=tmp_path / "observe", deadline_s=4.0)
    assert hung.outcome == "hang"  # the #7872 release's own behaviour, unchanged
    code, report = diagnose(tmp_path / "observe")
    assert code == 1 and "first divergence at batch #1" in report, report
    assert any("WATCHDOG: stalled longer than 0.5s" in log and "thread stacks:" in log for log in hung.logs.values())


def test_diagnose_reports_none_for_ordered_runs(tmp_path):
    ((_, result),) = run_matrix(("s3",), {"FD_PD_FIX_MODE": "ordered"}, variants=[VARIANTS[2]], workdir=tmp_path)
    assert result.outcome == "finished"
    code, report = diagnose(tmp_path)
    assert code == 0 and "rank 0: 2 batches, rank 1: 2 batches" in report, report
