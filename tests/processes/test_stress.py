"""``fastdeploy_pd_fix.tools.stress``: the workload generator, the run evaluation, and short runs on real processes.

The process runs are kept small (about 25 s together); the long randomized runs are marked ``slow``.
"""

import json

import pytest
from support.installed import require_plugin_installed

from fastdeploy_pd_fix.standin.run_result import ScenarioResult
from fastdeploy_pd_fix.standin.scenarios import parse_event, validate_scenario
from fastdeploy_pd_fix.tools import stress, stress_workload

ORDERED_SEEDS = (1, 8)  # first seed, runs: 2-4 requests, chunks, slot reuse, reads of two, several tasks per signal
UPSTREAM_SEEDS = (4, 4)  # seed 5 hangs under upstream #8034 semantics (no slot reuse: the hang is schedule-forced)
UPSTREAM_HANG_SEED = 5


def positions(schedule):
    """``{("sig", 3): position in the schedule, ...}``."""
    return {parse_event(token): position for position, token in enumerate(schedule)}


def check_generated(scenario):
    """Every property the generator promises, checked from the scenario's content."""
    validate_scenario(scenario)
    requests = {request["request_id"]: request for request in scenario["requests"]}
    assert 2 <= len(requests) <= 4
    read_of = {}
    for index, read in enumerate(scenario["registrations"]):
        assert 1 <= len(read) <= 2
        for registration in read:
            assert registration["request_id"] not in read_of, "every request registers once"
            read_of[registration["request_id"]] = index
            request = requests[registration["request_id"]]
            assert registration["slot"] == request["slot"]
            assert registration["need_prefill_tokens"] == sum(request["chunks"])
    assert set(read_of) == set(requests), "every request registers"
    signals_of = {request_id: [] for request_id in requests}
    for index, signal in enumerate(scenario["signals"]):
        slots = [task[0] for task in signal]
        assert slots == sorted(set(slots)), "one chunk per slot and signal, in slot order"
        for slot, offset, length in signal:
            owners = [
                request_id
                for request_id, request in requests.items()
                if request["slot"] == slot and len(signals_of[request_id]) < len(request["chunks"])
            ]
            owner = owners[0]  # a slot's requests run one after the other
            chunk = len(signals_of[owner])
            assert (offset, length) == (sum(requests[owner]["chunks"][:chunk]), requests[owner]["chunks"][chunk])
            signals_of[owner].append(index)
    for request_id, request in requests.items():
        assert 1 <= len(request["chunks"]) <= 3 and len(signals_of[request_id]) == len(request["chunks"])
        previous = request["after"]
        if previous is None:
            continue
        assert requests[previous]["slot"] == request["slot"]
        assert signals_of[previous][-1] < signals_of[request_id][0], "a slot is reused after its final chunk"
        assert read_of[previous] < read_of[request_id], "a slot's next request registers after its previous one"
        for schedule in scenario["schedules"]:
            at = positions(schedule)
            assert at[("reg", read_of[request_id])] > at[("sig", signals_of[previous][-1])]
            assert at[("sig", signals_of[request_id][0])] > at[("reg", read_of[previous])]
    return signals_of


def test_generated_scenarios_are_valid_reproducible_and_varied():
    seen = set()
    for seed in range(400):
        scenario = stress_workload.generate_scenario(seed, nranks=2 + seed % 2, lifecycle=False)
        assert scenario == stress_workload.generate_scenario(
            seed, nranks=2 + seed % 2, lifecycle=False
        ), "one per seed"
        check_generated(scenario)
        assert len(scenario["schedules"]) == 2 + seed % 2
        seen.add(stress.workload_class(scenario))
        if any(len(signal) > 1 for signal in scenario["signals"]):
            seen.add("several tasks per signal")
        if any(len(read) == 2 for read in scenario["registrations"]):
            seen.add("two requests per read")
        if len({tuple(schedule) for schedule in scenario["schedules"]}) > 1:
            seen.add("ranks see different merges")
    expected = {"several tasks per signal", "two requests per read", "ranks see different merges"}
    expected |= {"2req", "3req", "2req-reuse"}  # single-chunk workloads are rarer with more requests
    expected |= {f"{n}req" + suffix for n in (2, 3, 4) for suffix in ("-chunked", "-chunked-reuse")}
    assert expected <= seen


