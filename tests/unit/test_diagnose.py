"""``diagnose``: the first divergence of the ranks' batch sequences, read from their cache messager logs."""

import concurrent.futures
import shutil
from pathlib import Path

import pytest

from fastdeploy_pd_fix.adapters.messager_log import BatchJournal, next_sequence_hash
from fastdeploy_pd_fix.cli import main as cli_main
from fastdeploy_pd_fix.policy.decision import ABANDONED, COUNTED_BEFORE, REGISTERED_REQUEST, Decision
from fastdeploy_pd_fix.standin.harness import run_scenario
from fastdeploy_pd_fix.tools import diagnose as diagnose_module
from fastdeploy_pd_fix.tools.diagnose import diagnose, first_divergence
from fastdeploy_pd_fix.tools.diagnose import main as diagnose_main
from fastdeploy_pd_fix.tools.diagnose_logs import SNIFF_BYTES, find_logs


def test_sequence_hash_depends_on_order():
    a, b = [(0, 4)], [(1, 4)]
    assert next_sequence_hash(next_sequence_hash("", a), b) != next_sequence_hash(next_sequence_hash("", b), a)


def write_rank_log(directory, rank, batches):
    digest, lines = "", ["2026-11-25 INFO create cache messager..."]  # FastDeploy's first messager line
    for number, batch in enumerate(batches, 1):
        digest = next_sequence_hash(digest, batch)
        lines.append(f"2026-11-25 INFO fastdeploy_pd_fix: queued batch #{number} {batch} seq_hash={digest}")
    (directory / f"cache_messager_rank{rank}.log").write_text("\n".join(lines) + "\n")


def test_diagnose_finds_first_divergence(tmp_path, capsys):
    write_rank_log(tmp_path, 0, [[(0, 4), (1, 4)]])
    write_rank_log(tmp_path, 1, [[(0, 4)], [(1, 4)]])
    code, report = diagnose(tmp_path)
    assert code == 1 and "first divergence at batch #1" in report
    assert "rank 0: [(0, 4), (1, 4)]" in report and "rank 1: [(0, 4)]" in report
    assert cli_main(["diagnose", str(tmp_path)]) == 1 and "first divergence" in capsys.readouterr().out


def test_diagnose_none_when_sequences_agree_even_if_one_rank_is_behind(tmp_path):
    write_rank_log(tmp_path, 0, [[(0, 4)], [(1, 4)]])
    write_rank_log(tmp_path, 1, [[(0, 4)]])
    code, report = diagnose(tmp_path)
    assert code == 0 and report.startswith("none") and "rank 0: 2 batches, rank 1: 1 batches" in report


@pytest.mark.parametrize("ranks", [(), (0,)])
def test_diagnose_without_comparable_logs(tmp_path, ranks):
    for rank in ranks:
        write_rank_log(tmp_path, rank, [[(0, 4)]])
    assert diagnose(tmp_path)[0] == 2


def test_a_rank_that_queued_nothing_is_named_not_reported_missing(tmp_path):
    """s2 unpatched on a real pre-#7872 file: rank 1 drops both early signals and queues nothing, rank 0 queues two
    batches. Both logs are there; the report must not say only one was found."""
    write_rank_log(tmp_path, 0, [[(0, 4)], [(0, 8)]])
    write_rank_log(tmp_path, 1, [])
    code, report = diagnose(tmp_path)
    assert code == 2, report
    assert report.startswith("only one rank queued batches (rank 0: 2 batches); no 'queued batch' line from rank 1 ")
    assert "(cache_messager_rank1.log)" in report and "only one rank's log found" not in report


@pytest.mark.parametrize("prefix", ["fastdeploy_pd_fix: ", "layer0_release: "])
def test_diagnose_reads_what_the_core_journal_logs_for_the_plugin_and_the_upstreamed_fix(tmp_path, prefix):
    for rank, batches in ((0, [[(0, 4), (1, 4)]]), (1, [[(0, 4)], [(1, 4)]])):
        lines = []
        journal = BatchJournal(lines.append, prefix)
        for batch in batches:
            journal.record(batch)
        log = "".join(f"2026-11-25 INFO 1234 MainThread {line}\n" for line in lines)
        (tmp_path / f"cache_messager_rank{rank}.log").write_text(log)
    code, report = diagnose(tmp_path)
    assert code == 1 and "first divergence at batch #1 (rank 0: 1 batches, rank 1: 2 batches)" in report
    assert "rank 0: [(0, 4), (1, 4)]" in report and "rank 1: [(0, 4)]" in report


def write_decided_rank_log(directory, rank, batches, decisions):
    """A rank's log with ``decisions`` (``{batches queued before it: [Decision]}``) logged among its batches."""
    digest, lines = "", ["2026-11-25 INFO create cache messager..."]
    for number, batch in enumerate(batches, 1):
        lines += [f"2026-11-25 WARNING fastdeploy_pd_fix: {d.describe()}" for d in decisions.get(number - 1, [])]
        digest = next_sequence_hash(digest, batch)
        lines.append(f"2026-11-25 INFO fastdeploy_pd_fix: queued batch #{number} {batch} seq_hash={digest}")
    (directory / f"cache_messager_rank{rank}.log").write_text("\n".join(lines) + "\n")


ABANDONED_A = Decision(ABANDONED, "A", slot=0, chunk=(0, 4), last_end=2, run_end=8, occupant=REGISTERED_REQUEST)
REPEATED_B = Decision(COUNTED_BEFORE, "B", slot=1, occupant=REGISTERED_REQUEST)


def test_a_divergence_names_the_first_release_decision_the_ranks_took_apart(tmp_path):
    write_decided_rank_log(tmp_path, 0, [[(1, 4)], [(0, 4)]], {0: [REPEATED_B], 1: [ABANDONED_A]})
    write_decided_rank_log(tmp_path, 1, [[(1, 4)], [(0, 2)]], {0: [REPEATED_B]})
    logs = sorted(find_logs(tmp_path).ranks, key=lambda log: log.rank_id)
    assert [log.decisions for log in logs] == [[(0, REPEATED_B), (1, ABANDONED_A)], [(0, REPEATED_B)]]
    code, report = diagnose(tmp_path)
    assert code == 1 and "first divergence at batch #2" in report, report
    lines = report.splitlines()
    heading = lines.index("  the release's decisions before it differ first at decision #2:")
    assert lines[heading - 2 : heading + 3] == [
        "  rank 0: [(0, 4)]",
        "  rank 1: [(0, 2)]",
        "  the release's decisions before it differ first at decision #2:",
        f"    rank 0: {ABANDONED_A.describe()}",
        "    rank 1: none",
    ]


def test_decisions_the_ranks_took_alike_are_not_reported(tmp_path):
    for rank, last in ((0, [(0, 4)]), (1, [(0, 2)])):
        write_decided_rank_log(tmp_path, rank, [[(1, 4)], last], {1: [ABANDONED_A]})
    code, report = diagnose(tmp_path)
    assert code == 1 and "decisions" not in report, report


def test_first_divergence_of_empty_input():
    assert first_divergence({}) is None


# ---- every naming scheme, on the logs of real stand-in runs ----

NAMING_SCHEMES = {
    # messager log name and launch log name per rank_id (the stand-in's TP rank equals its rank_id): every name a
    # release has used, and one made up (diagnose finds the messager logs by their lines)
    "rank": ("cache_messager_rank{}.log", "launch_cache_messager_{}.log"),
    "rank_id": ("cache_messager_{}.log", "launch_cache_messager_tprank{}.log"),
    "device": ("cache_messager_device{}.log", "launch_cache_messager_{}.log"),
    "tprank": ("cache_messager_tprank{}.log", "launch_cache_messager_tprank{}.log"),
    "made up": ("messager-r{}.txt", "launch_cache_messager_{}.log"),
}