def test_lifecycle_aborts_orphans_and_repeats_keep_the_base_workload_and_its_ground_truth():
    seen = set()
    for seed in range(200):
        base = stress_workload.generate_scenario(seed, lifecycle=False)
        scenario = stress_workload.generate_scenario(seed)
        assert scenario == stress_workload.generate_scenario(seed), "a seed gives one scenario"
        assert [len(tasks) for tasks in scenario["owners"]] == [len(signal) for signal in scenario["signals"]]
        orphans = scenario.get("orphans", [])
        finishing_last = set(scenario["owners"][-1]) - set(orphans) - set(scenario.get("aborted", []))
        assert finishing_last, "a request that registers and finishes has a task in the last signal (its batch)"
        registering = [entry for entry in stress.first_registrations(base) if entry["request_id"] not in orphans]
        assert stress.first_registrations(scenario) == registering, "every request but the orphans registers"
        reads = scenario["registrations"]
        for request_id in orphans:
            seen.add("orphan")
            assert [entry for read in reads for entry in read if entry["request_id"] == request_id] == [
                {"notice": "orphan", "request_id": request_id, **orphan_fields(scenario, request_id)}
            ]
        for request_id in scenario.get("aborted", []):
            seen.add("abort")
            notice = next(
                index
                for index, read in enumerate(reads)
                if read[0].get("notice") == "abort" and read[0]["request_id"] == request_id
            )
            registration = notice - 1
            while reads[registration][0].get("notice") == "abort":
                registration -= 1  # behind the abort notices of requests registered in the same read
            assert any(entry["request_id"] == request_id for entry in reads[registration]), "right after its read"
            for schedule in scenario["schedules"]:
                position = schedule.index(f"reg{registration}")
                following = [f"reg{index}" for index in range(registration + 1, notice + 1)]
                assert schedule[position + 1 : position + 1 + len(following)] == following, "every rank (the fence)"
            emitted = [
                task
                for signal, owners in zip(scenario["signals"], scenario["owners"])
                for task, owner in zip(signal, owners)
                if owner == request_id
            ]
            original = [
                task
                for signal, owners in zip(base["signals"], base["owners"])
                for task, owner in zip(signal, owners)
                if owner == request_id
            ]
            assert len(emitted) < len(original) and emitted == original[: len(emitted)]
            emitted_end = reads[notice][0]["emitted_end"]
            assert emitted_end == (emitted[-1][1] + emitted[-1][2] if emitted else None)
        if any(request.get("parts") == "decode" for read in scenario["registrations"] for request in read):
            seen.add("repeat")
        if not scenario.get("aborted") and not stress.workload_class(scenario).endswith("repeat"):
            assert scenario["signals"] == base["signals"] and scenario["schedules"] == base["schedules"]
    assert seen == {"abort", "repeat", "orphan"}


def orphan_fields(scenario, request_id):
    request = next(request for request in scenario["requests"] if request["request_id"] == request_id)
    return {"slot": request["slot"], "need_prefill_tokens": sum(request["chunks"])}


def test_the_short_runs_cover_the_interesting_workloads():
    first, runs = ORDERED_SEEDS
    scenarios = [stress_workload.generate_scenario(seed) for seed in range(first, first + runs)]
    classes = {stress.workload_class(scenario) for scenario in scenarios}
    assert any("reuse" in name for name in classes) and any(name.startswith("4req") for name in classes)
    assert any(len(read) == 2 for scenario in scenarios for read in scenario["registrations"])
    assert not stress.reuses_slot(stress_workload.generate_scenario(UPSTREAM_HANG_SEED, lifecycle=False))


def fake_result(batches, outcome="finished", mode="ordered"):
    logs = {
        rank: f"x patched __main__.CacheMessagerV1 (mode={mode}, ...)\n"
        + "".join(
            f"t fastdeploy_pd_fix: queued batch #{n + 1} {[tuple(task) for task in batch]} seq_hash=0000abcd\n"
            for n, batch in enumerate(sequence)
        )
        + "\n----- stdout/stderr of rank 0 -----\nqueued batch #9 [(9, 9)] seq_hash=00000000\n"
        for rank, sequence in batches.items()
    }
    return ScenarioResult(outcome=outcome, batches=batches, finished={}, logs=logs, elapsed_s=0.1, returncodes={})


S2_LIKE = {"signals": [[[0, 0, 4], [1, 0, 4]], [[0, 4, 4]]], "registrations": [], "schedules": []}