@pytest.fixture(scope="module")
def standin_runs(tmp_path_factory):
    """The log folders of real stand-in runs of s1: the fix on (ordered), FastDeploy's own release observed (the
    plugin journals its batches), and the plugin off."""
    modes = {"ordered": 3.0, "observe": 2.0, "off": 2.0}  # mode: deadline
    with concurrent.futures.ThreadPoolExecutor(len(modes)) as pool:  # each run is its own processes
        futures = {
            mode: pool.submit(
                run_scenario, "s1", mode=mode, workdir=tmp_path_factory.mktemp(mode), deadline_s=deadline
            )
            for mode, deadline in modes.items()
        }
        results = {mode: future.result() for mode, future in futures.items()}
    for mode, result in results.items():
        assert result.outcome == ("finished" if mode == "ordered" else "hang"), (mode, result.outcome)
    return {mode: Path(result.workdir) / "log" for mode, result in results.items()}


def renamed_copy(log_dir, destination, scheme, device_offset=4):
    """The run's messager and launch logs under ``destination/deep/log`` in ``scheme``'s names (devices: the
    rank_id + ``device_offset``, so that only the log's decision line can tell its rank)."""
    messager_name, launch_name = NAMING_SCHEMES[scheme]
    folder = destination / "deep" / "log"
    folder.mkdir(parents=True)
    for rank in (0, 1):
        number = rank + device_offset if scheme == "device" else rank
        shutil.copy(log_dir / f"cache_messager_rank{rank}.log", folder / messager_name.format(number))
        shutil.copy(log_dir / f"launch_cache_messager_{rank}.log", folder / launch_name.format(rank))
    return destination


@pytest.mark.parametrize("scheme", NAMING_SCHEMES)
def test_a_patched_run_agrees_and_an_observed_s1_diverges_in_every_naming_scheme(standin_runs, tmp_path, scheme):
    patched = renamed_copy(standin_runs["ordered"], tmp_path / "ordered", scheme)
    code, report = diagnose(patched)
    assert code == 0 and report.startswith("none: the ranks' batch sequences agree"), report
    assert "rank 0: 1 batches, rank 1: 1 batches" in report  # the device logs' ranks come from their decision lines
    assert "note:" not in report, report

    observed = renamed_copy(standin_runs["observe"], tmp_path / "observe", scheme)
    code, report = diagnose(observed)
    assert code == 1 and report.startswith("first divergence at batch #1 (rank 0: 1 batches, rank 1: 2 batches)")
    assert "rank 0: [(0, 4), (1, 4)]" in report and "rank 1: [(0, 4)]" in report


@pytest.mark.parametrize("scheme", NAMING_SCHEMES)
def test_a_run_with_the_plugin_off_says_where_it_is_not_active(standin_runs, tmp_path, scheme):
    code, report = diagnose(renamed_copy(standin_runs["off"], tmp_path, scheme))
    assert code == 2 and report.startswith("no 'queued batch' lines in the 2 cache messager logs"), report
    assert "is the plugin installed" not in report
    launch = NAMING_SCHEMES[scheme][1]
    label = "tp rank" if "tprank" in launch else "launch"
    for rank in (0, 1):
        assert f"plugin not loaded on {label} {rank} ({launch.format(rank)}): no fastdeploy_pd_fix decision" in report


# ---- DP groups: rank_id = rank + dp * tp ----


def journal_lines(batches, prefix="fastdeploy_pd_fix: "):
    lines = []
    journal = BatchJournal(lines.append, prefix)
    for batch in batches:
        journal.record(batch)
    return lines


DECISION = (
    "fastdeploy_pd_fix 0.1.0: patched __main__.CacheMessagerV1 (mode=ordered, fastdeploy=2.6.0): layer-0 release "
    "replaced; get_output_kv_signal(buf, self.rank_id, 0); no pending buffer (pre-#7872); "
    "finish_add_cache_task_barrier (pre-#7724); send loop does not wait for registration"
)
#: How a rank's log tells its rank and the TP size: the plugin's decision line (today's form and the one with
#: rank/nranks), FastDeploy's ``logger.info(f"{args}")`` and its ``[rank r/N]`` line, or nothing.
IDENTITIES = {
    "decision with nranks": lambda rank_id, rank, tp: [
        f"{DECISION}; active on rank_id={rank_id} rank={rank} nranks={tp}"
    ],
    "namespace": lambda rank_id, rank, tp: [
        f"Namespace(device_id={rank_id}, rank={rank}, splitwise_role='prefill', num_layers=2, mp_num={tp}, "
        f"local_data_parallel_id={(rank_id - rank) // tp}, protocol='ipc')"
    ],
    "rank of": lambda rank_id, rank, tp: [f"[rank {rank}/{tp}] Initializing kv cache for all layers."],
    "decision without nranks": lambda rank_id, rank, tp: [f"{DECISION}; active on rank_id={rank_id}"],
}
#: TP2 x DP2: each DP group's ranks agree with each other, the groups queue different batches.
TP2_DP2 = {0: [[(0, 4)], [(1, 4)]], 1: [[(0, 4)], [(1, 4)]], 2: [[(3, 8)]], 3: [[(3, 8)], [(5, 2)]]}


def write_log(path, lines):
    path.write_text("".join(f"2026-11-25 10:00:00,000 INFO 1234 MainThread {line}\n" for line in lines))


def write_deployment(folder, identity, batches=TP2_DP2, tp=2, scheme="rank"):
    folder.mkdir(parents=True, exist_ok=True)
    for rank_id, sequence in batches.items():
        name = NAMING_SCHEMES[scheme][0].format(rank_id)
        write_log(folder / name, IDENTITIES[identity](rank_id, rank_id % tp, tp) + journal_lines(sequence))
    return folder


@pytest.mark.parametrize(
    "scheme, identity",
    [
        (scheme, identity)
        for scheme in NAMING_SCHEMES
        for identity in ("decision with nranks", "namespace", "rank of")
        if (scheme, identity) != ("device", "rank of")  # tells rank and tp, not the rank_id: see below
    ],
)
def test_tp2_dp2_compares_each_dp_group_on_its_own(tmp_path, scheme, identity):
    code, report = diagnose(write_deployment(tmp_path, identity, scheme=scheme))
    assert code == 0, report
    assert report.splitlines()[0] == "none: the ranks' batch sequences agree in every one of the 2 DP groups compared"
    assert "DP group 0: none: the ranks' batch sequences agree (rank 0: 2 batches, rank 1: 2 batches)" in report
    assert "DP group 1: none: the ranks' batch sequences agree (rank 2: 1 batches, rank 3: 2 batches)" in report


def test_tp2_dp2_without_the_tp_size_in_the_logs_needs_the_option(tmp_path, capsys):
    write_deployment(tmp_path, "decision without nranks")
    code, report = diagnose(tmp_path)
    assert code == 1 and "first divergence at batch #1" in report and "pass --tp N" in report
    code, report = diagnose(tmp_path, tp=2)
    assert code == 0 and "in every one of the 2 DP groups" in report, report
    assert diagnose_main(["--tp", "2", str(tmp_path)]) == 0 and "DP group 1: none" in capsys.readouterr().out
    assert diagnose_main(["--tp", "4", str(tmp_path)]) == 1  # one group of four: the groups' batches differ


def test_a_device_log_that_does_not_say_its_rank_id_is_not_placed_in_a_dp_group(tmp_path):
    code, report = diagnose(write_deployment(tmp_path, "rank of", scheme="device"))
    assert code == 1 and "device 0: 2 batches, device 1: 2 batches, device 2: 1 batches" in report, report
    assert f"note: {tmp_path / 'cache_messager_device2.log'}: the log does not say its rank_id" in report


def test_a_divergence_inside_one_dp_group_names_the_group_and_its_ranks(tmp_path):
    batches = {**TP2_DP2, 3: [[(5, 2)], [(3, 8)]]}
    code, report = diagnose(write_deployment(tmp_path, "decision with nranks", batches=batches))
    assert code == 1, report
    assert report.splitlines()[0] == "divergence in 1 of the 2 DP groups compared"
    assert "DP group 0: none" in report
    assert "DP group 1: first divergence at batch #1 (rank 2: 1 batches, rank 3: 2 batches):" in report
    assert "  rank 2: [(3, 8)]\n  rank 3: [(5, 2)]" in report


def test_the_option_overrides_the_logs_and_says_so(tmp_path):
    write_deployment(tmp_path, "decision with nranks")
    code, report = diagnose(tmp_path, tp=1)
    assert code == 2 and report.count("only one rank's log found") == 4, report  # four groups of one rank
    assert "--tp 1 used for" in report and "tp=2" in report