def test_evaluate_accepts_exactly_one_batch_per_signal_in_ordered_mode():
    good = [[[0, 4], [1, 4]], [[0, 8]]]
    report = stress.evaluate(S2_LIKE, fake_result({0: good, 1: good}), "ordered")
    assert not report.failed and (report.lost, report.duplicated, report.divergent) == (0, 0, False)
    split = [[[0, 4]], [[1, 4]], [[0, 8]]]  # every task once, same on both ranks, but not one batch per signal
    report = stress.evaluate(S2_LIKE, fake_result({0: split, 1: split}), "ordered")
    assert report.failed and report.unexpected and not (report.lost or report.duplicated or report.divergent)


def test_evaluate_counts_lost_duplicated_and_divergent_tasks():
    collapsed = [[[1, 4]], [[0, 8]]]  # rank 1 kept only A's latest chunk (s2)
    repeated = [[[0, 4], [1, 4]], [[0, 8]], [[0, 8]]]
    report = stress.evaluate(S2_LIKE, fake_result({0: repeated, 1: collapsed}, "hang", "upstream"), "upstream")
    assert (report.outcome, report.lost, report.duplicated, report.divergent) == ("hang", 1, 1, True)
    assert not report.unexpected, "the one-batch-per-signal expectation is ordered mode's"


def test_evaluate_reports_a_messager_the_plugin_did_not_patch():
    good = [[[0, 4], [1, 4]], [[0, 8]]]
    report = stress.evaluate(S2_LIKE, fake_result({0: good, 1: good}, mode="upstream"), "ordered")
    assert report.outcome == "error" and "did not patch" in report.error


def test_run_kwargs_carry_the_mode_and_no_timing_margin():
    reuse = stress_workload.generate_scenario(4)
    assert stress.reuses_slot(reuse)
    kwargs = stress.run_kwargs(reuse, stress.parse_args(["--nranks", "3"]))
    assert kwargs["env"] == {"FD_PD_FIX_MODE": "ordered"} and kwargs["deadline_s"] == 3.0 and kwargs["nranks"] == 3
    assert stress.run_kwargs(reuse, stress.parse_args(["--mode", "off"]))["env"] == {"FD_PD_FIX": "0"}


def summary_line(output):
    return json.loads(output.strip().splitlines()[-1])


def test_ordered_mode_releases_every_task_once_in_signal_order(capsys):
    require_plugin_installed()
    first, runs = ORDERED_SEEDS
    code = stress.main(["--runs", str(runs), "--seed", str(first), "--mode", "ordered"])
    output = capsys.readouterr().out
    summary = summary_line(output)
    assert code == 0, output
    assert summary["runs"] == runs and summary["mode"] == "ordered"
    assert all(summary[key] == 0 for key in stress.SUMMARY_COUNTS), output


def test_upstream_mode_hang_is_detected_with_seed_and_scenario(capsys, tmp_path):
    first, runs = UPSTREAM_SEEDS
    code = stress.main(["--runs", str(runs), "--seed", str(first), "--mode", "upstream", "--no-lifecycle", "-q"])
    output = capsys.readouterr().out
    summary = summary_line(output)
    assert code == 1 and summary["runs"] == runs
    assert summary["hangs"] >= 1 and summary["lost"] >= 1 and summary["divergent"] >= 1, output
    assert f"FAIL seed={UPSTREAM_HANG_SEED} 4req-chunked: hang" in output
    assert f"--seed {UPSTREAM_HANG_SEED} --runs 1 --mode upstream" in output
    scenario_line = next(line for line in output.splitlines() if line.startswith(f"FAIL seed={UPSTREAM_HANG_SEED}"))
    block = output[output.index(scenario_line) :]
    scenario = json.loads(block.split("scenario JSON (save it for --replay FILE): ", 1)[1].splitlines()[0])
    assert scenario == stress_workload.generate_scenario(UPSTREAM_HANG_SEED, lifecycle=False)
    replay = tmp_path / "hang.json"
    replay.write_text(json.dumps({"scenario": scenario}))
    assert stress.load_replay(str(replay), nranks=2) == scenario


@pytest.mark.slow
@pytest.mark.parametrize(
    "options",
    [
        ["--runs", "96", "--seed", "1000"],
        ["--runs", "48", "--seed", "2000", "--nranks", "3"],
        ["--runs", "48", "--seed", "3000", "--release", "pre7872", "--with-7724"],
    ],
    ids=["2ranks-8034", "3ranks-8034", "2ranks-pre7872-7724"],
)
def test_ordered_stress_long(capsys, options):
    code = stress.main(options + ["--mode", "ordered", "-q"])
    output = capsys.readouterr().out
    assert code == 0, output