def test_folders_are_separate_deployments(tmp_path):
    write_deployment(tmp_path / "node0", "decision with nranks", batches={0: [[(0, 4)]], 1: [[(0, 4)]]})
    write_deployment(tmp_path / "node1", "decision with nranks", batches={0: [[(1, 4)]], 1: [[(1, 4)]]})
    code, report = diagnose(tmp_path)
    assert code == 0 and "in every one of the 2 DP groups" in report, report
    assert f"DP group 0 in {tmp_path / 'node1'}: none" in report


# ---- a log's rank: its lines, else its name ----

#: FastDeploy's own messager lines that tell the rank_id (logger calls of the real cache_messager.py files).
RELEASE_IDENTITIES = {
    "tasks_count": lambda rank_id: [f"tasks_count: 1, layer_id: 1 self.rank_id {rank_id}"],
    "prefilled step": lambda rank_id: [f"splitwise_complete_prefilled_step_{rank_id}, gpu_id: {rank_id + 4}"],
    "namespace": lambda rank_id: [
        "create cache messager...",
        f"Namespace(device_id={rank_id + 4}, rank={rank_id}, mp_num=2, local_data_parallel_id=0, protocol='ipc')",
    ],
}


@pytest.mark.parametrize("identity", RELEASE_IDENTITIES)
def test_a_logs_rank_comes_from_its_lines_not_its_name(tmp_path, identity):
    # The upstreamed fix's journal (no plugin line); one name ends with a wrong number, one with none.
    for rank_id, name in ((0, "messager-r7.txt"), (1, "messages.log")):
        lines = RELEASE_IDENTITIES[identity](rank_id) + journal_lines(TP2_DP2[rank_id], prefix="layer0_release: ")
        write_log(tmp_path / name, lines)
    assert diagnose(tmp_path) == (0, "none: the ranks' batch sequences agree (rank 0: 2 batches, rank 1: 2 batches)")


def test_without_an_identity_line_the_name_tells_the_rank_or_device_else_the_log_is_named(tmp_path):
    for name, batches in (("messager-r3.txt", [[(0, 4)]]), ("messager_device5.log", [[(1, 4)]]), ("other", [])):
        write_log(tmp_path / name, ["create cache messager..."] + journal_lines(batches))
    code, report = diagnose(tmp_path)
    assert code == 1 and "first divergence at batch #1 (rank 3: 1 batches, device 5: 1 batches):" in report, report
    assert "note: plugin not active on other: no fastdeploy_pd_fix line in other" in report


# ---- what diagnose cannot diagnose: exit code 2, never 1 ----


def test_a_missing_folder_says_so(tmp_path, capsys):
    code, report = diagnose(tmp_path / "nowhere")
    assert (code, report) == (2, f"{tmp_path / 'nowhere'}: no such folder")
    assert cli_main(["diagnose", str(tmp_path / "nowhere")]) == 2
    (tmp_path / "file.log").write_text("")
    assert diagnose(tmp_path / "file.log")[0] == 2


def test_a_folder_without_messager_logs_names_what_it_looked_for(tmp_path):
    (tmp_path / "cache_messager.log").write_text("".join(f"{line}\n" for line in journal_lines([[(0, 4)]])))
    code, report = diagnose(tmp_path)
    assert code == 2 and report.startswith(f"no cache messager log under {tmp_path} (searched recursively for files")
    assert "cache_messager.log has 'queued batch' lines, but they do not tell the ranks apart" in report


def test_a_folder_of_unrelated_logs_only_is_no_cache_messager_log_with_the_folder_named(tmp_path):
    # Other FastDeploy processes' logs, named like messager logs or not: their argument and rank lines are not a
    # messager's; a binary file with a journal line after a NUL byte is skipped; a marker beyond the head is not read.
    write_log(tmp_path / "cache_messager_rank0.log", ["something else"])
    write_log(tmp_path / "workerlog.0", ["Namespace(rank=0, mp_num=2, device_id=0)", "[rank 0/2] worker ready"])
    (tmp_path / "deep").mkdir()
    write_log(tmp_path / "deep" / "cache_transfer_manager_1.log", ["[rank 1/2] Initializing kv cache"])
    (tmp_path / "core.1234").write_bytes(b"\x7fELF\0\0" + "\n".join(journal_lines([[(0, 4)]])).encode())
    (tmp_path / "big_2.log").write_text("x" * SNIFF_BYTES + "\ncreate cache messager...\n")
    write_log(tmp_path / "launch_cache_messager_0.log", [DECISION])  # a launch log: not a messager log
    code, report = diagnose(tmp_path)
    assert code == 2, report
    assert report.startswith(f"no cache messager log under {tmp_path} (searched recursively for files with a cache ")


@pytest.mark.parametrize("name", ["cache_messager_rank1.log", "other.txt"])
def test_an_unreadable_file_is_exit_code_2_with_its_name(tmp_path, monkeypatch, name):
    """Any file: one that cannot be read may be a rank's messager log (the ranks compared without it could agree)."""
    write_rank_log(tmp_path, 0, [[(0, 4)]])
    write_rank_log(tmp_path, 1, [[(1, 4)]])
    unreadable = tmp_path / name
    unreadable.touch()
    real_open = Path.open

    def open_(path, *args, **kwargs):
        if path == unreadable:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(Path, "open", open_)
    assert diagnose(tmp_path) == (2, f"cannot read {unreadable}: Permission denied")


def test_a_failure_of_diagnose_itself_is_exit_code_2_not_divergence(tmp_path, monkeypatch, capsys):
    write_rank_log(tmp_path, 0, [[(0, 4)]])
    monkeypatch.setattr(diagnose_module, "find_logs", lambda folder: 1 / 0)
    assert diagnose(tmp_path) == (2, "diagnose failed: ZeroDivisionError('division by zero')")
    assert cli_main(["diagnose", str(tmp_path)]) == 2 and "diagnose failed" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["--tp", "0", "x"], ["--tp", "two", "x"], []])
def test_bad_arguments_are_exit_code_2(argv):
    assert diagnose_main(argv) == 2


def test_the_help_documents_the_exit_codes(capsys):
    assert diagnose_main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "exit codes:" in out and "--tp N" in out
    assert all(f"\n  {code}  " in out for code in (0, 1, 2))


# ---- the plugin's own state, read from the logs ----


def test_a_rank_where_the_plugin_stood_aside_is_named(tmp_path):
    write_deployment(tmp_path, "decision with nranks", batches={0: [[(0, 4)]], 1: [[(0, 4)]]})
    write_log(
        tmp_path / "cache_messager_rank2.log",
        ["fastdeploy_pd_fix: stood aside for this messager, original methods run: AttributeError('x')"],
    )
    write_log(
        tmp_path / "launch_cache_messager_tprank2.log",
        [DECISION.replace("patched", "stood aside").replace("layer-0 release replaced", "missing methods x")],
    )
    code, report = diagnose(tmp_path)
    assert code == 0, report
    assert "note: plugin not active on rank 2 (cache_messager_rank2.log): stood aside: AttributeError('x')" in report
    assert "note: plugin stood aside on tp rank 2 (launch_cache_messager_tprank2.log): missing methods x" in report


def test_a_restarted_messager_compares_its_last_run(tmp_path):
    write_log(tmp_path / "cache_messager_rank0.log", journal_lines([[(9, 9)]]) + journal_lines([[(0, 4)]]))
    write_log(tmp_path / "cache_messager_rank1.log", journal_lines([[(0, 4)]]))
    code, report = diagnose(tmp_path)
    assert code == 0 and "rank 0: 1 batches, rank 1: 1 batches" in report
    assert "cache_messager_rank0.log: 2 runs in one log, the last compared" in report


def test_the_upstreamed_fix_logs_are_read_without_plugin_notes(tmp_path):
    for rank in (0, 1):
        write_log(tmp_path / f"cache_messager_rank{rank}.log", journal_lines([[(0, 4)]], prefix="layer0_release: "))
        write_log(tmp_path / f"launch_cache_messager_{rank}.log", ["nothing of the plugin"])
    assert diagnose(tmp_path) == (0, "none: the ranks' batch sequences agree (rank 0: 1 batches, rank 1: 1 batches)")
